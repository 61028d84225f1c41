"""Shared pieces of every op: input checks, implementation choice, segments.

Ops never import kernels at module level; ``"pallas"`` is resolved here, in one
place, so layers stay free of grids and BlockSpecs (docs/design.md §2).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

_log = logging.getLogger("effarch.ops")

# Every implementation name any op accepts; each op supports a subset.
IMPLEMENTATIONS = ("auto", "recurrent", "quadratic", "chunked", "pallas", "xla", "cudnn")

# Log-space exponent used for masked-out entries: exp(MASKED_LOG) == 0 exactly,
# and its gradient is 0, unlike masking after the exp (0 * inf = nan).
MASKED_LOG = -jnp.inf


def platform() -> str:
    """The default backend's platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``."""
    return jax.default_backend()


def describe(name: str, x) -> str:
    """``"q: shape (2, 8, 4, 16) float32"``, for error messages."""
    return f"{name}: shape {tuple(x.shape)} {jnp.dtype(x.dtype).name}"


def check_rank(name: str, x, rank: int, form: str) -> None:
    """Raises ValueError unless ``x.ndim == rank``; ``form`` is e.g. ``"[B,T,H,K]"``."""
    if x.ndim != rank:
        raise ValueError(f"{describe(name, x)}; expected rank {rank}, {name} {form}.")


def check_dims(op: str, expected: dict[str, int], **arrays_and_dims) -> None:
    """Checks named axis sizes agree across arrays.

    ``arrays_and_dims`` maps an array name to ``(array, form)`` where ``form``
    is the axis letters, e.g. ``"BTHK"``. ``expected`` is filled with the first
    size seen for each letter; a later mismatch raises a ValueError naming every
    array involved.
    """
    for name, (x, form) in arrays_and_dims.items():
        if x is None:
            continue
        check_rank(name, x, len(form), "[" + ",".join(form) + "]")
        for letter, size in zip(form, x.shape):
            if letter == "_":
                continue
            if expected.setdefault(letter, size) != size:
                shapes = ", ".join(
                    f"{n} {tuple(a.shape)} as [{','.join(f)}]"
                    for n, (a, f) in arrays_and_dims.items()
                    if a is not None
                )
                raise ValueError(
                    f"{op}: axis {letter} of {name} is {size} but an earlier input "
                    f"has {letter}={expected[letter]}; got {shapes}."
                )


def check_segment_ids(segment_ids, batch: int, time: int) -> None:
    """segment_ids must be an integer ``[B,T]`` array matching the inputs."""
    if segment_ids is None:
        return
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(
            f"{describe('segment_ids', segment_ids)}; expected an integer array "
            f"[B,T] = [{batch},{time}]."
        )
    if tuple(segment_ids.shape) != (batch, time):
        raise ValueError(
            f"{describe('segment_ids', segment_ids)}; expected [B,T] = [{batch},{time}]."
        )


