"""Public selective-scan kernel: shape checks, padding, custom_vjp, dispatch.

The forward kernel keeps the state in registers/VMEM and writes y, the final
state, and the state at the start of every chunk of ``BlockSizes.chunk`` steps.
The backward kernel recomputes each chunk's states from its checkpoint and runs
the adjoint recurrence backwards through it, so activation memory is
``O(B*T*D + B*D*N*T/chunk)``: ``[B,T,D,N]`` is never stored.
Segment starts enter the kernels as ``keep [B,T]`` (0 where the state restarts).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from effarch.op_contract import check_selective_scan_inputs, pad_to_multiple, segment_starts
from pallas_kernels import _platform
from pallas_kernels.selective_scan import gpu, tpu


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes(_platform.ScanBlockSizes):
    """Tiling of the selective-scan kernels (see ``ScanBlockSizes``): ``block_d``
    channels per GPU program, ``chunk`` steps between state checkpoints (the
    backward recomputes one chunk at a time; on TPU also the rows per grid step)."""

    block_d: int = 32
    chunk: int = 64


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Config(_platform.KernelConfig):
    """Static choices of one call: the target, its block sizes, and ``dt_softplus``."""

    BACKENDS = {"gpu": gpu, "tpu": tpu}

    dt_softplus: bool


ARG_NAMES = ("x", "dt", "z", "A", "dt_bias", "D", "B", "C", "onehot", "keep", "initial_state")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(config: _Config, x, dt, z, A, dt_bias, D, B, C, onehot, keep, h0):
    return _scan_fwd(config, x, dt, z, A, dt_bias, D, B, C, onehot, keep, h0)[0]


def _scan_fwd(config, x, dt, z, A, dt_bias, D, B, C, onehot, keep, h0):
    y, final, checkpoints = config.kernels.forward(x, dt, z, A, dt_bias, D, B, C, onehot, keep,
                                                   h0, **config.static)
    return (y, final), (x, dt, z, A, dt_bias, D, B, C, onehot, keep, h0, checkpoints)


def _scan_bwd(config, residuals, cotangents):
    *inputs, h0, checkpoints = residuals
    dy, dfinal = cotangents
    grads = config.kernels.backward(*inputs, checkpoints, dy, dfinal.astype(jnp.float32),
                                    **config.static)
    grads.update(onehot=jnp.zeros_like(inputs[8]), keep=jnp.zeros_like(inputs[9]))
    primals = dict(zip(ARG_NAMES, (*inputs, h0)))
    return tuple(
        None if primals[n] is None else grads[n].astype(primals[n].dtype) for n in ARG_NAMES
    )


_scan.defvjp(_scan_fwd, _scan_bwd)


def _float32(v, shape):
    """v in float32, or float32 zeros of ``shape`` when v is None."""
    return jnp.zeros(shape, jnp.float32) if v is None else v.astype(jnp.float32)


def selective_scan(
    x, dt, A, B, C, D=None, z=None, *, dt_bias=None, dt_softplus: bool = True,
    initial_state=None, segment_ids=None, block_sizes: BlockSizes | None = None,
    backend: str | None = None, interpret: bool | None = None,
):
    """Pallas Mamba-1 selective scan, differentiable in every array argument.

    Arguments and semantics as ``effarch.ops.selective_scan`` (x, dt, z
    ``[B,T,D]``; A ``[D,N]``; B, C ``[B,T,G,N]``; D, dt_bias ``[D]``;
    initial_state ``[B,D,N]``; segment_ids ``[B,T]`` int), plus:
      block_sizes: tiling; defaults to ``BlockSizes()``.
      backend, interpret: kernel choice, see ``pallas_kernels._platform.resolve_target``.

    Returns:
      ``(y [B,T,D] in x's dtype, h_final [B,D,N] float32)``.
    """
    dims = check_selective_scan_inputs(x, dt, A, B, C, D, z, dt_bias, initial_state,
                                       segment_ids)
    batch, time, channels, state, groups = (dims[k] for k in "BTDNG")
    target = _platform.resolve_target(backend, interpret)
    config = _Config(target=target, block_sizes=(block_sizes or BlockSizes()).for_target(target),
                     dt_softplus=dt_softplus)
    keep = 1.0 - segment_starts(segment_ids, batch, time).astype(jnp.float32)
    group = jnp.arange(channels) // (channels // groups)
    onehot = (group[:, None] == jnp.arange(groups)).astype(jnp.float32)  # [D,G]
    A, dt_bias, D = _float32(A, A.shape), _float32(dt_bias, (channels,)), _float32(D, (channels,))
    initial_state = _float32(initial_state, (batch, channels, state))
    # Padded channels have x = 0, A = 0 and no group: their state stays zero.
    pad_d = functools.partial(pad_to_multiple, multiple=config.block_sizes.block_d)
    # Triton tiles want power-of-2 sides: the GPU kernel gets N padded with
    # B = C = 0 and A = 0, so padded state entries stay zero and reach no output.
    state_p = 1 << (state - 1).bit_length() if target.backend == "gpu" else state
    pad_n = functools.partial(pad_to_multiple, multiple=state_p, axis=-1)
    y, final = _scan(
        config, pad_d(x, axis=2), pad_d(dt, axis=2), pad_d(z, axis=2),
        pad_n(pad_d(A, axis=0)), pad_d(dt_bias, axis=0), pad_d(D, axis=0), pad_n(B), pad_n(C),
        pad_d(onehot, axis=0), keep, pad_n(pad_d(initial_state, axis=1)),
    )
    return y[..., :channels], final[:, :channels, :state]
