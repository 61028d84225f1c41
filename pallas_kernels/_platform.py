"""Which Pallas kernel runs, and whether it is interpreted.

On a GPU the GPU kernel compiles; on a TPU the TPU kernel compiles. On a CPU the
kernels run in interpret mode so anyone can check them without hardware: the
GPU kernel by default, the TPU kernel's interpreter when the environment
variable ``EFFARCH_PALLAS_INTERPRET=tpu`` is set (or ``backend="tpu"`` is
passed to a kernel's ``ops`` function).
"""

from __future__ import annotations

import dataclasses
import os

import jax

ENV_VAR = "EFFARCH_PALLAS_INTERPRET"
BACKENDS = ("gpu", "tpu")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelTarget:
    """Resolved kernel choice.

    Attributes:
      backend: ``"gpu"`` (Pallas Triton / Mosaic GPU kernel) or ``"tpu"`` (Mosaic TPU).
      interpret: run the kernel in Pallas interpret mode (CPU).
    """

    backend: str
    interpret: bool


def resolve_target(backend: str | None = None, interpret: bool | None = None) -> KernelTarget:
    """Chooses the kernel for the current platform.

    Args:
      backend: ``None`` (by platform), ``"gpu"`` or ``"tpu"``.
      interpret: ``None`` (interpret only on CPU), or forced.
    """
    platform = jax.default_backend()
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
