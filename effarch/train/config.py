"""The training run's configuration: one frozen dataclass, validated when built."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from effarch.data import DEFAULT_CORPUS

# Mesh axes, in order; a mesh shape gives one size per axis (-1: the rest).
MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to train: data, optimiser, schedule, bookkeeping and the device mesh.

    Attributes:
      steps: optimiser updates in the whole run.
      batch_size: global rows B per update (summed over devices and microbatches).
      seq_len: tokens T per row.
      grad_accum: microbatches per update; ``batch_size / grad_accum`` rows go
        through the model at once and gradients are summed in float32.
      lr: peak learning rate, reached after ``warmup_steps``.
      warmup_steps: linear warmup from 0 to ``lr``.
      min_lr_ratio: the cosine decay ends at ``lr * min_lr_ratio`` at ``steps``.
      weight_decay: AdamW decoupled decay, applied to parameters of rank >= 2
        (matrices, embeddings), not to norms, biases or per-channel vectors.
      b1, b2, eps: AdamW moments.
      grad_clip: clip gradients to this global norm; 0 disables clipping.
      seed: seeds parameters, the data order and any dropout-style randomness.
      data: ``("stdlib",)`` (Python's standard library sources) or files and folders.
      max_corpus_bytes: cap on the corpus read (``None``: all of it).
      eval_fraction: share of documents held out for evaluation.
      log_every: write a metrics line every this many steps (and at step 1 and the end).
      eval_every: evaluate on the held-out split every this many steps (0: only at the end).
      eval_batches: batches per evaluation (0: no evaluation).
      ckpt_every: save a checkpoint every this many steps (0: only at the end).
      keep_checkpoints: how many recent checkpoints to keep.
      mesh: sizes of the ``("data", "fsdp", "tensor")`` mesh axes; one may be -1.
    """

    # Fields that may change when a run resumes: they do not alter its trajectory.
    RESUMABLE_CHANGES: ClassVar[frozenset[str]] = frozenset(
        {"log_every", "eval_every", "eval_batches", "ckpt_every", "keep_checkpoints", "mesh"}
    )

    steps: int
    batch_size: int
    seq_len: int
    grad_accum: int = 1
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    data: tuple[str, ...] = (DEFAULT_CORPUS,)
    max_corpus_bytes: int | None = None
    eval_fraction: float = 0.05
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 8
    ckpt_every: int = 0
    keep_checkpoints: int = 3
    mesh: tuple[int, int, int] = (-1, 1, 1)

    def __post_init__(self):
        positive = ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "keep_checkpoints")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainConfig.{name}={value!r}; expected a positive int.")
        for name in ("warmup_steps", "eval_every", "eval_batches", "ckpt_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name}={value!r}; expected an int >= 0.")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"TrainConfig.batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}; "
                "each microbatch takes batch_size / grad_accum rows."
            )
        if self.warmup_steps >= self.steps:
            raise ValueError(f"TrainConfig.warmup_steps={self.warmup_steps} must be below steps={self.steps}.")
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig lr={self.lr}, min_lr_ratio={self.min_lr_ratio}; expected lr > 0, ratio in [0, 1].")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"TrainConfig weight_decay={self.weight_decay}, grad_clip={self.grad_clip}; expected >= 0.")
        if not self.data or isinstance(self.data, str):
            raise ValueError(f"TrainConfig.data={self.data!r}; expected a non-empty tuple of paths or ('stdlib',).")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"TrainConfig.eval_fraction={self.eval_fraction}; expected a number in (0, 1).")
        if len(self.mesh) != len(MESH_AXES) or sum(s == -1 for s in self.mesh) > 1 or any(
            s == 0 or s < -1 for s in self.mesh
        ):
            raise ValueError(
                f"TrainConfig.mesh={self.mesh}; expected {len(MESH_AXES)} sizes for {MESH_AXES}, "
                "each positive, at most one -1 (the rest of the devices)."
            )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
