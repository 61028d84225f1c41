"""Selective-scan kernels for TPUs (Mosaic).

Layout: channels on the 128 lanes, the state index N on sublanes, so a state
tile is ``[N, 128]`` and a channel vector ``[1, 128]``. The grid is (batch,
channel blocks, time chunks); the chunk axis is sequential ("arbitrary") and
carries the state in VMEM scratch. Inside a chunk a ``lax.fori_loop`` walks the
rows with explicit ``pl.ds`` indexing (Mosaic lowers no per-step ``lax.scan``
and no cumsum). The forward stores the state at the start of every chunk; the
backward grid visits chunks in reverse, recomputes the chunk's states from its
checkpoint into a VMEM buffer ``[chunk, N, 128]`` and runs the adjoint back
through it. Row blocks are walked in float32 copies (``pallas_kernels._tpu``:
Mosaic indexes single bf16 rows only at aligned offsets). Groups: B and C
arrive as ``[B,T,N,G]``; ``rows @ onehot [G,128]`` spreads them over the
channels of the block (an exact f32 matmul).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from effarch.op_contract import pad_to_multiple
from pallas_kernels._call import call
from pallas_kernels._tpu import LANES, SEMANTICS, interpret_params, narrow, row_scratch, widen
from pallas_kernels.selective_scan import _step

N_AXIS = 0  # state tiles are [N, LANES]; channel vectors [1, LANES]
_EXACT = jax.lax.Precision.HIGHEST


def _row(ref_, t):
    """Row t of a ``[chunk, LANES]`` block as float32 ``[1, LANES]``."""
    return ref_[pl.ds(t, 1), :].astype(jnp.float32)


def _step_inputs(t, refs, rows, onehot):
    """Everything the step at row t reads, float32, in the [., LANES] layout.

    ``rows`` maps x, dt and z (gated only) to their float32 copies.
    """
    spread = lambda group_rows: jnp.dot(  # noqa: E731
        group_rows.astype(jnp.float32), onehot, precision=_EXACT)
    return dict(
        x=_row(rows["x"], t),
        dt=_row(rows["dt"], t),
        z=_row(rows["z"], t) if "z" in rows else None,
        B=spread(refs["B"][t]),  # [N, LANES]
        C=spread(refs["C"][t]),
        keep=refs["keep"][pl.ds(t, 1), :],  # [1, 1]
    )


def _group_sums(tile, onehot):
    """``[N, LANES]`` -> ``[N, G]``: sum over the channels of each group."""
    return jax.lax.dot_general(tile, onehot, (((1,), (1,)), ((), ())), precision=_EXACT)


def _rows_in_chunk(chunk_index, chunk, time):
    return jnp.minimum(chunk, time - chunk_index * chunk)


def _widened(refs, names) -> dict:
    """Float32 copies of the row blocks in ``names`` that this call has (``widen``)."""
    return {n: widen(refs[n], refs[n + "32"]) for n in names if n in refs}


def _forward_kernel(refs, *, dt_softplus: bool, time: int):
    """Refs: x, dt, z (gated only), A, dt_bias, D, B, C, onehot, keep, h0 -> y, final,
    checkpoint; scratch carry, y32, x32, dt32, z32 (gated only)."""
    carry_ref, y32 = refs["carry"], refs["y32"]
    rows = _widened(refs, ("x", "dt", "z"))
    c = pl.program_id(2)
    A, bias, D, onehot = (refs[n][...] for n in ("A", "dt_bias", "D", "onehot"))

    @pl.when(c == 0)
    def _():
        carry_ref[...] = refs["h0"][...]

    refs["checkpoint"][...] = carry_ref[...]

    def step(t, h):
        s = _step_inputs(t, refs, rows, onehot)
        delta, _ = _step.step_size(s["dt"], bias, dt_softplus)
        h, y = _step.scan_step(h, s["x"], delta, s["keep"], A, s["B"], s["C"], n_axis=N_AXIS)
        y32[pl.ds(t, 1), :] = _step.gated_output(y, s["x"], D, s["z"])
        return h

    n_rows = _rows_in_chunk(c, refs["x"].shape[0], time)
    carry_ref[...] = jax.lax.fori_loop(0, n_rows, step, carry_ref[...])
    narrow(y32, refs["y"])

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        refs["final"][...] = carry_ref[...]


def _backward_kernel(refs, *, dt_softplus: bool, time: int):
    """Refs: x, dt, z (gated only), A, dt_bias, D, B, C, onehot, keep, checkpoint, dy,
    dfinal -> dx, ddt, dz (gated only), dB, dC, dA, dD, dh0; scratch g, dA_acc, dD_acc,
    states, x32, dt32, dy32, z32 (gated only)."""
    g_ref, dA_acc, dD_acc, states_ref = (refs[n] for n in ("g", "dA_acc", "dD_acc", "states"))
    rows = _widened(refs, ("x", "dt", "dy", "z"))
    step_index, n_steps = pl.program_id(2), pl.num_programs(2)
    chunk_index = n_steps - 1 - step_index
    A, bias, D, onehot = (refs[n][...] for n in ("A", "dt_bias", "D", "onehot"))

    @pl.when(step_index == 0)
    def _():
        g_ref[...] = refs["dfinal"][...]
        dA_acc[...] = jnp.zeros_like(dA_acc)
        dD_acc[...] = jnp.zeros_like(dD_acc)

    def recompute(t, h):
        s = _step_inputs(t, refs, rows, onehot)
        delta, _ = _step.step_size(s["dt"], bias, dt_softplus)
        h, _ = _step.scan_step(h, s["x"], delta, s["keep"], A, s["B"], s["C"], n_axis=N_AXIS)
        states_ref[t] = h
        return h

    n_rows = _rows_in_chunk(chunk_index, refs["x"].shape[0], time)
    h_start = refs["checkpoint"][...]
    jax.lax.fori_loop(0, n_rows, recompute, h_start)

    def reverse(j, carry):
        g, dA, dD = carry
        t = n_rows - 1 - j
        s = _step_inputs(t, refs, rows, onehot)
        h_prev = jnp.where(t > 0, states_ref[jnp.maximum(t - 1, 0)], h_start)
        g, grads = _step.adjoint_step(
            g, states_ref[t], h_prev, s["x"], s["dt"], bias, s["keep"], A, s["B"], s["C"],
            D, s["z"], _row(rows["dy"], t), dt_softplus=dt_softplus, n_axis=N_AXIS,
        )
        for name in ("dx", "ddt", "dz"):
            if name in refs:
                refs[name][pl.ds(t, 1), :] = grads[name]
        refs["dB"][t] = _group_sums(grads["dB"], onehot)
        refs["dC"][t] = _group_sums(grads["dC"], onehot)
        return g, dA + grads["dA"], dD + grads["dD"]

    g, dA, dD = jax.lax.fori_loop(0, n_rows, reverse, (g_ref[...], dA_acc[...], dD_acc[...]))
    g_ref[...], dA_acc[...], dD_acc[...] = g, dA, dD

    @pl.when(step_index == n_steps - 1)
    def _():
        refs["dh0"][...], refs["dA"][...], refs["dD"][...] = g, dA, dD


class _Specs:
    """BlockSpecs of one call over the grid (batch, channel blocks, time chunks).

    The backward visits the chunks in reverse (``reverse=True``).
    """

    def __init__(self, chunk, state, groups, n_chunks, reverse: bool):
        at = (lambda c: n_chunks - 1 - c) if reverse else (lambda c: c)
        self.rows = pl.BlockSpec((None, chunk, LANES), lambda b, d, c: (b, at(c), d))  # [B,T,D]
        self.lane_tile = lambda height: pl.BlockSpec(  # noqa: E731  [., D]
            (height, LANES), lambda b, d, c: (0, d))
        self.by_group = pl.BlockSpec((None, chunk, state, groups),
                                     lambda b, d, c: (b, at(c), 0, 0))  # [B,T,N,G]
        self.keep = pl.BlockSpec((None, chunk, 1), lambda b, d, c: (b, at(c), 0))  # [B,T,1]
        self.state = pl.BlockSpec((None, state, LANES), lambda b, d, c: (b, 0, d))  # [B,N,D]
        self.checkpoint = pl.BlockSpec((None, None, state, LANES),
                                       lambda b, d, c: (b, at(c), 0, d))  # [B,T/C,N,D]
        self.vector = pl.BlockSpec((None, 1, LANES), lambda b, d, c: (b, 0, d))  # [B,1,D]
        # Per-block group sums [B,D/LANES,T,N,G].
        self.group_sums = pl.BlockSpec((None, None, chunk, state, groups),
                                       lambda b, d, c: (b, d, at(c), 0, 0))


def _inputs(specs, chunk, x, dt, z, A, dt_bias, D, B, C, onehot, keep) -> dict:
    """Inputs both kernels read, T padded to whole chunks: name -> (array, BlockSpec).

    B and C go in as ``[B,T,N,G]``, A and onehot transposed: channels on the lanes.
    """
    pad = functools.partial(pad_to_multiple, multiple=chunk, axis=1)
    by_group = lambda v: pad(jnp.swapaxes(v, 2, 3))  # noqa: E731  [B,T,N,G]
    state, groups = A.shape[1], B.shape[2]
    return {
        "x": (pad(x), specs.rows), "dt": (pad(dt), specs.rows), "z": (pad(z), specs.rows),
        "A": (A.T, specs.lane_tile(state)),
        "dt_bias": (dt_bias[None], specs.lane_tile(1)), "D": (D[None], specs.lane_tile(1)),
        "B": (by_group(B), specs.by_group), "C": (by_group(C), specs.by_group),
        "onehot": (onehot.T, specs.lane_tile(groups)), "keep": (pad(keep[..., None]), specs.keep),
    }


def _row_scratch(chunk: int, names, gated: bool) -> dict:
    """One float32 ``[chunk, LANES]`` buffer per name (``name32``), and z32 when gated."""
    return {n + "32": row_scratch(chunk) for n in (*names, *(("z",) if gated else ()))}


@functools.partial(jax.jit, static_argnames=("block_sizes", "dt_softplus", "interpret"))
def forward(x, dt, z, A, dt_bias, D, B, C, onehot, keep, h0, *, block_sizes, dt_softplus,
            interpret):
    """Same contract as ``gpu.forward`` (checkpoints ``[B, T/chunk, N, D]`` here);
    LANES divides D."""
    batch, time, channels = x.shape
    state, groups = A.shape[1], B.shape[2]
    chunk = block_sizes.chunk
    n_chunks = pl.cdiv(time, chunk)
    specs = _Specs(chunk, state, groups, n_chunks, reverse=False)
    f32 = jnp.float32
    inputs = _inputs(specs, chunk, x, dt, z, A, dt_bias, D, B, C, onehot, keep)
    padded_time = inputs["x"][0].shape[1]
    out = call(
        functools.partial(_forward_kernel, dt_softplus=dt_softplus, time=time),
        {**inputs, "h0": (jnp.swapaxes(h0, 1, 2), specs.state)},
        {"y": (jax.ShapeDtypeStruct((batch, padded_time, channels), x.dtype), specs.rows),
         "final": (jax.ShapeDtypeStruct((batch, state, channels), f32), specs.state),
         "checkpoint": (jax.ShapeDtypeStruct((batch, n_chunks, state, channels), f32),
                        specs.checkpoint)},
        scratch={"carry": pltpu.VMEM((state, LANES), f32), "y32": row_scratch(chunk),
                 **_row_scratch(chunk, ("x", "dt"), gated=z is not None)},
        grid=(batch, channels // LANES, n_chunks),
        compiler_params=SEMANTICS,
        interpret=interpret_params(interpret),
        name="selective_scan_forward",
    )
    return out["y"][:, :time], jnp.swapaxes(out["final"], 1, 2), out["checkpoint"]


@functools.partial(jax.jit, static_argnames=("block_sizes", "dt_softplus", "interpret"))
def backward(x, dt, z, A, dt_bias, D, B, C, onehot, keep, checkpoints, dy, dfinal, *,
             block_sizes, dt_softplus, interpret):
    """Same contract as ``gpu.backward``."""
    batch, time, channels = x.shape
    state, groups = A.shape[1], B.shape[2]
    chunk = block_sizes.chunk
    n_chunks, n_blocks = pl.cdiv(time, chunk), channels // LANES
    specs = _Specs(chunk, state, groups, n_chunks, reverse=True)
    f32 = jnp.float32
    inputs = _inputs(specs, chunk, x, dt, z, A, dt_bias, D, B, C, onehot, keep)
    padded_time = inputs["x"][0].shape[1]
    btd = jax.ShapeDtypeStruct((batch, padded_time, channels), f32)
    bnd = jax.ShapeDtypeStruct((batch, state, channels), f32)
    group_sums = jax.ShapeDtypeStruct((batch, n_blocks, padded_time, state, groups), f32)
    out = call(
        functools.partial(_backward_kernel, dt_softplus=dt_softplus, time=time),
        {**inputs, "checkpoint": (checkpoints, specs.checkpoint),
         "dy": (pad_to_multiple(dy, chunk, axis=1), specs.rows),
         "dfinal": (jnp.swapaxes(dfinal, 1, 2), specs.state)},
        {"dx": (btd, specs.rows), "ddt": (btd, specs.rows),
         "dz": (None if z is None else btd, specs.rows),
         "dB": (group_sums, specs.group_sums), "dC": (group_sums, specs.group_sums),
         "dA": (bnd, specs.state),
         "dD": (jax.ShapeDtypeStruct((batch, 1, channels), f32), specs.vector),
         "dh0": (bnd, specs.state)},
        scratch={"g": pltpu.VMEM((state, LANES), f32), "dA_acc": pltpu.VMEM((state, LANES), f32),
                 "dD_acc": pltpu.VMEM((1, LANES), f32),
                 "states": pltpu.VMEM((chunk, state, LANES), f32),
                 **_row_scratch(chunk, ("x", "dt", "dy"), gated=z is not None)},
        grid=(batch, n_blocks, n_chunks),
        compiler_params=SEMANTICS,
        interpret=interpret_params(interpret),
        name="selective_scan_backward",
    )
    by_time = lambda v: jnp.swapaxes(v.sum(1)[:, :time], 2, 3)  # noqa: E731  [B,T,G,N]
    dz = out.get("dz")
    return dict(
        x=out["dx"][:, :time], dt=out["ddt"][:, :time], z=None if dz is None else dz[:, :time],
        B=by_time(out["dB"]), C=by_time(out["dC"]), A=out["dA"].sum(0).T,
        D=out["dD"].sum((0, 1)), dt_bias=out["ddt"][:, :time].sum((0, 1)),
        initial_state=jnp.swapaxes(out["dh0"], 1, 2),
    )
