"""Synthetic recall data: MQAR (Zoology) and the six MAD tasks, as vectorised numpy generators.

Every generator is a pure function of its arguments (``np.random.default_rng(seed)``)
and returns ``(inputs, targets)``, both ``int32 [N, T]``, with :data:`IGNORE` in
``targets`` wherever nothing is asked, so a loss or accuracy is taken over
``targets != IGNORE`` only. Unless a docstring says otherwise, ``targets[:, t]``
is what a causal model must output after reading ``inputs[:, :t + 1]``.

    from effarch.data import synthetic
    inputs, targets = synthetic.mqar(0, 100_000, seq_len=256, num_kv_pairs=16)
    inputs, targets = synthetic.MAD_TASKS["in-context-recall"](0)   # MAD's default training set

* :func:`mqar` is multi-query associative recall as Zoology defines it
  (Arora, Eyuboglu et al. 2023; ``zoology/data/multiquery_ar.py`` in HazyResearch/zoology).
* The MAD tasks (Poli et al. 2024, "Mechanistic Design and Scaling of Hybrid
  Architectures"; reference code ``mad/data/instances.py`` and ``configs/tasks/*.yml``
  in athms/mad-lab) are :func:`in_context_recall`, :func:`fuzzy_in_context_recall`,
  :func:`noisy_in_context_recall`, :func:`selective_copying`, :func:`compression` and
  :func:`memorization`, listed in :data:`MAD_TASKS` under mad-lab's task names. Their
  keyword defaults are mad-lab's baseline settings (vocabulary, length, 12,800 training
  examples; 256 for memorization); mad-lab's test sets hold 1,280 examples, made here
  by calling the same function with another seed.

mad-lab builds one example at a time in Python; these generators build all of them at
once, so the random streams differ from mad-lab's while the distributions are the same
except where a docstring names a deviation.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

IGNORE = -100


def _check_count(seed: int, num_examples: int) -> None:
    if num_examples < 1:
        raise ValueError(f"{num_examples=} must be >= 1")
    if seed < 0:
        raise ValueError(f"{seed=} must be a non-negative int (np.random.default_rng seed)")


def _distinct(rng: np.random.Generator, n: int, k: int, r: int) -> np.ndarray:
    """Rows of ``k`` distinct ints drawn uniformly from ``[0, r)``, in random order.

    Draw ``i`` picks the ``t``-th of the ``r - i`` values not yet taken, so each row is a
    uniformly random ordered ``k``-tuple without repeats, in ``O(n k^2)`` time and
    ``O(n k)`` memory whatever ``r`` is.

    Returns:
        int64 ``[n, k]``.
    """
    out = np.empty((n, k), np.int64)
    for i in range(k):
        t = rng.integers(0, r - i, size=n)
        for taken in np.sort(out[:, :i], axis=1).T:  # ascending: skip every value taken so far
            t += taken <= t
        out[:, i] = t
    return out


def _first_occurrence(ids: np.ndarray) -> np.ndarray:
    """For each ``ids[n, j]`` the smallest ``j'`` with ``ids[n, j'] == ids[n, j]``.

    Args:
        ids: int ``[N, M]``.

    Returns:
        int64 ``[N, M]``; ``result[n, j] < j`` exactly when the id occurred earlier in row ``n``.
    """
    n, m = ids.shape
    rows = np.repeat(np.arange(n), m)
    slots = np.tile(np.arange(m), n)
    flat = ids.ravel()
    order = np.lexsort((slots, flat, rows))  # by row, then id, then slot
    r, f = rows[order], flat[order]
    starts = np.ones(n * m, bool)
    starts[1:] = (r[1:] != r[:-1]) | (f[1:] != f[:-1])
    group_start = np.maximum.accumulate(np.where(starts, np.arange(n * m), 0))
    first = np.empty(n * m, np.int64)
    first[order] = slots[order][group_start]
    return first.reshape(n, m)


def _next_token_view(stream: np.ndarray, labels: np.ndarray, seq_len: int, dense: bool):
    """Inputs ``stream[:, :seq_len]`` and the label of the token after each of them.

    ``stream``/``labels`` are ``[N, L]`` with ``L`` in ``{seq_len, seq_len + 1}``; a position
    with no next token gets :data:`IGNORE`. ``dense`` labels every next token (mad-lab's
    training targets) instead of ``labels`` (its scored positions).
    """
    nxt = (stream if dense else labels)[:, 1:seq_len + 1]
    if nxt.shape[1] < seq_len:
        nxt = np.pad(nxt, ((0, 0), (0, seq_len - nxt.shape[1])), constant_values=IGNORE)
    return stream[:, :seq_len].astype(np.int32), nxt.astype(np.int32)


def mqar(
    seed: int,
    num_examples: int,
    seq_len: int,
    num_kv_pairs: int,
    *,
    vocab_size: int = 8192,
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Multi-query associative recall (MQAR) as Zoology's ``multiquery_ar`` defines it.

    Each example opens with ``num_kv_pairs`` key-value pairs ``k1 v1 k2 v2 ...``: keys
    drawn without replacement from ``1 .. vocab_size // 2 - 1`` (``0`` is the filler),
    values without replacement from ``vocab_size // 2 .. vocab_size - 1``. The remaining
    ``seq_len - 2 * num_kv_pairs`` positions hold every key once more, as a query, at an
    even offset ``2 * g`` from the end of the kv block; the gaps ``g`` of keys ``k1, k2,
    ...`` are successive draws without replacement from ``0 .. space - 1``
    (``space = (seq_len - 2 * num_kv_pairs) // 2``) with probability
    ``p(g) ∝ a * (g + 1) ** (a - 1)``, ``a = power_a``: a power law favouring queries
    soon after the kv block (``power_a=1`` is uniform). ``targets`` holds the key's value
    at the query's position, so a causal model that reads a queried key must output its
    value; everything else, the kv block included, is :data:`IGNORE`. The positions
    left in the query region are ``0`` or, with ``random_non_queries`` (Zoology's
    default), uniform tokens from the whole vocabulary (which may equal a key: only the
    planted queries are labelled).

    Zoology's example (``vocab_size=12, num_kv_pairs=2, seq_len=16``, no random fill)::

        inputs   2    8    4    7   0    0    4   0    0    0    0    0   2   0    0    0
        targets -100 -100 -100 -100 -100 -100 7 -100 -100 -100 -100 -100 8 -100 -100 -100

    Differences from Zoology: ``num_passes`` (JRT repeats of the kv block) is left out,
    and Zoology's ``vocab_size > seq_len`` assertion is dropped since nothing depends on
    it; the vocabulary only has to hold the keys and values. Weighted sampling without
    replacement is done as an exponential race (the ``k`` smallest ``E / p``,
    ``E ~ Exp(1)``, in increasing order), which has the distribution of numpy's
    sequential ``choice(replace=False, p=p)``.

    Speed: 100,000 examples at ``seq_len=256, num_kv_pairs=16`` took 1.8 to 4.0 s
    (numpy 2.4, one thread, on a 2-core machine at load average ~9).

    Args:
        seed: seed of ``np.random.default_rng``; the output is a function of all arguments.
        num_examples: ``N``, number of sequences.
        seq_len: ``T``, even, at least ``4 * num_kv_pairs``.
        num_kv_pairs: keys per sequence, each queried exactly once.
        vocab_size: token ids are ``0 .. vocab_size - 1``.
        power_a: exponent ``a > 0`` of the query-gap power law.
        random_non_queries: fill non-query positions of the query region with uniform
            tokens instead of ``0``.

    Returns:
        ``(inputs, targets)``, int32 ``[N, T]``.

    Raises:
        ValueError: if an argument is out of range; the message names it and the valid form.
    """
    _check_count(seed, num_examples)
    if num_kv_pairs < 1:
        raise ValueError(f"{num_kv_pairs=} must be >= 1")
    if seq_len < 4 * num_kv_pairs:
        raise ValueError(f"{seq_len=} too short for {num_kv_pairs=}: need seq_len >= 4 * num_kv_pairs")
    if seq_len % 2:
        raise ValueError(f"{seq_len=} must be even (queries sit at even offsets after the kv block)")
    half = vocab_size // 2
    if half - 1 < num_kv_pairs or vocab_size - half < num_kv_pairs:
        raise ValueError(
            f"{vocab_size=} too small for {num_kv_pairs=}: keys come from 1 .. vocab_size // 2 - 1 and "
            f"values from vocab_size // 2 .. vocab_size - 1, so need vocab_size >= 2 * num_kv_pairs + 2")
    if not power_a > 0:
        raise ValueError(f"{power_a=} must be > 0 (1.0 is uniform)")

    rng = np.random.default_rng(seed)
    n, k = num_examples, num_kv_pairs
    keys = 1 + _distinct(rng, n, k, half - 1)
    values = half + _distinct(rng, n, k, vocab_size - half)

    context = 2 * k
    space = (seq_len - context) // 2
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    race = rng.standard_exponential((n, space)) / p
    gaps = np.argpartition(race, k - 1, axis=1)[:, :k] if k < space else np.tile(np.arange(space), (n, 1))
    gaps = np.take_along_axis(gaps, np.argsort(np.take_along_axis(race, gaps, axis=1), axis=1), axis=1)
    positions = context + 2 * gaps

    inputs = np.zeros((n, seq_len), np.int32)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    if random_non_queries:
        inputs[:, context:] = rng.integers(0, vocab_size, size=(n, seq_len - context), dtype=np.int32)
    np.put_along_axis(inputs, positions, keys.astype(np.int32), axis=1)
    targets = np.full((n, seq_len), IGNORE, np.int32)
    np.put_along_axis(targets, positions, values.astype(np.int32), axis=1)
    return inputs, targets


