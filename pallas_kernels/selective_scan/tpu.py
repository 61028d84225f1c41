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
from pallas_kernels._tpu import LANES, SEMANTICS, narrow, row_scratch, widen
from pallas_kernels.selective_scan import _step

N_AXIS = 0  # state tiles are [N, LANES]; channel vectors [1, LANES]
_EXACT = jax.lax.Precision.HIGHEST


def _row(ref_, t):
    """Row t of a ``[chunk, LANES]`` block as float32 ``[1, LANES]``."""
    return ref_[pl.ds(t, 1), :].astype(jnp.float32)


def _step_inputs(t, x_ref, dt_ref, z_ref, B_ref, C_ref, keep_ref, onehot):
    """Everything the step at row t reads, float32, in the [., LANES] layout."""
    spread = lambda rows: jnp.dot(rows.astype(jnp.float32), onehot, precision=_EXACT)  # noqa: E731
    return dict(
        x=_row(x_ref, t),
        dt=_row(dt_ref, t),
        z=None if z_ref is None else _row(z_ref, t),
        B=spread(B_ref[t]),  # [N, LANES]
        C=spread(C_ref[t]),
        keep=keep_ref[pl.ds(t, 1), :],  # [1, 1]
    )


def _group_sums(tile, onehot):
    """``[N, LANES]`` -> ``[N, G]``: sum over the channels of each group."""
    return jax.lax.dot_general(tile, onehot, (((1,), (1,)), ((), ())), precision=_EXACT)


def _rows_in_chunk(chunk_index, chunk, time):
    return jnp.minimum(chunk, time - chunk_index * chunk)


def _forward_kernel(*refs, gated: bool, dt_softplus: bool, time: int):
    """Refs: x, dt, [z], A, dt_bias, D, B, C, onehot, keep, h0 -> y, final,
    checkpoint; scratch carry, y32, x32, dt32, [z32]."""
    refs = list(refs)
    x_ref, dt_ref = refs.pop(0), refs.pop(0)
    z_ref = refs.pop(0) if gated else None
    A_ref, bias_ref, D_ref, B_ref, C_ref, onehot_ref, keep_ref, h0_ref = refs[:8]
    y_ref, final_ref, ckpt_ref, carry_ref, y32, *wide = refs[8:]
    x_ref, dt_ref = widen(x_ref, wide[0]), widen(dt_ref, wide[1])
    z_ref = widen(z_ref, wide[2]) if gated else None
    c = pl.program_id(2)
    A, bias, D, onehot = A_ref[...], bias_ref[...], D_ref[...], onehot_ref[...]

    @pl.when(c == 0)
    def _():
        carry_ref[...] = h0_ref[...]

    ckpt_ref[...] = carry_ref[...]

    def step(t, h):
        s = _step_inputs(t, x_ref, dt_ref, z_ref, B_ref, C_ref, keep_ref, onehot)
        delta, _ = _step.step_size(s["dt"], bias, dt_softplus)
        h, y = _step.scan_step(h, s["x"], delta, s["keep"], A, s["B"], s["C"], n_axis=N_AXIS)
        y32[pl.ds(t, 1), :] = _step.gated_output(y, s["x"], D, s["z"])
        return h

    rows = _rows_in_chunk(c, x_ref.shape[0], time)
    carry_ref[...] = jax.lax.fori_loop(0, rows, step, carry_ref[...])
    narrow(y32, y_ref)

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        final_ref[...] = carry_ref[...]