def check_implementation(op: str, implementation: str, supported: Sequence[str]) -> None:
    """Unknown names list the valid ones; known but unsupported ones say so."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{op}: unknown implementation={implementation!r}; valid: "
            f"{', '.join(repr(s) for s in supported)}."
        )
    if implementation not in supported:
        raise NotImplementedError(
            f"{op} has no implementation={implementation!r}; it supports "
            f"{', '.join(repr(s) for s in supported)}."
        )


@functools.cache
def log_once(message: str) -> None:
    """Logs ``message`` once per process (for 'auto' fallbacks)."""
    _log.warning(message)


# Platforms on which each op's Pallas kernel has been compiled, checked and
# measured faster than its XLA chunked form; "auto" picks "pallas" only there.
# Empty: the kernels are verified in interpret mode only so far (no GPU/TPU run).
VERIFIED_KERNELS: dict[str, tuple[str, ...]] = {}


def auto_chunked_until_kernel_verified(op: str) -> Callable[[str], str]:
    """The ``auto`` policy of an op with XLA ``"chunked"`` and ``"pallas"`` forms.

    Returns ``"pallas"`` on platforms listed in ``VERIFIED_KERNELS[op]``, else
    ``"chunked"``, logging once on a GPU/TPU why the kernel was not chosen.
    """

    def auto(platform_name: str) -> str:
        if platform_name in VERIFIED_KERNELS.get(op, ()):
            return "pallas"
        if platform_name in ("gpu", "tpu"):
            log_once(
                f"{op}(implementation='auto') uses the XLA chunked form on {platform_name}: "
                "its Pallas kernel is verified in interpret mode only; pass "
                "implementation='pallas' to use it.")
        return "chunked"

    return auto


def resolve_implementation(
    op: str,
    implementation: str,
    supported: Sequence[str],
    auto: Callable[[str], str],
) -> str:
    """Validates ``implementation`` and resolves ``"auto"`` by platform.

    Args:
      op: the op's name, for messages.
      implementation: what the caller asked for.
      supported: the names this op accepts (``"auto"`` included).
      auto: maps the platform (``"cpu"``, ``"gpu"``, ``"tpu"``) to a concrete name.
    """
    check_implementation(op, implementation, supported)
    if implementation == "auto":
        return auto(platform())
    return implementation


def reset_index(segment_ids, batch: int, time: int) -> jax.Array:
    """Number of segment starts up to and including each step, ``[B,T]`` int32.

    Position 0 never counts as a reset (``initial_state`` feeds the first
    segment). Two steps t >= s see each other through the recurrence iff
    ``reset_index[t] == reset_index[s]``; ids may repeat non-contiguously.
    """
    if segment_ids is None:
        return jnp.zeros((batch, time), jnp.int32)
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]  # [B, T-1]
    changed = jnp.concatenate([jnp.zeros((batch, 1), bool), changed], axis=1)
    return jnp.cumsum(changed.astype(jnp.int32), axis=1)


def segment_starts(segment_ids, batch: int, time: int) -> jax.Array:
    """``[B,T]`` bool, True where a new segment starts (never at t = 0)."""
    if segment_ids is None:
        return jnp.zeros((batch, time), bool)
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros((batch, 1), bool), changed], axis=1)


def pad_time(x, multiple: int, axis: int = 1, value=0):
    """Pads ``axis`` of ``x`` up to a multiple of ``multiple`` with ``value``."""
    if x is None:
        return None
    pad = -x.shape[axis] % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def pad_segment_ids(segment_ids, multiple: int):
    """Pads ``[B,T]`` ids by repeating the last id, so padding starts no segment."""
    pad = -segment_ids.shape[1] % multiple
    if pad == 0:
        return segment_ids
    return jnp.pad(segment_ids, ((0, 0), (0, pad)), mode="edge")


def segsum(x: jax.Array) -> jax.Array:
    """Stable segment sums along the last axis: ``out[..., t, s] = sum x[..., s+1:t+1]``.

    Entries with ``s > t`` are ``MASKED_LOG``. Summing a masked copy (rather than
    differencing one long cumsum) keeps full float32 precision when the
    cumulative log decay is large (Mamba-2, "segsum").

    Args:
      x: ``[..., T]`` log decays.
    Returns:
      ``[..., T, T]`` with rows t and columns s.
    """
    t = x.shape[-1]
    rep = jnp.broadcast_to(x[..., :, None], (*x.shape[:-1], t, t))  # [..., r, s] = x[r]
    strictly_lower = jnp.tril(jnp.ones((t, t), bool), -1)  # r > s
    # out[t, s] = sum_{r=s+1..t} x[r]: cumsum over r of x[r] masked to r > s.
    out = jnp.cumsum(jnp.where(strictly_lower, rep, 0.0), axis=-2)  # [..., t, s]
    lower = jnp.tril(jnp.ones((t, t), bool))
    return jnp.where(lower, out, MASKED_LOG)