def _recall(
    seed: int,
    num_examples: int,
    *,
    vocab_size: int,
    seq_len: int,
    multi_query: bool,
    noise_vocab_size: int,
    frac_noise: float,
    dense_targets: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """mad-lab's ``generate_in_context_recall_instance``, all examples at once (see the callers)."""
    _check_count(seed, num_examples)
    if seq_len < 4 or seq_len % 2:
        raise ValueError(f"{seq_len=} must be even and >= 4 (key-value pairs, then the probe pair)")
    if not 0 <= frac_noise < 1:
        raise ValueError(f"{frac_noise=} must satisfy 0 <= frac_noise < 1")
    if noise_vocab_size < 0 or (frac_noise > 0 and noise_vocab_size < 1):
        raise ValueError(f"{noise_vocab_size=} must be >= 0, and >= 1 when frac_noise > 0 ({frac_noise=})")
    special = 0 if multi_query else 1  # the copy prefix before the final probe (single query)
    non_special = vocab_size - special - noise_vocab_size
    if non_special < 2:
        raise ValueError(
            f"{vocab_size=} too small: need vocab_size >= 2 + noise_vocab_size + (0 if multi_query else 1) "
            f"= {2 + noise_vocab_size + special} for one key and one value ({noise_vocab_size=}, {multi_query=})")

    rng = np.random.default_rng(seed)
    n = num_examples
    num_keys = non_special // 2
    slots = seq_len // 2 - 1  # key-value slots before the probe pair
    rows = np.arange(n)
    kv_map = rng.integers(num_keys, non_special, size=(n, num_keys))  # each key's value, per sequence
    keys = rng.integers(0, num_keys, size=(n, slots))
    values = np.take_along_axis(kv_map, keys, axis=1)
    noise = rng.random((n, slots)) < frac_noise
    noise[rows, rng.integers(0, slots, size=n)] = False  # at least one key-value pair

    first = _first_occurrence(np.where(noise, -1, keys))
    repeated = ~noise & (first < np.arange(slots))
    presented = np.zeros((n, num_keys), bool)
    presented[np.broadcast_to(rows[:, None], keys.shape)[~noise], keys[~noise]] = True
    probe_key = np.argmax(np.where(presented, rng.random((n, num_keys)), -1.0), axis=1)
    probe_value = kv_map[rows, probe_key]

    pairs = np.stack([keys, values], axis=-1)
    if frac_noise > 0:
        noise_tokens = rng.integers(non_special, non_special + noise_vocab_size, size=(n, slots, 2))
        pairs = np.where(noise[..., None], noise_tokens, pairs)
    pair_labels = np.full((n, slots, 2), IGNORE, np.int64)
    if multi_query:
        pair_labels[..., 1] = np.where(repeated, values, IGNORE)
    tail = [probe_key, probe_value] if multi_query else [np.full(n, vocab_size - 1), probe_key, probe_value]
    tail_labels = [np.full(n, IGNORE)] * (len(tail) - 1) + [probe_value]
    stream = np.concatenate([pairs.reshape(n, -1), np.stack(tail, axis=1)], axis=1)
    labels = np.concatenate([pair_labels.reshape(n, -1), np.stack(tail_labels, axis=1)], axis=1)
    return _next_token_view(stream, labels, seq_len, dense_targets)


def in_context_recall(
    seed: int,
    num_examples: int = 12_800,
    *,
    vocab_size: int = 16,
    seq_len: int = 128,
    multi_query: bool = True,
    dense_targets: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """MAD in-context recall: key-value pairs with per-sequence bindings, then recall.

    The sequence is ``seq_len // 2 - 1`` pairs ``k v`` followed by a probe ``k* v*``.
    Keys are uniform (with repeats) over ``0 .. n_keys - 1``, ``n_keys = V' // 2``, and
    values over ``n_keys .. V' - 1``, where ``V' = vocab_size`` with ``multi_query`` and
    ``vocab_size - 1`` without (the last id, ``vocab_size - 1``, is then the copy prefix
    placed before the probe). Each sequence binds every key to one value; ``k*`` is
    uniform among the keys that occurred. Scored positions (mad-lab's test targets):
    the probe's value, and with ``multi_query`` every value of a key that occurred
    earlier in the sequence; the label sits at the key, i.e. ``targets[:, t]`` is the
    value ``inputs[:, t + 1]``.

    Defaults (mad-lab ``configs/tasks/in-context-recall.yml`` baseline): vocabulary 16,
    length 128, 12,800 training examples, ``multi_query=True``; MAD varies
    ``vocab_size`` over 32, 64, 128, ``seq_len`` over 256, 512, 1024 and
    ``num_examples`` over 6,400 .. 800.

    Deviation: with ``multi_query`` mad-lab's sequence has ``seq_len`` tokens and its
    inputs drop the last one (``T = seq_len - 1``); here the final value stays as a last
    input labelled :data:`IGNORE`, so ``T = seq_len`` and every scored position and label
    is as in mad-lab.

    Args:
        seed: seed of ``np.random.default_rng``.
        num_examples: ``N``.
        vocab_size: token ids are ``0 .. vocab_size - 1``.
        seq_len: ``T``, even, >= 4.
        multi_query: score every repeated key, not only the final probe.
        dense_targets: label every next token, as mad-lab's *training* targets do
            (it trains on all next tokens and scores only the positions above).

    Returns:
        ``(inputs, targets)``, int32 ``[N, seq_len]``.

    Raises:
        ValueError: if an argument is out of range.
    """
    return _recall(seed, num_examples, vocab_size=vocab_size, seq_len=seq_len, multi_query=multi_query,
                   noise_vocab_size=0, frac_noise=0.0, dense_targets=dense_targets)


def noisy_in_context_recall(
    seed: int,
    num_examples: int = 12_800,
    *,
    vocab_size: int = 32,
    seq_len: int = 128,
    noise_vocab_size: int = 16,
    frac_noise: float = 0.2,
    multi_query: bool = True,
    dense_targets: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """MAD noisy in-context recall: :func:`in_context_recall` with noise pairs.

    Each of the ``seq_len // 2 - 1`` slots before the probe is, with probability
    ``frac_noise``, two uniform noise tokens from ``V' .. V' + noise_vocab_size - 1``
    instead of a key-value pair (``V' = vocab_size - noise_vocab_size``, less one
    without ``multi_query``; keys and values split ``0 .. V' - 1`` as in
    :func:`in_context_recall`). Noise is never scored and never counts as an
    occurrence of a key.

    Defaults (mad-lab ``configs/tasks/noisy-in-context-recall.yml`` baseline): vocabulary
    32 of which 16 are noise tokens, length 128, noise fraction 0.2, 12,800 training
    examples, ``multi_query=True``; MAD varies ``vocab_size`` over 48, 80, 144 (16 noise
    tokens added), ``seq_len`` over 256 .. 1024, ``frac_noise`` over 0.4, 0.6, 0.8 and
    ``num_examples`` over 6,400 .. 800.

    Deviations: the length convention of :func:`in_context_recall`; and mad-lab keeps
    one random slot of all ``seq_len // 2`` (the probe's included) free of noise, so a
    sequence can lack any pair before the probe, which crashes its generator; here the
    kept slot is one of the slots before the probe.

    Args:
        seed: seed of ``np.random.default_rng``.
        num_examples: ``N``.
        vocab_size: token ids are ``0 .. vocab_size - 1``, noise tokens included.
        seq_len: ``T``, even, >= 4.
        noise_vocab_size: number of noise token ids (the top of the non-special range).
        frac_noise: probability that a slot is noise, ``0 <= frac_noise < 1``.
        multi_query: score every repeated key, not only the final probe.
        dense_targets: label every next token (noise included), as mad-lab's training targets.

    Returns:
        ``(inputs, targets)``, int32 ``[N, seq_len]``.

    Raises:
        ValueError: if an argument is out of range.
    """
    return _recall(seed, num_examples, vocab_size=vocab_size, seq_len=seq_len, multi_query=multi_query,
                   noise_vocab_size=noise_vocab_size, frac_noise=frac_noise, dense_targets=dense_targets)


def fuzzy_in_context_recall(
    seed: int,
    num_examples: int = 12_800,
    *,
    vocab_size: int = 16,
    seq_len: int = 128,
    k_motif_size: int = 3,
    v_motif_size: int = 3,
    multi_query: bool = True,
    split: str = "train",
    dense_targets: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """MAD fuzzy in-context recall: keys and values are motifs of 1 to 3 tokens.

    Token ids: ``pad = vocab_size - 1`` with ``multi_query``; without it the copy prefix
    is ``vocab_size - 1`` and ``pad = vocab_size - 2``. The ``V'`` ids below ``pad``
    split into key tokens ``0 .. V' // 2 - 1`` and value tokens ``V' // 2 .. V' - 1``. A
    key is an ordered tuple of distinct key tokens of uniform length ``1 ..
    k_motif_size`` (always ``k_motif_size`` in the ``"test"`` split, as mad-lab prompts
    test keys at the maximum size), a value likewise of ``1 .. v_motif_size`` value
    tokens; each sequence binds each key to one value. Pairs are appended while the
    sequence is shorter than ``seq_len - |probe| - (k_motif_size + v_motif_size)``; one
    of them, at a uniform token offset, is the probe pair; then come the copy prefix
    (single query only) and the probe pair again, and the front is padded with ``pad``
    to ``seq_len + 1`` tokens of which the inputs are the first ``seq_len``. Scored
    positions: every token of the final probe's value, and with ``multi_query`` every
    token of a value whose key occurred earlier; ``targets[:, t]`` is the value token
    ``inputs[:, t + 1]`` (the last target is the probe value's last token). Keys and
    values use disjoint tokens, so a sequence parses into alternating key and value runs.

    Defaults (mad-lab ``configs/tasks/fuzzy-in-context-recall.yml`` baseline): vocabulary
    16, length 128, motifs of up to 3 tokens, 12,800 training examples,
    ``multi_query=True``; MAD varies ``vocab_size`` over 32, 64, 128, ``seq_len`` over
    256 .. 1024 and ``num_examples`` over 6,400 .. 800.

    Deviations: mad-lab draws the probe's offset from ``0 .. seq_len - 2|probe| - 1`` but
    stops adding pairs earlier, so a few percent of its sequences end on a probe whose
    key never occurred; here the offset is drawn from ``0 .. seq_len - 2 * (k_motif_size
    + v_motif_size) - 1``, below any stopping point, so the probe pair always occurs. A
    key keeps the value of its first occurrence everywhere, the probe's included (mad-lab
    can give a key drawn before the probe's insertion a second value). Its noise option
    (off in MAD) is left out.

    Args:
        seed: seed of ``np.random.default_rng``.
        num_examples: ``N``.
        vocab_size: token ids are ``0 .. vocab_size - 1``.
        seq_len: ``T``, more than ``2 * (k_motif_size + v_motif_size)``.
        k_motif_size: longest key motif.
        v_motif_size: longest value motif.
        multi_query: score every repeated key, not only the final probe.
        split: ``"train"`` (key lengths vary) or ``"test"`` (all keys ``k_motif_size`` long).
        dense_targets: label every next token (padding included), as mad-lab's training targets.

    Returns:
        ``(inputs, targets)``, int32 ``[N, seq_len]``.

    Raises:
        ValueError: if an argument is out of range.
    """
    _check_count(seed, num_examples)
    if split not in ("train", "test"):
        raise ValueError(f"{split=} must be 'train' or 'test'")
    if k_motif_size < 1 or v_motif_size < 1:
        raise ValueError(f"{k_motif_size=} and {v_motif_size=} must be >= 1")
    width = k_motif_size + v_motif_size
    if seq_len <= 2 * width:
        raise ValueError(f"{seq_len=} too short for motifs of {width} tokens: need seq_len > "
                         f"2 * (k_motif_size + v_motif_size) = {2 * width}")
    non_special = vocab_size - (1 if multi_query else 2)
    num_key_tokens = non_special // 2
    num_value_tokens = non_special - num_key_tokens
    if num_key_tokens < k_motif_size or num_value_tokens < v_motif_size:
        raise ValueError(
            f"{vocab_size=} too small for {k_motif_size=}, {v_motif_size=}: a motif has distinct tokens, so need "
            f"vocab_size >= 2 * max(k_motif_size, v_motif_size) + {1 if multi_query else 2} ({multi_query=})")

    rng = np.random.default_rng(seed)
    n = num_examples
    rows = np.arange(n)[:, None]
    slots = seq_len // 2 + 1  # more pairs than can fit: each has >= 2 tokens

    def motifs(count, max_size, num_tokens, offset, fixed):
        size = np.full(count, max_size) if fixed else rng.integers(1, max_size + 1, size=count)
        return size, offset + _distinct(rng, count, max_size, num_tokens)

    k_len, k_tok = motifs(n * slots, k_motif_size, num_key_tokens, 0, split == "test")
    v_len, v_tok = motifs(n * slots, v_motif_size, num_value_tokens, num_key_tokens, False)
    pk_len, pk_tok = motifs(n, k_motif_size, num_key_tokens, 0, split == "test")
    pv_len, pv_tok = motifs(n, v_motif_size, num_value_tokens, num_key_tokens, False)
    k_len, v_len = k_len.reshape(n, slots), v_len.reshape(n, slots)
    k_tok, v_tok = k_tok.reshape(n, slots, k_motif_size), v_tok.reshape(n, slots, v_motif_size)

    # One value per key and sequence: the one drawn where the key first occurs.
    place = (num_key_tokens + 1) ** np.arange(k_motif_size)

    def first_occurrence():
        return _first_occurrence(((k_tok + 1) * (np.arange(k_motif_size) < k_len[..., None]) * place).sum(-1))

    # Pairs are added while the sequence is shorter than `stop`, which depends on the final
    # probe's length; the probe pair goes into the slot covering a uniform token offset below
    # the least `stop`, so it is always added. Lengths before that slot depend only on the
    # slots before it, so they stay put when it is filled.
    offset = rng.integers(0, seq_len - 2 * width, size=n)
    lengths = k_len + v_len[rows, first_occurrence()]
    probe_slot = (np.cumsum(lengths, axis=1) - lengths <= offset[:, None]).sum(axis=1) - 1
    r = np.arange(n)
    k_len[r, probe_slot], k_tok[r, probe_slot] = pk_len, pk_tok
    v_len[r, probe_slot], v_tok[r, probe_slot] = pv_len, pv_tok
    first = first_occurrence()
    v_len, v_tok = v_len[rows, first], v_tok[rows, first]
    repeated = first < np.arange(slots)
    lengths = k_len + v_len
    stop = seq_len - lengths[r, probe_slot] - width
    added = np.cumsum(lengths, axis=1) - lengths < stop[:, None]

    k_cols, v_cols = np.arange(k_motif_size), np.arange(v_motif_size)
    tokens = np.concatenate([k_tok, v_tok], axis=-1)
    valid = np.concatenate([k_cols < k_len[..., None], v_cols < v_len[..., None]], axis=-1) & added[..., None]
    labels = np.full(tokens.shape, IGNORE, np.int64)
    if multi_query:
        labels[..., k_motif_size:] = np.where(repeated[..., None], v_tok, IGNORE)
    tail = np.concatenate([np.full((n, 1), vocab_size - 1), k_tok[r, probe_slot], v_tok[r, probe_slot]], axis=1)
    tail_valid = np.concatenate([np.full((n, 1), not multi_query), k_cols < k_len[r, probe_slot][:, None],
                                 v_cols < v_len[r, probe_slot][:, None]], axis=1)
    tail_labels = np.concatenate([np.full((n, 1 + k_motif_size), IGNORE), v_tok[r, probe_slot]], axis=1)
    tokens = np.concatenate([tokens.reshape(n, -1), tail], axis=1)
    valid = np.concatenate([valid.reshape(n, -1), tail_valid], axis=1)
    labels = np.concatenate([labels.reshape(n, -1), tail_labels], axis=1)

    # Right-align the kept tokens in seq_len + 1 positions, padding the front.
    pos = (seq_len + 1 - valid.sum(axis=1))[:, None] + np.cumsum(valid, axis=1) - 1
    pad = vocab_size - 1 if multi_query else vocab_size - 2
    stream = np.full((n, seq_len + 1), pad, np.int64)
    stream_labels = np.full((n, seq_len + 1), IGNORE, np.int64)
    row_idx = np.broadcast_to(rows, pos.shape)[valid]
    stream[row_idx, pos[valid]] = tokens[valid]
    stream_labels[row_idx, pos[valid]] = labels[valid]
    return _next_token_view(stream, stream_labels, seq_len, dense_targets)


def selective_copying(
    seed: int,
    num_examples: int = 12_800,
    *,
    vocab_size: int = 16,
    seq_len: int = 256,
    num_tokens_to_copy: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """MAD selective copying: copy the non-blank tokens, in order, after a copy token.

    Token ids: ``blank = vocab_size - 2``, ``copy = vocab_size - 1``, content
    ``0 .. vocab_size - 3``. ``num_tokens_to_copy`` uniform content tokens have
    ``seq_len - 2 * num_tokens_to_copy - 1`` blanks inserted before them at uniform
    places (mad-lab's ``np.insert`` at indices ``0 .. num_tokens_to_copy - 1``: each
    blank goes into one of the gaps before a content token, so the last content token
    is right before the copy token); then come the copy token and
    ``num_tokens_to_copy`` blanks. The targets at those last blanks are the content
    tokens in order, :data:`IGNORE` elsewhere. As in mad-lab the label is aligned with
    its position, not shifted: ``targets[:, t]`` is output while reading
    ``inputs[:, t]`` (a blank), which a causal model can do since it has read
    everything to copy by then.

    Defaults (mad-lab ``configs/tasks/selective-copying.yml`` baseline): vocabulary 16,
    length 256, 16 tokens to copy, 12,800 training examples; MAD varies ``vocab_size``
    over 32, 64, 128, ``seq_len`` over 512, 1024, ``num_tokens_to_copy`` over 32, 64, 96
    and ``num_examples`` over 6,400 .. 800.

    Deviation: mad-lab draws the blank positions from numpy's global generator (unseeded);
    here they come from ``seed`` like everything else.

    Args:
        seed: seed of ``np.random.default_rng``.
        num_examples: ``N``.
        vocab_size: token ids are ``0 .. vocab_size - 1``, >= 3.
        seq_len: ``T``, more than ``2 * num_tokens_to_copy + 1``.
        num_tokens_to_copy: content tokens per sequence.

    Returns:
        ``(inputs, targets)``, int32 ``[N, seq_len]``.

    Raises:
        ValueError: if an argument is out of range.
    """
    _check_count(seed, num_examples)
    if num_tokens_to_copy < 1:
        raise ValueError(f"{num_tokens_to_copy=} must be >= 1")
    if seq_len <= 2 * num_tokens_to_copy + 1:
        raise ValueError(f"{seq_len=} too short for {num_tokens_to_copy=}: need seq_len > 2 * num_tokens_to_copy + 1")
    if vocab_size < 3:
        raise ValueError(f"{vocab_size=} must be >= 3 (content tokens, blank, copy token)")

    rng = np.random.default_rng(seed)
    n, m = num_examples, num_tokens_to_copy
    blank, copy = vocab_size - 2, vocab_size - 1
    content = rng.integers(0, vocab_size - 2, size=(n, m))
    blanks_before = rng.multinomial(seq_len - 2 * m - 1, np.full(m, 1.0 / m), size=n)
    positions = np.arange(m) + np.cumsum(blanks_before, axis=1)
    inputs = np.full((n, seq_len), blank, np.int32)
    np.put_along_axis(inputs, positions, content.astype(np.int32), axis=1)
    inputs[:, seq_len - m - 1] = copy
    targets = np.full((n, seq_len), IGNORE, np.int32)
    targets[:, seq_len - m:] = content
    return inputs, targets


def compression(
    seed: int,
    num_examples: int = 12_800,
    *,
    vocab_size: int = 16,
    seq_len: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """MAD compression: squeeze a random sequence into one vector and reconstruct it.

    ``inputs`` are ``seq_len - 1`` uniform tokens from ``0 .. vocab_size - 2`` followed by
    the compression token ``vocab_size - 1``; ``targets`` equal ``inputs`` (the
    compression token included), as mad-lab returns them.

    This is not a next-token task, and a plain causal LM cannot be scored on it:
    ``targets[:, t] == inputs[:, t]``, so reading position ``t`` and emitting it is the
    identity. MAD evaluates it with its autoencoder backbone (``mad/model/auto_encoder.py``):
    run the model over all of ``inputs``, keep only the hidden state at the last
    position (the compression token) as the code, and decode every position ``t`` from
    that one vector plus a position embedding of ``t`` (a small MLP and the unembedding),
    with cross-entropy and accuracy over all ``T`` targets. A causal sequence model is
    the encoder of that setup; its per-position outputs are not used.

    Defaults (mad-lab ``configs/tasks/compression.yml`` baseline): vocabulary 16, length
    32, 12,800 training examples; MAD varies ``vocab_size`` over 32, 64, 128,
    ``seq_len`` over 64, 128, 256 and ``num_examples`` over 6,400 .. 800. mad-lab's
    noise option (off in MAD, and its noise labels are discarded) is left out.

    Args:
        seed: seed of ``np.random.default_rng``.
        num_examples: ``N``.
        vocab_size: token ids are ``0 .. vocab_size - 1``, >= 2.
        seq_len: ``T``, >= 2.

    Returns:
        ``(inputs, targets)``, int32 ``[N, seq_len]``, equal arrays (``targets`` a copy).

    Raises:
        ValueError: if an argument is out of range.
    """
    _check_count(seed, num_examples)
    if vocab_size < 2:
        raise ValueError(f"{vocab_size=} must be >= 2 (tokens and the compression token)")
    if seq_len < 2:
        raise ValueError(f"{seq_len=} must be >= 2 (tokens and the compression token)")
    rng = np.random.default_rng(seed)
    inputs = np.full((num_examples, seq_len), vocab_size - 1, np.int32)
    inputs[:, :-1] = rng.integers(0, vocab_size - 1, size=(num_examples, seq_len - 1))
    return inputs, inputs.copy()


def memorization_mapping(vocab_size: int = 256, mapping_seed: int = 0) -> np.ndarray:
    """The fixed key-to-value map of :func:`memorization`, a function of ``mapping_seed`` only.

    Keys are ``0 .. K - 1`` and values distinct ids from ``K .. vocab_size - 2``,
    ``K = (vocab_size - 1) // 2`` (mad-lab's ``generate_kv_map`` over all ids but the
    insert token: both halves shuffled and zipped, i.e. a random injection).

    Args:
        vocab_size: as in :func:`memorization`, >= 3.
        mapping_seed: seed of the map.

    Returns:
        int64 ``[K]``, the value of each key.

    Raises:
        ValueError: if ``vocab_size < 3``.
    """
    if vocab_size < 3:
        raise ValueError(f"{vocab_size=} must be >= 3 (a key, a value and the insert token)")
    non_special = vocab_size - 1
    num_keys = non_special // 2
    return np.random.default_rng(mapping_seed).permutation(np.arange(num_keys, non_special))[:num_keys]


def memorization(
    seed: int,
    num_examples: int = 256,
    *,
    vocab_size: int = 256,
    seq_len: int = 32,
    mapping_seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """MAD memorization: a fixed key-value map, learnt in the weights, probed by an insert token.

    Each sequence is ``seq_len // 2`` pairs ``k insert`` with ``insert = vocab_size - 1``
    and keys uniform (with repeats) over the keys of :func:`memorization_mapping`; the
    target at the insert token is the key's value, :data:`IGNORE` at keys. As in
    mad-lab the label is aligned with its position: ``targets[:, t]`` is output while
    reading the insert token ``inputs[:, t]``. The map depends on ``mapping_seed``
    only, never on ``seed``, so a test set is ``memorization(other_seed, 1280)`` with the
    training set's ``mapping_seed`` (mad-lab derives both from its one seed, 12345).
    Nothing in a sequence reveals the map: it must be memorised.

    Defaults (mad-lab ``configs/tasks/memorization.yml`` baseline): vocabulary 256,
    length 32, 256 training examples; MAD varies ``vocab_size`` over 512 .. 8192.
    mad-lab's noise option (off in MAD) is left out.

    Args:
        seed: seed of ``np.random.default_rng`` for the key draws.
        num_examples: ``N``.
        vocab_size: token ids are ``0 .. vocab_size - 1``, >= 3.
        seq_len: ``T``, even, >= 2.
        mapping_seed: seed of the key-value map, shared by train and test sets.

    Returns:
        ``(inputs, targets)``, int32 ``[N, seq_len]``.

    Raises:
        ValueError: if an argument is out of range.
    """
    _check_count(seed, num_examples)
    if seq_len < 2 or seq_len % 2:
        raise ValueError(f"{seq_len=} must be even and >= 2 (key, insert token pairs)")
    mapping = memorization_mapping(vocab_size, mapping_seed)
    keys = np.random.default_rng(seed).integers(0, len(mapping), size=(num_examples, seq_len // 2))
    inputs = np.full((num_examples, seq_len), vocab_size - 1, np.int32)
    inputs[:, 0::2] = keys
    targets = np.full((num_examples, seq_len), IGNORE, np.int32)
    targets[:, 1::2] = mapping[keys]
    return inputs, targets


MAD_TASKS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "in-context-recall": in_context_recall,
    "fuzzy-in-context-recall": fuzzy_in_context_recall,
    "noisy-in-context-recall": noisy_in_context_recall,
    "selective-copying": selective_copying,
    "compression": compression,
    "memorization": memorization,
}
"""mad-lab's task names (``mad/registry.py``) to their generators, each called as ``fn(seed)``
for MAD's default training set."""