def _backward_kernel(*refs, gated: bool, dt_softplus: bool, time: int):
    """Refs: x, dt, [z], A, dt_bias, D, B, C, onehot, keep, checkpoint, dy, dfinal
    -> dx, ddt, [dz], dB, dC, dA, dD, dh0; scratch g, dA, dD, states, x32, dt32,
    dy32, [z32]."""
    refs = list(refs)
    x_ref, dt_ref = refs.pop(0), refs.pop(0)
    z_ref = refs.pop(0) if gated else None
    A_ref, bias_ref, D_ref, B_ref, C_ref, onehot_ref, keep_ref, ckpt_ref, dy_ref, dfinal_ref = (
        refs[:10]
    )
    refs = refs[10:]
    dx_ref, ddt_ref = refs.pop(0), refs.pop(0)
    dz_ref = refs.pop(0) if gated else None
    dB_ref, dC_ref, dA_ref, dD_ref, dh0_ref, g_ref, dA_acc, dD_acc, states_ref, *wide = refs
    x_ref, dt_ref, dy_ref = (widen(r, w) for r, w in zip((x_ref, dt_ref, dy_ref), wide))
    z_ref = widen(z_ref, wide[3]) if gated else None
    step_index, n_steps = pl.program_id(2), pl.num_programs(2)
    chunk_index = n_steps - 1 - step_index
    A, bias, D, onehot = A_ref[...], bias_ref[...], D_ref[...], onehot_ref[...]

    @pl.when(step_index == 0)
    def _():
        g_ref[...] = dfinal_ref[...]
        dA_acc[...] = jnp.zeros_like(dA_acc)
        dD_acc[...] = jnp.zeros_like(dD_acc)

    def load(t):
        return _step_inputs(t, x_ref, dt_ref, z_ref, B_ref, C_ref, keep_ref, onehot)

    def recompute(t, h):
        s = load(t)
        delta, _ = _step.step_size(s["dt"], bias, dt_softplus)
        h, _ = _step.scan_step(h, s["x"], delta, s["keep"], A, s["B"], s["C"], n_axis=N_AXIS)
        states_ref[t] = h
        return h

    rows = _rows_in_chunk(chunk_index, x_ref.shape[0], time)
    h_start = ckpt_ref[...]
    jax.lax.fori_loop(0, rows, recompute, h_start)

    def reverse(j, carry):
        g, dA, dD = carry
        t = rows - 1 - j
        s = load(t)
        h_prev = jnp.where(t > 0, states_ref[jnp.maximum(t - 1, 0)], h_start)
        g, grads = _step.adjoint_step(
            g, states_ref[t], h_prev, s["x"], s["dt"], bias, s["keep"], A, s["B"], s["C"],
            D, s["z"], _row(dy_ref, t), dt_softplus=dt_softplus, n_axis=N_AXIS,
        )
        dx_ref[pl.ds(t, 1), :] = grads["dx"]
        ddt_ref[pl.ds(t, 1), :] = grads["ddt"]
        if gated:
            dz_ref[pl.ds(t, 1), :] = grads["dz"]
        dB_ref[t] = _group_sums(grads["dB"], onehot)
        dC_ref[t] = _group_sums(grads["dC"], onehot)
        return g, dA + grads["dA"], dD + grads["dD"]

    g, dA, dD = jax.lax.fori_loop(0, rows, reverse, (g_ref[...], dA_acc[...], dD_acc[...]))
    g_ref[...], dA_acc[...], dD_acc[...] = g, dA, dD

    @pl.when(step_index == n_steps - 1)
    def _():
        dh0_ref[...], dA_ref[...], dD_ref[...] = g, dA, dD


@functools.partial(jax.jit, static_argnames=("dt_softplus", "chunk", "interpret"))
def forward(x, dt, z, A, dt_bias, D, B, C, onehot, keep, h0, *, dt_softplus, chunk, interpret):
    """Same contract as ``gpu.forward`` (checkpoints ``[B, T/chunk, N, D]`` here);
    LANES divides D."""
    return _call(False, x, dt, z, A, dt_bias, D, B, C, onehot, keep, (h0,),
                 dt_softplus=dt_softplus, chunk=chunk, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("dt_softplus", "chunk", "interpret"))
def backward(x, dt, z, A, dt_bias, D, B, C, onehot, keep, checkpoints, dy, dfinal, *,
             dt_softplus, chunk, interpret):
    """Same contract as ``gpu.backward``."""
    return _call(True, x, dt, z, A, dt_bias, D, B, C, onehot, keep, (checkpoints, dy, dfinal),
                 dt_softplus=dt_softplus, chunk=chunk, interpret=interpret)


