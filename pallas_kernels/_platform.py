"""Which Pallas kernel runs, whether it is interpreted, and the static config of a call.

On a GPU the GPU kernel compiles; on a TPU the TPU kernel compiles. On a CPU the
kernels run in interpret mode so anyone can check them without hardware: the
GPU kernel by default, the TPU kernel's interpreter when the environment
variable ``EFFARCH_PALLAS_INTERPRET=tpu`` is set (or ``backend="tpu"`` is
passed to a kernel's ``ops`` function).

``lowering_for(backend)`` compiles the real kernels for a platform this machine
lacks, for ahead-of-time lowering (``jax.export``, ``Traced.lower(
lowering_platforms=...)``, compile-only TPU topologies): see
``benchmarks/compile_check.py``.

Every op's ``ops.py`` holds its static choices in a :class:`KernelConfig`
(the target, the op's ``BlockSizes`` as that target tiles them, the op's
static arguments) and calls ``config.kernels.forward`` / ``backward``: the
same functions, by name and signature, in the op's ``gpu.py`` and ``tpu.py``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from types import ModuleType
from typing import Any, ClassVar

import jax

from pallas_kernels._tpu import LANES

ENV_VAR = "EFFARCH_PALLAS_INTERPRET"
BACKENDS = ("gpu", "tpu")
_LOWERING_FOR = contextvars.ContextVar("effarch_pallas_lowering_for", default=None)


@contextlib.contextmanager
def lowering_for(backend: str):
    """Within the block, kernels compile for ``backend`` whatever the local platform.

    Only for lowering ahead of time for an accelerator this machine lacks; a
    kernel called eagerly inside the block would fail to run here.

    Args:
      backend: ``"gpu"`` or ``"tpu"``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}.")
    token = _LOWERING_FOR.set(backend)
    try:
        yield
    finally:
        _LOWERING_FOR.reset(token)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelTarget:
    """Resolved kernel choice.

    Attributes:
      backend: ``"gpu"`` (Pallas Triton / Mosaic GPU kernel) or ``"tpu"`` (Mosaic TPU).
      interpret: run the kernel in Pallas interpret mode (CPU).
    """

    backend: str
    interpret: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScanBlockSizes:
    """Tiling shared by the scan kernels (each op's ``BlockSizes`` sets its defaults).

    Attributes:
      block_d: channels per GPU program (a power of 2; the TPU kernels always
        use 128 lanes).
      chunk: time rows per TPU grid step, and for the selective scan the steps
        between state checkpoints (a positive multiple of 8).
    """

    block_d: int
    chunk: int

    def __post_init__(self):
        block_d = self.block_d
        if not isinstance(block_d, int) or block_d < 1 or block_d & (block_d - 1):
            raise ValueError(f"block_d={self.block_d!r} must be a power of 2.")
        if not isinstance(self.chunk, int) or self.chunk < 8 or self.chunk % 8:
            raise ValueError(f"chunk={self.chunk!r} must be a positive multiple of 8.")

    def for_target(self, target: KernelTarget):
        """The sizes the target's kernels tile with: the TPU kernels take ``LANES`` channels."""
        return self if target.backend == "gpu" else dataclasses.replace(self, block_d=LANES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelConfig:
    """Static choices of one kernel call (hashable: a ``custom_vjp`` nondiff argument).

    Each op subclasses it as ``ops._Config``, naming its kernel modules in
    ``BACKENDS`` and adding its own static arguments as fields; the op then
    calls ``config.kernels.forward(*arrays, **config.static)`` (and backward).

    Attributes:
      target: which kernel runs, and whether it is interpreted.
      block_sizes: the op's ``BlockSizes`` as the target's kernels tile them
        (``BlockSizes.for_target``).
    """

    BACKENDS: ClassVar[dict[str, ModuleType]] = {}

    target: KernelTarget
    block_sizes: Any

    @property
    def kernels(self) -> ModuleType:
        """The module (``gpu`` or ``tpu``) whose ``forward`` and ``backward`` run."""
        return self.BACKENDS[self.target.backend]

    @property
    def static(self) -> dict:
        """The keyword arguments of those kernels: every field but ``target``, and ``interpret``."""
        fields = dataclasses.fields(self)
        return {**{f.name: getattr(self, f.name) for f in fields if f.name != "target"},
                "interpret": self.target.interpret}


def resolve_target(backend: str | None = None, interpret: bool | None = None) -> KernelTarget:
    """Chooses the kernel for the current platform.

    Args:
      backend: ``None`` (by platform), ``"gpu"`` or ``"tpu"``.
      interpret: ``None`` (interpret only on CPU), or forced.
    """
    platform = _LOWERING_FOR.get() or jax.default_backend()
    if backend is None:
        if platform in BACKENDS:
            backend = platform
        else:
            backend = os.environ.get(ENV_VAR, "gpu").strip().lower() or "gpu"
            if backend not in BACKENDS:
                raise ValueError(
                    f"{ENV_VAR}={os.environ[ENV_VAR]!r}; expected one of {BACKENDS}."
                )
    elif backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected None or one of {BACKENDS}.")
    if interpret is None:
        interpret = platform != backend
    if not interpret and platform != backend:
        raise ValueError(
            f"the {backend} kernel cannot compile on platform {platform!r}; "
            "pass interpret=True (or leave interpret=None)."
        )
    return KernelTarget(backend=backend, interpret=interpret)
