"""Linear-scan kernels for GPUs (Pallas Triton lowering).

One program per (batch row, block of ``block_d`` channels) walks the whole
sequence with ``lax.fori_loop``; the state ``h [block_d]`` stays in registers.
Inputs arrive here already padded so that ``block_d`` divides D, and with the
decay zeroed where a segment starts (ops.py). ``block_d`` must be a power of 2.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


# Triton, explicitly: with no compiler params a GPU pallas_call lowers through
# Mosaic GPU when jax_pallas_use_mosaic_gpu is on (the default in jax 0.10),
# and these kernels are written for Triton. 2 warps: one channel of the default
# 64 per thread.
TRITON = plgpu.CompilerParams(num_warps=2, num_stages=1)


def _forward_kernel(x_ref, a_ref, h0_ref, h_ref, final_ref):
    """x, a, h ``[T, block_d]``; h0, final ``[block_d]``."""

    def step(t, h):
        h = a_ref[t, :].astype(jnp.float32) * h + x_ref[t, :].astype(jnp.float32)
        h_ref[t, :] = h.astype(h_ref.dtype)
        return h

    time = x_ref.shape[0]
    final_ref[...] = jax.lax.fori_loop(0, time, step, h0_ref[...])


def _backward_kernel(a_ref, h_ref, h0_ref, dh_ref, dfinal_ref, dx_ref, da_ref, dh0_ref):
    """Reverse-time adjoint: ``g_t = dh_t + a_{t+1} g_{t+1}``, ``da_t = g_t h_{t-1}``."""
    time = a_ref.shape[0]
    h0 = h0_ref[...]

    def step(i, g):
        t = time - 1 - i
        g = g + dh_ref[t, :].astype(jnp.float32)
        h_prev = jnp.where(t > 0, h_ref[jnp.maximum(t - 1, 0), :].astype(jnp.float32), h0)
        dx_ref[t, :] = g.astype(dx_ref.dtype)
        da_ref[t, :] = (g * h_prev).astype(da_ref.dtype)
        return a_ref[t, :].astype(jnp.float32) * g

    dh0_ref[...] = jax.lax.fori_loop(0, time, step, dfinal_ref[...])


def _specs(batch, time, channels, block_d):
    """Grid and the BlockSpecs of ``[B,T,D]`` and ``[B,D]`` arrays."""
    grid = (batch, channels // block_d)
    btd = pl.BlockSpec((None, time, block_d), lambda b, d: (b, 0, d))
    bd = pl.BlockSpec((None, block_d), lambda b, d: (b, d))
    return grid, btd, bd


@functools.partial(jax.jit, static_argnames=("block_d", "interpret"))
def forward(x, a, h0, *, block_d: int, interpret: bool):
    """``(h [B,T,D] x.dtype, h_final [B,D] float32)``; h0 is float32."""
    batch, time, channels = x.shape
    grid, btd, bd = _specs(batch, time, channels, block_d)
    return pl.pallas_call(
        _forward_kernel,
        grid=grid,
        in_specs=[btd, btd, bd],
        out_specs=[btd, bd],
        out_shape=[
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct((batch, channels), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=TRITON,
        name="linear_scan_forward",
    )(x, a, h0)


@functools.partial(jax.jit, static_argnames=("block_d", "interpret"))
def backward(a, h, h0, dh, dfinal, *, block_d: int, interpret: bool):
    """``(dx, da)`` in float32 ``[B,T,D]`` and ``dh0 [B,D]``."""
    batch, time, channels = a.shape
    grid, btd, bd = _specs(batch, time, channels, block_d)
    btd_f32 = jax.ShapeDtypeStruct(a.shape, jnp.float32)
    return pl.pallas_call(
        _backward_kernel,
        grid=grid,
        in_specs=[btd, btd, bd, btd, bd],
        out_specs=[btd, btd, bd],
        out_shape=[btd_f32, btd_f32, jax.ShapeDtypeStruct((batch, channels), jnp.float32)],
        interpret=interpret,
        compiler_params=TRITON,
        name="linear_scan_backward",
    )(a, h, h0, dh, dfinal)