def _call(is_backward, x, dt, z, A, dt_bias, D, B, C, onehot, keep, extra, *,
          dt_softplus, chunk, interpret):
    """Builds and runs the forward or backward pallas_call."""
    batch, time, channels = x.shape
    state, groups = A.shape[1], B.shape[2]
    n_chunks, n_blocks = pl.cdiv(time, chunk), channels // LANES
    gated = z is not None
    f32 = jnp.float32
    chunk_of = (lambda c: n_chunks - 1 - c) if is_backward else (lambda c: c)
    rows = pl.BlockSpec((None, chunk, LANES), lambda b, d, c: (b, chunk_of(c), d))
    lane_tile = lambda height: pl.BlockSpec((height, LANES), lambda b, d, c: (0, d))  # noqa: E731
    by_group = pl.BlockSpec((None, chunk, state, groups), lambda b, d, c: (b, chunk_of(c), 0, 0))
    keep_spec = pl.BlockSpec((None, chunk, 1), lambda b, d, c: (b, chunk_of(c), 0))
    state_spec = pl.BlockSpec((None, state, LANES), lambda b, d, c: (b, 0, d))  # [B,N,D]
    ckpt_spec = pl.BlockSpec((None, None, state, LANES), lambda b, d, c: (b, chunk_of(c), 0, d))
    vector_spec = pl.BlockSpec((None, 1, LANES), lambda b, d, c: (b, 0, d))  # [B,1,D]

    pad = functools.partial(pad_to_multiple, multiple=chunk, axis=1)
    groups_t = lambda v: pad(jnp.swapaxes(v, 2, 3))  # noqa: E731  [B,T,N,G]
    args = [pad(x), pad(dt)] + ([pad(z)] if gated else []) + [
        A.T, dt_bias[None], D[None], groups_t(B), groups_t(C), onehot.T, pad(keep[..., None]),
    ]
    in_specs = [rows] * (3 if gated else 2) + [
        lane_tile(state), lane_tile(1), lane_tile(1), by_group, by_group, lane_tile(groups),
        keep_spec,
    ]
    padded_time = args[0].shape[1]
    btd = jax.ShapeDtypeStruct((batch, padded_time, channels), f32)
    bnd = jax.ShapeDtypeStruct((batch, state, channels), f32)
    kernel_kwargs = dict(gated=gated, dt_softplus=dt_softplus, time=time)
    common = dict(
        grid=(batch, n_blocks, n_chunks),
        compiler_params=SEMANTICS,
        interpret=pltpu.InterpretParams() if interpret else False,
    )
    if not is_backward:
        (h0,) = extra
        y, final, checkpoints = pl.pallas_call(
            functools.partial(_forward_kernel, **kernel_kwargs),
            in_specs=in_specs + [state_spec],
            out_specs=[rows, state_spec, ckpt_spec],
            out_shape=[
                jax.ShapeDtypeStruct((batch, padded_time, channels), x.dtype),
                bnd,
                jax.ShapeDtypeStruct((batch, n_chunks, state, channels), f32),
            ],
            scratch_shapes=[pltpu.VMEM((state, LANES), f32)]
            + [row_scratch(chunk)] * (4 if gated else 3),
            name="selective_scan_forward",
            **common,
        )(*args, jnp.swapaxes(h0, 1, 2))
        return y[:, :time], jnp.swapaxes(final, 1, 2), checkpoints

    checkpoints, dy, dfinal = extra
    group_sums_spec = pl.BlockSpec(
        (None, None, chunk, state, groups), lambda b, d, c: (b, d, chunk_of(c), 0, 0)
    )
    group_sums = jax.ShapeDtypeStruct((batch, n_blocks, padded_time, state, groups), f32)
    outs = list(pl.pallas_call(
        functools.partial(_backward_kernel, **kernel_kwargs),
        in_specs=in_specs + [ckpt_spec, rows, state_spec],
        out_specs=[rows] * (3 if gated else 2) + [
            group_sums_spec, group_sums_spec, state_spec, vector_spec, state_spec,
        ],
        out_shape=[btd] * (3 if gated else 2) + [
            group_sums, group_sums, bnd, jax.ShapeDtypeStruct((batch, 1, channels), f32), bnd,
        ],
        scratch_shapes=[
            pltpu.VMEM((state, LANES), f32),
            pltpu.VMEM((state, LANES), f32),
            pltpu.VMEM((1, LANES), f32),
            pltpu.VMEM((chunk, state, LANES), f32),
        ] + [row_scratch(chunk)] * (4 if gated else 3),
        name="selective_scan_backward",
        **common,
    )(*args, checkpoints, pad(dy), jnp.swapaxes(dfinal, 1, 2)))
    dx, ddt = outs.pop(0)[:, :time], outs.pop(0)[:, :time]
    dz = outs.pop(0)[:, :time] if gated else None
    dB, dC, dA, dD, dh0 = outs
    by_time = lambda v: jnp.swapaxes(v.sum(1)[:, :time], 2, 3)  # noqa: E731  [B,T,G,N]
    return dict(
        x=dx, dt=ddt, z=dz, B=by_time(dB), C=by_time(dC), A=dA.sum(0).T, D=dD.sum((0, 1)),
        dt_bias=ddt.sum((0, 1)), initial_state=jnp.swapaxes(dh0, 1, 2),
    )
