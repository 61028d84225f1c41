"""The batch format every dataset yields, and packed, resumable text batches.

A dataset is anything with ``batch_size``, ``seq_len``, ``vocab_size`` and a
``batch(step)`` method returning a :class:`Batch` that is a pure function of
the dataset's seed and ``step``: resuming a run at step ``s`` needs nothing
but ``s``, and every process of a multi-host run computes the same global
batch and keeps its own rows. Synthetic tasks (MQAR, MAD) implement the same
protocol.

:class:`PackedText` is a plain numpy loader (no grain): the corpus stream is
cut into windows of ``seq_len + 1`` bytes at a stride of ``seq_len`` (so each
byte is a target once per epoch), each epoch visits the windows in a
permutation drawn from ``(seed, epoch)``, and a window holding several
documents gets one segment id per document.
"""

from __future__ import annotations

from typing import Protocol, TypedDict

import numpy as np

from effarch.data.text import VOCAB_SIZE, Corpus


class Batch(TypedDict):
    """One global batch; every entry is ``[B,T]``.

    Attributes:
      tokens: ``int32`` model inputs.
      targets: ``int32`` next tokens, ``targets[:, t]`` follows ``tokens[:, t]``.
      segment_ids: ``int32`` document index within the row; the model must not
        mix information across a change of id.
      loss_mask: ``float32`` 1 where the target counts towards the loss, 0 where
        it belongs to another segment than its input.
    """

    tokens: np.ndarray
    targets: np.ndarray
    segment_ids: np.ndarray
    loss_mask: np.ndarray


BATCH_KEYS = ("tokens", "targets", "segment_ids", "loss_mask")


class Dataset(Protocol):
    """What the training loop needs of a data source."""

    batch_size: int
    seq_len: int
    vocab_size: int

    def batch(self, step: int) -> Batch:
        """The global batch of training step ``step``, a pure function of (seed, step)."""


def check_batch(batch: Batch, batch_size: int, seq_len: int) -> None:
    """Raises ValueError unless ``batch`` has the four ``[B,T]`` entries."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}; expected keys {BATCH_KEYS}.")
    for key in BATCH_KEYS:
        if tuple(batch[key].shape) != (batch_size, seq_len):
            shapes = {k: tuple(batch[k].shape) for k in BATCH_KEYS}
            raise ValueError(f"batch shapes {shapes}; expected every entry [B,T] = [{batch_size},{seq_len}].")


class PackedText:
    """Windows of a byte (or token-id) stream, packed with segment ids, in a seeded order per epoch.

    Attributes:
      batch_size: rows B per batch.
      seq_len: tokens T per row.
      vocab_size: 256 for bytes, or the tokenizer's for a token-id corpus.
      num_windows: windows per epoch.
    """

    def __init__(self, corpus: Corpus, *, batch_size: int, seq_len: int, seed: int, shuffle: bool = True,
                 vocab_size: int | None = None):
        """Args:
          corpus: the documents (bytes, or token ids from ``effarch.data.tokenize``).
          batch_size: rows B per batch.
          seq_len: tokens T per row.
          seed: seeds the window order of every epoch.
          shuffle: visit windows in a seeded permutation per epoch (training);
            False visits them in stream order (evaluation).
          vocab_size: the vocabulary of a token-id corpus (required there); a
            byte corpus's is 256.
        """
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"{batch_size=}, {seq_len=}; expected positive ints.")
        if corpus.is_bytes:
            if vocab_size not in (None, VOCAB_SIZE):
                raise ValueError(f"PackedText: vocab_size={vocab_size} for a byte corpus; bytes have {VOCAB_SIZE}.")
            vocab_size = VOCAB_SIZE
        elif vocab_size is None or vocab_size <= int(corpus.data.max()):
            raise ValueError(f"PackedText: vocab_size={vocab_size} for a token-id corpus whose largest id is "
                             f"{int(corpus.data.max())}; pass the tokenizer's vocabulary size.")
        self.vocab_size = vocab_size
        if len(corpus.data) < seq_len + 1:
            raise ValueError(f"corpus of {len(corpus.data)} bytes is shorter than one window of seq_len + 1 = {seq_len + 1}.")
        self.corpus = corpus
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.num_windows = (len(corpus.data) - 1) // seq_len
        self._last_order: tuple[int, np.ndarray | None] = (-1, None)

    def _order(self, epoch: int) -> np.ndarray:
        """Window indices in the order epoch ``epoch`` visits them (the last epoch's is kept)."""
        if not self.shuffle:
            return np.arange(self.num_windows)
        if self._last_order[0] != epoch:
            self._last_order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_windows))
        return self._last_order[1]

    def windows(self, step: int) -> np.ndarray:
        """Window indices ``[B]`` of batch ``step``."""
        if step < 0:
            raise ValueError(f"{step=}; expected >= 0.")
        flat = step * self.batch_size + np.arange(self.batch_size)
        epochs, positions = np.divmod(flat, self.num_windows)
        return np.array([self._order(int(e))[p] for e, p in zip(epochs, positions)])

    def batch(self, step: int) -> Batch:
        """The batch of step ``step``: a pure function of (corpus, seed, step)."""
        starts = self.windows(step)[:, None] * self.seq_len
        pos = starts + np.arange(self.seq_len + 1)  # [B, T+1]
        rows = self.corpus.data[pos].astype(np.int32)
        doc = np.searchsorted(self.corpus.doc_starts, pos, side="right") - 1  # [B, T+1]
        return Batch(
            tokens=rows[:, :-1],
            targets=rows[:, 1:],
            segment_ids=(doc[:, :-1] - doc[:, :1]).astype(np.int32),
            loss_mask=(doc[:, 1:] == doc[:, :-1]).astype(np.float32),
        )
