"""Synthetic recall data: MQAR's and the MAD tasks' invariants, checked by parsing the sequences."""

import inspect

import numpy as np
import pytest

from effarch.data import synthetic
from effarch.data.synthetic import IGNORE


def _labelled(targets_row):
    return np.flatnonzero(targets_row != IGNORE)


# --- MQAR ---------------------------------------------------------------------------------

def test_mqar_labels_are_the_values_of_queried_keys():
    n, seq_len, k, vocab = 300, 64, 8, 8192
    inputs, targets = synthetic.mqar(0, n, seq_len, k, vocab_size=vocab)
    assert inputs.shape == targets.shape == (n, seq_len)
    assert inputs.dtype == targets.dtype == np.int32
    keys, values = inputs[:, 0:2 * k:2], inputs[:, 1:2 * k:2]
    assert ((keys >= 1) & (keys < vocab // 2)).all()
    assert ((values >= vocab // 2) & (values < vocab)).all()
    assert ((inputs >= 0) & (inputs < vocab)).all()
    for row in range(n):
        assert len(set(keys[row])) == k and len(set(values[row])) == k
        value_of = dict(zip(keys[row], values[row]))
        positions = _labelled(targets[row])
        assert len(positions) == k
        assert (positions >= 2 * k).all() and ((positions - 2 * k) % 2 == 0).all()
        queried = inputs[row, positions]
        assert sorted(queried) == sorted(keys[row])  # every key queried exactly once
        assert [value_of[q] for q in queried] == list(targets[row, positions])


def test_mqar_non_queries_are_filler_or_random():
    plain, targets = synthetic.mqar(3, 50, 48, 4, vocab_size=64, random_non_queries=False)
    query_region = plain[:, 8:]
    assert (query_region[targets[:, 8:] == IGNORE] == 0).all()
    noisy, noisy_targets = synthetic.mqar(3, 50, 48, 4, vocab_size=64)
    filler = noisy[:, 8:][noisy_targets[:, 8:] == IGNORE]
    assert len(np.unique(filler)) > 32  # uniform over the 64 ids, not a constant
    assert (targets[:, :8] == IGNORE).all()


def test_mqar_is_deterministic_in_seed():
    a = synthetic.mqar(5, 20, 64, 8)
    b = synthetic.mqar(5, 20, 64, 8)
    c = synthetic.mqar(6, 20, 64, 8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def _power_law(space, power_a):
    p = power_a * np.arange(1, space + 1) ** (power_a - 1.0)
    return p / p.sum()


@pytest.mark.parametrize("power_a", [0.01, 0.5, 1.0])
def test_mqar_query_gaps_follow_the_power_law(power_a):
    # The first key's gap is the first of the successive draws, so its law is p itself.
    n, seq_len, k = 20_000, 64, 4
    space = (seq_len - 2 * k) // 2
    inputs, targets = synthetic.mqar(11, n, seq_len, k, vocab_size=256, power_a=power_a)
    first_key = inputs[:, :1]
    at_query = (inputs == first_key) & (targets != IGNORE)
    assert (at_query.sum(axis=1) == 1).all()
    gaps = (np.argmax(at_query, axis=1) - 2 * k) // 2
    p = _power_law(space, power_a)
    g = np.arange(space)
    mean, sd = (g * p).sum(), np.sqrt(((g - (g * p).sum()) ** 2 * p).sum())
    assert abs(gaps.mean() - mean) < 5 * sd / np.sqrt(n)
    counts = np.bincount(gaps, minlength=space)
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum()
    df = space - 1
    assert chi2 < df + 6 * np.sqrt(2 * df)
    if power_a < 1:  # and the test tells the power law from uniform gaps
        uniform = np.full(space, n / space)
        assert ((counts - uniform) ** 2 / uniform).sum() > 10 * (df + 6 * np.sqrt(2 * df))


@pytest.mark.parametrize("kwargs, message", [
    (dict(seq_len=10, num_kv_pairs=8), "seq_len=10 too short for num_kv_pairs=8"),
    (dict(seq_len=33, num_kv_pairs=8), "seq_len=33 must be even"),
    (dict(seq_len=64, num_kv_pairs=0), "num_kv_pairs=0"),
    (dict(seq_len=64, num_kv_pairs=8, vocab_size=16), "vocab_size=16 too small for num_kv_pairs=8"),
    (dict(seq_len=64, num_kv_pairs=8, power_a=0.0), "power_a=0.0"),
    (dict(seq_len=64, num_kv_pairs=8, num_examples=0), "num_examples=0"),
])
def test_mqar_rejects_bad_arguments_naming_them(kwargs, message):
    args = dict(seed=0, num_examples=4) | kwargs
    with pytest.raises(ValueError, match=message):
        synthetic.mqar(**args)


def test_mqar_smallest_vocabulary_and_longest_kv_block_fit():
    inputs, targets = synthetic.mqar(0, 10, 16, 4, vocab_size=10)  # keys 1..4, values 5..9; space == k
    assert sorted(inputs[0, 0:8:2]) == [1, 2, 3, 4]
    assert (targets[:, 8::2] != IGNORE).all() and (targets[:, 9::2] == IGNORE).all()


# --- MAD tasks: defaults, determinism -----------------------------------------------------

PAPER_DEFAULTS = {  # mad-lab configs/tasks/*.yml baselines
    "in-context-recall": (12_800, 16, 128),
    "fuzzy-in-context-recall": (12_800, 16, 128),
    "noisy-in-context-recall": (12_800, 32, 128),
    "selective-copying": (12_800, 16, 256),
    "compression": (12_800, 16, 32),
    "memorization": (256, 256, 32),
}


@pytest.mark.parametrize("name", sorted(PAPER_DEFAULTS))
def test_mad_task_defaults_and_shapes(name):
    fn = synthetic.MAD_TASKS[name]
    params = inspect.signature(fn).parameters
    num_examples, vocab_size, seq_len = PAPER_DEFAULTS[name]
    assert (params["num_examples"].default, params["vocab_size"].default, params["seq_len"].default) == (
        num_examples, vocab_size, seq_len)
    inputs, targets = fn(0, 32)
    assert inputs.shape == targets.shape == (32, seq_len)
    assert inputs.dtype == targets.dtype == np.int32
    assert ((inputs >= 0) & (inputs < vocab_size)).all()
    scored = targets[targets != IGNORE]
    assert scored.size and ((scored >= 0) & (scored < vocab_size)).all()


@pytest.mark.parametrize("name", sorted(PAPER_DEFAULTS))
def test_mad_task_is_deterministic_in_seed(name):
    fn = synthetic.MAD_TASKS[name]
    a, b, c = fn(7, 16), fn(7, 16), fn(8, 16)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("name", sorted(PAPER_DEFAULTS))
def test_mad_task_rejects_bad_counts(name):
    with pytest.raises(ValueError, match="num_examples=0"):
        synthetic.MAD_TASKS[name](0, 0)


# --- in-context recall, noisy and plain -----------------------------------------------------

def _check_recall_rows(inputs, targets, num_keys, num_values_end, multi_query):
    """Each scored target is the value that followed the same key earlier; every repeat is scored."""
    seq_len = inputs.shape[1]
    for row_in, row_t in zip(inputs, targets):
        stream = np.append(row_in, row_t[-1]) if not multi_query else row_in
        seen = {}
        for start in range(0, seq_len - 2, 2):
            key, value = stream[start], stream[start + 1]
            if key >= num_keys:  # noise slot: two noise tokens, nothing scored
                assert num_values_end <= key and num_values_end <= value
                assert row_t[start] == row_t[start + 1] == IGNORE
                continue
            assert num_keys <= value < num_values_end
            repeated = key in seen
            assert seen.setdefault(key, value) == value  # one value per key and sequence
            assert row_t[start] == (value if multi_query and repeated else IGNORE)
            assert row_t[start + 1] == IGNORE
        probe_at = seq_len - 2 if multi_query else seq_len - 1
        probe_key = row_in[probe_at]
        assert probe_key in seen and row_t[probe_at] == seen[probe_key]
        assert (row_t[probe_at + 1:] == IGNORE).all()


def test_in_context_recall_scores_repeated_keys_with_their_earlier_value():
    inputs, targets = synthetic.in_context_recall(0, 200, seq_len=64)
    _check_recall_rows(inputs, targets, num_keys=8, num_values_end=16, multi_query=True)
    assert (targets[:, -1] == IGNORE).all() and (targets[:, ::2] != IGNORE).any()


def test_in_context_recall_single_query_scores_only_the_probe_after_the_copy_prefix():
    inputs, targets = synthetic.in_context_recall(1, 200, seq_len=64, multi_query=False)
    assert ((targets != IGNORE).sum(axis=1) == 1).all() and (targets[:, -1] != IGNORE).all()
    assert (inputs[:, -2] == 15).all()  # copy prefix; keys 0..6, values 7..14
    assert (np.delete(inputs, -2, axis=1) < 15).all()
    _check_recall_rows(inputs, targets, num_keys=7, num_values_end=15, multi_query=False)


def test_noisy_recall_never_scores_noise_and_keeps_its_fraction():
    frac_noise = 0.4
    inputs, targets = synthetic.noisy_in_context_recall(2, 400, frac_noise=frac_noise)
    noise = inputs >= 16  # noise ids 16..31; keys 0..7, values 8..15
    assert not noise[targets != IGNORE].any()
    assert (targets[targets != IGNORE] < 16).all()
    noise_slots = noise[:, :-2:2]
    assert (noise_slots == noise[:, 1:-2:2]).all()  # noise comes in whole slots
    assert abs(noise_slots.mean() - frac_noise) < 0.02
    assert (~noise_slots).any(axis=1).all()  # at least one pair before the probe
    _check_recall_rows(inputs[:100], targets[:100], num_keys=8, num_values_end=16, multi_query=True)


def test_recall_dense_targets_label_every_next_token():
    sparse = synthetic.noisy_in_context_recall(3, 50, seq_len=32)
    inputs, dense = synthetic.noisy_in_context_recall(3, 50, seq_len=32, dense_targets=True)
    np.testing.assert_array_equal(inputs, sparse[0])
    np.testing.assert_array_equal(dense[:, :-1], inputs[:, 1:])
    scored = sparse[1] != IGNORE
    np.testing.assert_array_equal(dense[scored], sparse[1][scored])


@pytest.mark.parametrize("fn, kwargs, message", [
    (synthetic.in_context_recall, dict(seq_len=31), "seq_len=31"),
    (synthetic.in_context_recall, dict(vocab_size=1), "vocab_size=1 too small"),
    (synthetic.noisy_in_context_recall, dict(frac_noise=1.0), "frac_noise=1.0"),
    (synthetic.noisy_in_context_recall, dict(noise_vocab_size=0), "noise_vocab_size=0"),
    (synthetic.noisy_in_context_recall, dict(vocab_size=17), "vocab_size=17 too small"),
    (synthetic.fuzzy_in_context_recall, dict(seq_len=12), "seq_len=12 too short"),
    (synthetic.fuzzy_in_context_recall, dict(vocab_size=6), "vocab_size=6 too small"),
    (synthetic.fuzzy_in_context_recall, dict(split="val"), "split='val'"),
    (synthetic.selective_copying, dict(seq_len=33), "seq_len=33 too short for num_tokens_to_copy=16"),
    (synthetic.selective_copying, dict(vocab_size=2), "vocab_size=2"),
    (synthetic.compression, dict(seq_len=1), "seq_len=1"),
    (synthetic.memorization, dict(seq_len=31), "seq_len=31"),
    (synthetic.memorization, dict(vocab_size=2), "vocab_size=2"),
])
def test_mad_tasks_reject_bad_arguments_naming_them(fn, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fn(0, 4, **kwargs)


# --- fuzzy in-context recall ------------------------------------------------------------------

def _parse_motif_pairs(stream, num_key_tokens, end):
    """Split a pad-free stream into (key tuple, value tuple, value start) runs."""
    is_key = stream < num_key_tokens
    assert (stream < end).all()
    pairs, i = [], 0
    while i < len(stream):
        j = i
        while j < len(stream) and is_key[j]:
            j += 1
        v = j
        while v < len(stream) and not is_key[v]:
            v += 1
        assert j > i and v > j, "key run then value run"
        pairs.append((tuple(stream[i:j]), tuple(stream[j:v]), j))
        i = v
    return pairs


@pytest.mark.parametrize("split", ["train", "test"])
def test_fuzzy_recall_motifs_are_consistent_and_repeats_scored(split):
    inputs, targets = synthetic.fuzzy_in_context_recall(4, 150, seq_len=64, split=split)
    pad, num_key_tokens = 15, 7  # keys from 0..6, values from 7..14
    key_lengths = set()
    for row_in, row_t in zip(inputs, targets):
        stream = np.append(row_in, row_t[-1])
        body = np.flatnonzero(stream != pad)[0]
        assert (stream[:body] == pad).all() and body >= 1 and (row_t[:body] == IGNORE).all()
        pairs = _parse_motif_pairs(stream[body:], num_key_tokens, pad)
        value_of = {}
        for index, (key, value, value_start) in enumerate(pairs):
            assert len(set(key)) == len(key) <= 3 and len(set(value)) == len(value) <= 3
            key_lengths.add(len(key))
            at = body + value_start - 1  # the target predicting the value's first token
            scored = row_t[at:at + len(value)]
            if key in value_of:
                assert value_of[key] == value
                assert tuple(scored) == value
            else:
                assert index < len(pairs) - 1, "the final probe's key occurred before"
                assert (scored == IGNORE).all()
            assert (row_t[body + value_start - len(key) - 1:at] == IGNORE).all()
            value_of[key] = value
        assert tuple(row_t[-len(pairs[-1][1]):]) == pairs[-1][1]
    assert key_lengths == ({1, 2, 3} if split == "train" else {3})


def test_fuzzy_recall_single_query_scores_the_probe_after_the_copy_prefix():
    inputs, targets = synthetic.fuzzy_in_context_recall(5, 100, seq_len=64, multi_query=False)
    copy, pad = 15, 14  # keys 0..6, values 7..13
    for row_in, row_t in zip(inputs, targets):
        stream = np.append(row_in, row_t[-1])
        copy_at = np.flatnonzero(stream == copy)
        assert len(copy_at) == 1
        body = np.flatnonzero(stream != pad)[0]
        before = _parse_motif_pairs(stream[body:copy_at[0]], 7, pad)
        (probe_key, probe_value, _), = _parse_motif_pairs(stream[copy_at[0] + 1:], 7, pad)
        assert dict((k, v) for k, v, _ in before)[probe_key] == probe_value
        scored = row_t[row_t != IGNORE]
        assert tuple(scored) == probe_value and tuple(row_t[-len(probe_value):]) == probe_value


# --- selective copying, compression, memorization ----------------------------------------------

def test_selective_copying_targets_are_the_non_blank_tokens_in_order():
    m, seq_len = 16, 256
    inputs, targets = synthetic.selective_copying(6, 300)
    blank, copy = 14, 15
    assert (inputs[:, seq_len - m - 1] == copy).all() and ((inputs == copy).sum(axis=1) == 1).all()
    assert (inputs[:, seq_len - m:] == blank).all()
    assert (targets[:, :seq_len - m] == IGNORE).all()
    for row_in, row_t in zip(inputs, targets):
        content = row_in[:seq_len - m - 1][row_in[:seq_len - m - 1] != blank]
        np.testing.assert_array_equal(row_t[seq_len - m:], content)
    assert (inputs[:, seq_len - m - 2] != blank).all()  # mad-lab inserts blanks only before content tokens
    first_content = np.argmax(inputs != blank, axis=1)
    assert first_content.std() > 1  # blanks are spread, not a fixed layout


def test_compression_targets_reconstruct_the_inputs():
    inputs, targets = synthetic.compression(7, 500, vocab_size=32, seq_len=64)
    np.testing.assert_array_equal(targets, inputs)
    assert not np.shares_memory(targets, inputs)
    assert (inputs[:, -1] == 31).all() and (inputs[:, :-1] < 31).all()
    assert len(np.unique(inputs[:, :-1])) == 31


def test_memorization_maps_each_key_to_one_value_across_examples_and_seeds():
    mapping = synthetic.memorization_mapping()
    assert mapping.shape == (127,) and len(set(mapping)) == 127
    assert ((mapping >= 127) & (mapping < 255)).all()
    train_in, train_t = synthetic.memorization(0)
    test_in, test_t = synthetic.memorization(1, 1280)
    assert not np.array_equal(train_in, test_in[:256])
    for inputs, targets in ((train_in, train_t), (test_in, test_t)):
        assert (inputs[:, 1::2] == 255).all() and (targets[:, 0::2] == IGNORE).all()
        np.testing.assert_array_equal(targets[:, 1::2], mapping[inputs[:, 0::2]])
    pairs = set(zip(train_in[:, 0::2].ravel(), train_t[:, 1::2].ravel()))
    assert len(pairs) == len({k for k, _ in pairs})  # same key, same value, in every example
    other = synthetic.memorization_mapping(mapping_seed=1)
    assert not np.array_equal(other, mapping)
    _, other_t = synthetic.memorization(0, mapping_seed=1)
    np.testing.assert_array_equal(other_t[:, 1::2], other[train_in[:, 0::2]])


@pytest.mark.parametrize("seq_len, k_motif_size, v_motif_size, multi_query", [
    (13, 1, 1, True), (33, 2, 4, False), (100, 3, 3, True), (257, 4, 2, False),
])
def test_fuzzy_recall_fits_and_always_presents_the_probe(seq_len, k_motif_size, v_motif_size, multi_query):
    vocab = 32
    pad = vocab - 1 if multi_query else vocab - 2
    num_key_tokens = (pad if multi_query else vocab - 2) // 2
    inputs, targets = synthetic.fuzzy_in_context_recall(
        9, 300, vocab_size=vocab, seq_len=seq_len, k_motif_size=k_motif_size, v_motif_size=v_motif_size,
        multi_query=multi_query)
    assert inputs.shape == (300, seq_len) and (inputs[:, 0] == pad).all()  # padded, never cut
    for row_in, row_t in zip(inputs, targets):
        stream = np.append(row_in, row_t[-1])
        stream = stream[(stream != pad) & (stream != vocab - 1)]
        pairs = _parse_motif_pairs(stream, num_key_tokens, pad)
        assert pairs[-1][:2] in {p[:2] for p in pairs[:-1]}
