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

from pallas_kernels._call import call


# Triton, explicitly: with no compiler params a GPU pallas_call lowers through
# Mosaic GPU when jax_pallas_use_mosaic_gpu is on (the default in jax 0.10),
# and these kernels are written for Triton. 2 warps: one channel of the default
# 64 per thread.
TRITON = plgpu.CompilerParams(num_warps=2, num_stages=1)


def _forward_kernel(refs):
    """x, a, h ``[T, block_d]``; h0, final ``[block_d]``."""
    x_ref, a_ref, h_ref = refs["x"], refs["a"], refs["h"]

    def step(t, h):
        h = a_ref[t, :].astype(jnp.float32) * h + x_ref[t, :].astype(jnp.float32)
        h_ref[t, :] = h.astype(h_ref.dtype)
        return h

    time = x_ref.shape[0]
    refs["final"][...] = jax.lax.fori_loop(0, time, step, refs["h0"][...])


def _backward_kernel(refs):
    """Reverse-time adjoint: ``g_t = dh_t + a_{t+1} g_{t+1}``, ``da_t = g_t h_{t-1}``."""
    a_ref, h_ref, dh_ref = refs["a"], refs["h"], refs["dh"]
    time = a_ref.shape[0]
    h0 = refs["h0"][...]

    def step(i, g):
        t = time - 1 - i
        g = g + dh_ref[t, :].astype(jnp.float32)
        h_prev = jnp.where(t > 0, h_ref[jnp.maximum(t - 1, 0), :].astype(jnp.float32), h0)
        refs["dx"][t, :] = g.astype(refs["dx"].dtype)
        refs["da"][t, :] = (g * h_prev).astype(refs["da"].dtype)
        return a_ref[t, :].astype(jnp.float32) * g

    refs["dh0"][...] = jax.lax.fori_loop(0, time, step, refs["dfinal"][...])


def _specs(batch, time, channels, block_d):
    """Grid and the BlockSpecs of ``[B,T,D]`` and ``[B,D]`` arrays."""
    grid = (batch, channels // block_d)
    btd = pl.BlockSpec((None, time, block_d), lambda b, d: (b, 0, d))
    bd = pl.BlockSpec((None, block_d), lambda b, d: (b, d))
    return grid, btd, bd


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def forward(x, a, h0, *, block_sizes, interpret: bool):
    """``(h [B,T,D] x.dtype, h_final [B,D] float32)``; h0 is float32."""
    batch, time, channels = x.shape
    grid, btd, bd = _specs(batch, time, channels, block_sizes.block_d)
    out = call(
        _forward_kernel,
        {"x": (x, btd), "a": (a, btd), "h0": (h0, bd)},
        {"h": (jax.ShapeDtypeStruct(x.shape, x.dtype), btd),
         "final": (jax.ShapeDtypeStruct((batch, channels), jnp.float32), bd)},
        grid=grid,
        interpret=interpret,
        compiler_params=TRITON,
        name="linear_scan_forward",
    )
    return out["h"], out["final"]


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def backward(a, h, h0, dh, dfinal, *, block_sizes, interpret: bool):
    """``(dx, da)`` in float32 ``[B,T,D]`` and ``dh0 [B,D]``."""
    batch, time, channels = a.shape
    grid, btd, bd = _specs(batch, time, channels, block_sizes.block_d)
    btd_f32 = jax.ShapeDtypeStruct(a.shape, jnp.float32)
    out = call(
        _backward_kernel,
        {"a": (a, btd), "h": (h, btd), "h0": (h0, bd), "dh": (dh, btd), "dfinal": (dfinal, bd)},
        {"dx": (btd_f32, btd), "da": (btd_f32, btd),
         "dh0": (jax.ShapeDtypeStruct((batch, channels), jnp.float32), bd)},
        grid=grid,
        interpret=interpret,
        compiler_params=TRITON,
        name="linear_scan_backward",
    )
    return out["dx"], out["da"], out["dh0"]
