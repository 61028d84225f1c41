"""Packed text batches: targets, segment ids, loss mask, and an order that is a function of (seed, step)."""

import numpy as np
import pytest

from effarch import data


def _corpus():
    rng = np.random.default_rng(0)
    docs = [bytes(rng.integers(1, 256, size=n, dtype=np.uint8)) for n in (5, 40, 3, 77, 1, 130, 9, 60)]
    return data.from_documents(docs, [f"d{i}" for i in range(len(docs))])


def test_batch_layout():
    corpus = _corpus()
    ds = data.PackedText(corpus, batch_size=3, seq_len=17, seed=0)
    batch = ds.batch(2)
    data.check_batch(batch, 3, 17)
    assert batch["tokens"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
    for row, window in enumerate(ds.windows(2)):
        stream = corpus.data[window * 17 : window * 17 + 18]
        np.testing.assert_array_equal(batch["tokens"][row], stream[:-1])
        np.testing.assert_array_equal(batch["targets"][row], stream[1:])
        # A new segment starts at every separator; the loss ignores targets that are separators.
        starts = np.flatnonzero(stream[:-1] == data.SEPARATOR)
        changes = np.flatnonzero(np.diff(batch["segment_ids"][row])) + 1
        np.testing.assert_array_equal(changes, starts[starts > 0])
        assert batch["segment_ids"][row, 0] == 0
        np.testing.assert_array_equal(batch["loss_mask"][row], stream[1:] != data.SEPARATOR)


def test_order_is_a_pure_function_of_seed_and_step():
    corpus = _corpus()
    a = data.PackedText(corpus, batch_size=4, seq_len=8, seed=3)
    b = data.PackedText(corpus, batch_size=4, seq_len=8, seed=3)
    for step in (7, 0, 31, 7):
        for key in data.BATCH_KEYS:
            np.testing.assert_array_equal(a.batch(step)[key], b.batch(step)[key])
    other = data.PackedText(corpus, batch_size=4, seq_len=8, seed=4)
    assert not all(np.array_equal(a.windows(s), other.windows(s)) for s in range(5))


@pytest.mark.parametrize("batch_size", [1, 5, 41], ids=lambda b: f"B{b}")
def test_each_epoch_visits_every_window_once(batch_size):
    ds = data.PackedText(_corpus(), batch_size=batch_size, seq_len=8, seed=1)
    n = ds.num_windows
    steps = -(-3 * n // batch_size)
    flat = np.concatenate([ds.windows(s) for s in range(steps)])[: 3 * n]
    for epoch in range(3):
        np.testing.assert_array_equal(np.sort(flat[epoch * n : (epoch + 1) * n]), np.arange(n))
    assert not np.array_equal(flat[:n], flat[n : 2 * n])


def test_unshuffled_order_is_the_stream_order():
    ds = data.PackedText(_corpus(), batch_size=4, seq_len=8, seed=9, shuffle=False)
    np.testing.assert_array_equal(ds.windows(1), [4, 5, 6, 7])


def test_errors():
    corpus = data.from_documents([b"short"], ["s"])
    with pytest.raises(ValueError, match="shorter than one window"):
        data.PackedText(corpus, batch_size=1, seq_len=16, seed=0)
    ds = data.PackedText(_corpus(), batch_size=2, seq_len=8, seed=0)
    with pytest.raises(ValueError, match="step=-1"):
        ds.batch(-1)
    with pytest.raises(ValueError, match=r"expected every entry \[B,T\] = \[2,9\]"):
        data.check_batch(ds.batch(0), 2, 9)
    with pytest.raises(ValueError, match="lacks"):
        data.check_batch({"tokens": np.zeros((2, 8))}, 2, 8)
