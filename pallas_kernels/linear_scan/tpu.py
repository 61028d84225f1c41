"""Linear-scan kernels for TPUs (Mosaic).

Channels lie on the 128 lanes. The grid is (batch, channel blocks, time
chunks); the chunk axis is sequential ("arbitrary") and the state is carried
across it in a VMEM scratch. Inside a chunk, a ``lax.fori_loop`` walks the rows
with explicit ``pl.ds`` indexing (no ``lax.scan`` with per-step inputs, no
cumsum: Mosaic lowers neither), on float32 copies of the blocks
(``pallas_kernels._tpu``: Mosaic indexes single bf16 rows only at aligned
offsets). The backward grid visits chunks in reverse.
Inputs arrive padded: ``LANES`` divides D and ``chunk`` divides T (ops.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._tpu import LANES, SEMANTICS, narrow, row_scratch, widen


def _row(ref, t):
    """Row t of a ``[chunk, LANES]`` block as ``[1, LANES]`` float32."""
    return ref[pl.ds(t, 1), :].astype(jnp.float32)


def _forward_kernel(x_ref, a_ref, h0_ref, h_ref, final_ref, carry_ref, x32, a32, h32):
    """x, a, h ``[chunk, LANES]``; h0, final, carry ``[1, LANES]``; ``*32`` float32 scratch."""

    @pl.when(pl.program_id(2) == 0)
    def _():
        carry_ref[...] = h0_ref[...]

    x_ref, a_ref = widen(x_ref, x32), widen(a_ref, a32)

    def step(t, h):
        h = _row(a_ref, t) * h + _row(x_ref, t)
        h32[pl.ds(t, 1), :] = h
        return h

    carry_ref[...] = jax.lax.fori_loop(0, x_ref.shape[0], step, carry_ref[...])
    narrow(h32, h_ref)

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        final_ref[...] = carry_ref[...]


def _backward_kernel(
    a_ref, h_ref, h_before_ref, dh_ref, dfinal_ref, dx_ref, da_ref, dh0_ref, g_ref,
    a32, h32, dh32,
):
    """One chunk of the reverse-time adjoint; g_ref carries it between chunks.

    h_before ``[1, LANES]`` is the state before this chunk's first row.
    """

    @pl.when(pl.program_id(2) == 0)
    def _():
        g_ref[...] = dfinal_ref[...]

    a_ref, h_ref, dh_ref = widen(a_ref, a32), widen(h_ref, h32), widen(dh_ref, dh32)

    chunk = a_ref.shape[0]

    def step(i, g):
        t = chunk - 1 - i
        g = g + _row(dh_ref, t)
        h_prev = jnp.where(t > 0, _row(h_ref, jnp.maximum(t - 1, 0)), h_before_ref[...])
        dx_ref[pl.ds(t, 1), :] = g
        da_ref[pl.ds(t, 1), :] = g * h_prev
        return _row(a_ref, t) * g

    g_ref[...] = jax.lax.fori_loop(0, chunk, step, g_ref[...])

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        dh0_ref[...] = g_ref[...]


def _grid(batch, time, channels, chunk):
    return (batch, channels // LANES, time // chunk)


@functools.partial(jax.jit, static_argnames=("chunk", "interpret"))
def forward(x, a, h0, *, chunk: int, interpret: bool):
    """``(h [B,T,D] x.dtype, h_final [B,D] float32)``; h0 ``[B,D]`` float32."""
    batch, time, channels = x.shape
    rows = pl.BlockSpec((None, chunk, LANES), lambda b, d, c: (b, c, d))
    state = pl.BlockSpec((None, 1, LANES), lambda b, d, c: (b, 0, d))
    h, final = pl.pallas_call(
        _forward_kernel,
        grid=_grid(batch, time, channels, chunk),
        in_specs=[rows, rows, state],
        out_specs=[rows, state],
        out_shape=[
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct((batch, 1, channels), jnp.float32),
        ],
        scratch_shapes=[pltpu.VMEM((1, LANES), jnp.float32)] + [row_scratch(chunk)] * 3,
        compiler_params=SEMANTICS,
        interpret=pltpu.InterpretParams() if interpret else False,
        name="linear_scan_forward",
    )(x, a, h0[:, None])
    return h, final[:, 0]


@functools.partial(jax.jit, static_argnames=("chunk", "interpret"))
def backward(a, h, h0, dh, dfinal, *, chunk: int, interpret: bool):
    """``(dx, da)`` in float32 ``[B,T,D]`` and ``dh0 [B,D]``."""
    batch, time, channels = a.shape
    n_chunks = time // chunk
    # The state before each chunk: h0, then the last row of every chunk but the last.
    h_before = jnp.concatenate([h0[:, None], h[:, chunk - 1 : -1 : chunk]], axis=1)
    rows = pl.BlockSpec((None, chunk, LANES), lambda b, d, c: (b, n_chunks - 1 - c, d))
    before = pl.BlockSpec((None, None, 1, LANES), lambda b, d, c: (b, n_chunks - 1 - c, 0, d))
    state = pl.BlockSpec((None, 1, LANES), lambda b, d, c: (b, 0, d))
    btd_f32 = jax.ShapeDtypeStruct(a.shape, jnp.float32)
    dx, da, dh0 = pl.pallas_call(
        _backward_kernel,
        grid=_grid(batch, time, channels, chunk),
        in_specs=[rows, rows, before, rows, state],
        out_specs=[rows, rows, state],
        out_shape=[btd_f32, btd_f32, jax.ShapeDtypeStruct((batch, 1, channels), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((1, LANES), jnp.float32)] + [row_scratch(chunk)] * 3,
        compiler_params=SEMANTICS,
        interpret=pltpu.InterpretParams() if interpret else False,
        name="linear_scan_backward",
    )(a, h, h_before.astype(jnp.float32)[:, :, None], dh, dfinal[:, None])
    return dx, da, dh0[:, 0]
