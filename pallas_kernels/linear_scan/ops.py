"""Public linear-scan kernel: shape checks, padding, custom_vjp, dispatch.

``h_t = a_t * h_{t-1} + x_t`` per channel. The forward kernel writes h (which
the caller keeps anyway) and the final state; the backward kernel runs the
adjoint recurrence in reverse time and reads ``h_{t-1}`` from the saved h, so
nothing beyond the ``[B,T,D]`` output is stored. Segment starts are folded into
the decay (``a = 0`` there) before the kernel, so the kernels never see ids.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from effarch.op_contract import check_linear_scan_inputs, pad_to_multiple, segment_starts
from pallas_kernels import _platform
from pallas_kernels.linear_scan import gpu, tpu


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes(_platform.ScanBlockSizes):
    """Tiling of the linear-scan kernels (see ``ScanBlockSizes``): ``block_d``
    channels per GPU program, ``chunk`` time rows per TPU grid step."""

    block_d: int = 64
    chunk: int = 256


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Config(_platform.KernelConfig):
    """Static choices of one call: the target and its block sizes."""

    BACKENDS = {"gpu": gpu, "tpu": tpu}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(config: _Config, x, a, h0):
    return _scan_fwd(config, x, a, h0)[0]


def _scan_fwd(config, x, a, h0):
    h, final = config.kernels.forward(x, a, h0, **config.static)
    return (h, final), (a, h, h0)


def _scan_bwd(config, residuals, cotangents):
    a, h, h0 = residuals
    dh, dfinal = cotangents
    dx, da, dh0 = config.kernels.backward(a, h, h0, dh, dfinal.astype(jnp.float32),
                                          **config.static)
    return dx.astype(h.dtype), da.astype(a.dtype), dh0


_scan.defvjp(_scan_fwd, _scan_bwd)


def linear_scan(
    x,
    a,
    *,
    initial_state=None,
    segment_ids=None,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
):
    """Pallas ``h_t = a_t * h_{t-1} + x_t``, differentiable in x, a and initial_state.

    Args:
      x, a: ``[B,T,D]``.
      initial_state: optional ``[B,D]``.
      segment_ids: optional ``[B,T]`` int; the state restarts from zero where
        the id changes.
      block_sizes: tiling; defaults to ``BlockSizes()``.
      backend, interpret: kernel choice, see ``pallas_kernels._platform.resolve_target``.

    Returns:
      ``(h [B,T,D] in x's dtype, h_final [B,D] float32)``.
    """
    batch, time, channels = x.shape
    check_linear_scan_inputs(x, a, initial_state, segment_ids)
    target = _platform.resolve_target(backend, interpret)
    config = _Config(target=target, block_sizes=(block_sizes or BlockSizes()).for_target(target))
    reset = segment_starts(segment_ids, batch, time)  # [B,T]
    a = jnp.where(reset[..., None], jnp.zeros((), a.dtype), a)
    if initial_state is None:
        h0 = jnp.zeros((batch, channels), jnp.float32)
    else:
        h0 = initial_state.astype(jnp.float32)
    block_d = config.block_sizes.block_d
    chunk = 1 if target.backend == "gpu" else config.block_sizes.chunk  # GPU: whole rows of T
    # Padded steps have x = 0, a = 1: the state passes through unchanged.
    x_p = pad_to_multiple(pad_to_multiple(x, block_d, axis=2), chunk, axis=1)
    a_p = pad_to_multiple(pad_to_multiple(a, block_d, axis=2), chunk, axis=1, value=1)
    h, final = _scan(config, x_p, a_p, pad_to_multiple(h0, block_d, axis=1))
    return h[:, :time, :channels], final[:, :channels]
