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

from pallas_kernels._call import call
from pallas_kernels._tpu import LANES, SEMANTICS, interpret_params, narrow, row_scratch, widen


def _row(ref, t):
    """Row t of a ``[chunk, LANES]`` block as ``[1, LANES]`` float32."""
    return ref[pl.ds(t, 1), :].astype(jnp.float32)


def _forward_kernel(refs):
    """x, a, h ``[chunk, LANES]``; h0, final, carry ``[1, LANES]``; ``*32`` float32 scratch."""
    carry_ref = refs["carry"]

    @pl.when(pl.program_id(2) == 0)
    def _():
        carry_ref[...] = refs["h0"][...]

    x_ref, a_ref, h32 = widen(refs["x"], refs["x32"]), widen(refs["a"], refs["a32"]), refs["h32"]

    def step(t, h):
        h = _row(a_ref, t) * h + _row(x_ref, t)
        h32[pl.ds(t, 1), :] = h
        return h

    carry_ref[...] = jax.lax.fori_loop(0, x_ref.shape[0], step, carry_ref[...])
    narrow(h32, refs["h"])

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        refs["final"][...] = carry_ref[...]


def _backward_kernel(refs):
    """One chunk of the reverse-time adjoint; the ``g`` scratch carries it between chunks.

    h_before ``[1, LANES]`` is the state before this chunk's first row.
    """
    g_ref = refs["g"]

    @pl.when(pl.program_id(2) == 0)
    def _():
        g_ref[...] = refs["dfinal"][...]

    a_ref, h_ref, dh_ref = (widen(refs[n], refs[n + "32"]) for n in ("a", "h", "dh"))
    dx_ref, da_ref = refs["dx"], refs["da"]
    chunk = a_ref.shape[0]

    def step(i, g):
        t = chunk - 1 - i
        g = g + _row(dh_ref, t)
        h_prev = jnp.where(t > 0, _row(h_ref, jnp.maximum(t - 1, 0)), refs["h_before"][...])
        dx_ref[pl.ds(t, 1), :] = g
        da_ref[pl.ds(t, 1), :] = g * h_prev
        return _row(a_ref, t) * g

    g_ref[...] = jax.lax.fori_loop(0, chunk, step, g_ref[...])

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        refs["dh0"][...] = g_ref[...]


def _grid(batch, time, channels, chunk):
    return (batch, channels // LANES, time // chunk)


def _scratch(chunk: int, carried: str, rows: tuple[str, ...]) -> dict:
    """A ``[1, LANES]`` carry and one float32 ``[chunk, LANES]`` buffer per name in rows."""
    return {carried: pltpu.VMEM((1, LANES), jnp.float32), **{n: row_scratch(chunk) for n in rows}}


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def forward(x, a, h0, *, block_sizes, interpret: bool):
    """``(h [B,T,D] x.dtype, h_final [B,D] float32)``; h0 ``[B,D]`` float32."""
    batch, time, channels = x.shape
    chunk = block_sizes.chunk
    rows = pl.BlockSpec((None, chunk, LANES), lambda b, d, c: (b, c, d))
    state = pl.BlockSpec((None, 1, LANES), lambda b, d, c: (b, 0, d))
    out = call(
        _forward_kernel,
        {"x": (x, rows), "a": (a, rows), "h0": (h0[:, None], state)},
        {"h": (jax.ShapeDtypeStruct(x.shape, x.dtype), rows),
         "final": (jax.ShapeDtypeStruct((batch, 1, channels), jnp.float32), state)},
        scratch=_scratch(chunk, "carry", ("x32", "a32", "h32")),
        grid=_grid(batch, time, channels, chunk),
        compiler_params=SEMANTICS,
        interpret=interpret_params(interpret),
        name="linear_scan_forward",
    )
    return out["h"], out["final"][:, 0]


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def backward(a, h, h0, dh, dfinal, *, block_sizes, interpret: bool):
    """``(dx, da)`` in float32 ``[B,T,D]`` and ``dh0 [B,D]``."""
    batch, time, channels = a.shape
    chunk = block_sizes.chunk
    n_chunks = time // chunk
    # The state before each chunk: h0, then the last row of every chunk but the last.
    h_before = jnp.concatenate([h0[:, None], h[:, chunk - 1 : -1 : chunk]], axis=1)
    rows = pl.BlockSpec((None, chunk, LANES), lambda b, d, c: (b, n_chunks - 1 - c, d))
    before = pl.BlockSpec((None, None, 1, LANES), lambda b, d, c: (b, n_chunks - 1 - c, 0, d))
    state = pl.BlockSpec((None, 1, LANES), lambda b, d, c: (b, 0, d))
    btd_f32 = jax.ShapeDtypeStruct(a.shape, jnp.float32)
    out = call(
        _backward_kernel,
        {"a": (a, rows), "h": (h, rows),
         "h_before": (h_before.astype(jnp.float32)[:, :, None], before),
         "dh": (dh, rows), "dfinal": (dfinal[:, None], state)},
        {"dx": (btd_f32, rows), "da": (btd_f32, rows),
         "dh0": (jax.ShapeDtypeStruct((batch, 1, channels), jnp.float32), state)},
        scratch=_scratch(chunk, "g", ("a32", "h32", "dh32")),
        grid=_grid(batch, time, channels, chunk),
        compiler_params=SEMANTICS,
        interpret=interpret_params(interpret),
        name="linear_scan_backward",
    )
    return out["dx"], out["da"], out["dh0"][:, 0]
