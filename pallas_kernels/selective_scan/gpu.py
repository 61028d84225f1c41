"""Selective-scan kernels for GPUs (Pallas Triton lowering).

One program per (batch row, block of ``block_d`` channels) holds the state
``h [block_d, N]`` in registers and walks the sequence with ``lax.fori_loop``.
The forward writes y, the final state, and the state at the start of every
chunk of ``chunk`` steps (checkpoints ``[B, T/chunk, D, N]``). The backward
visits chunks in reverse: it recomputes the chunk's states from its checkpoint
into a per-program buffer ``[chunk, block_d, N]`` (HBM, O(B*chunk*D*N) and not
kept after the call), then runs the adjoint backwards through the chunk.
B and C rows are shared by groups; ``onehot [block_d, G]`` maps channels to
groups, so a block may span groups and D need not be a multiple of D/G.
Triton wants power-of-2 sides on every loaded tile: block_d and N (ops.py pads
both); groups are read one at a time, so G is free.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.selective_scan import _step

N_AXIS = 1  # state tiles are [block_d, N]; channel vectors [block_d, 1]


# Triton, explicitly: with no compiler params a GPU pallas_call lowers through
# Mosaic GPU when jax_pallas_use_mosaic_gpu is on (the default in jax 0.10),
# and these kernels are written for Triton. 4 warps: the [block_d, N] float32
# state is 512 values at the defaults, 4 per thread.
TRITON = plgpu.CompilerParams(num_warps=4, num_stages=1)


# Groups are read with ref indexing, one group at a time: Triton lowers no
# slicing of a loaded value (``lax.slice``), and G need not be a power of 2.


def _group_column(onehot_ref, g):
    """``[block_d, 1]``: 1 for the block's channels in group g."""
    return onehot_ref[:, g][:, None]


def _by_channel(onehot_ref, rows_ref, t):
    """Row t of ``[T, G, N]`` group rows -> per-channel float32 ``[block_d, N]``."""
    return sum(_group_column(onehot_ref, g) * rows_ref[t, g, :].astype(jnp.float32)[None, :]
               for g in range(onehot_ref.shape[1]))


def _store_by_group(out_ref, t, onehot_ref, tile):
    """``out[t, g] = sum of tile [block_d, N] over the channels of group g``."""
    for g in range(onehot_ref.shape[1]):
        out_ref[t, g, :] = jnp.sum(_group_column(onehot_ref, g) * tile, axis=0)


def _column(row_ref, t):
    """Row t of a ``[T, block_d]`` ref as a float32 column ``[block_d, 1]``."""
    return row_ref[t, :].astype(jnp.float32)[:, None]


def _step_inputs(t, x_ref, dt_ref, z_ref, B_ref, C_ref, keep_ref, onehot_ref):
    """Everything the step at time t reads, float32, in the [block_d, .] layout."""
    return dict(
        x=_column(x_ref, t),
        dt=_column(dt_ref, t),
        z=None if z_ref is None else _column(z_ref, t),
        B=_by_channel(onehot_ref, B_ref, t),
        C=_by_channel(onehot_ref, C_ref, t),
        keep=keep_ref[t],
    )


def _chunk_bounds(c, chunk, time):
    start = c * chunk
    return start, jnp.minimum(start + chunk, time)


def _forward_kernel(*refs, gated: bool, dt_softplus: bool, chunk: int):
    """Refs: x, dt, [z], A, dt_bias, D, B, C, onehot, keep, h0 -> y, final, checkpoints."""
    refs = list(refs)
    x_ref, dt_ref = refs.pop(0), refs.pop(0)
    z_ref = refs.pop(0) if gated else None
    A_ref, bias_ref, D_ref, B_ref, C_ref, onehot_ref, keep_ref, h0_ref = refs[:8]
    y_ref, final_ref, ckpt_ref = refs[8:]
    time, n_chunks = x_ref.shape[0], ckpt_ref.shape[0]
    A, bias, D = A_ref[...], bias_ref[...], D_ref[...]

    def step(t, h):
        s = _step_inputs(t, x_ref, dt_ref, z_ref, B_ref, C_ref, keep_ref, onehot_ref)
        delta, _ = _step.step_size(s["dt"], bias, dt_softplus)
        h, y = _step.scan_step(h, s["x"], delta, s["keep"], A, s["B"], s["C"], n_axis=N_AXIS)
        y_ref[t, :] = _step.gated_output(y, s["x"], D, s["z"])[:, 0].astype(y_ref.dtype)
        return h

    def chunk_body(c, h):
        ckpt_ref[c] = h
        return jax.lax.fori_loop(*_chunk_bounds(c, chunk, time), step, h)

    final_ref[...] = jax.lax.fori_loop(0, n_chunks, chunk_body, h0_ref[...])


def _backward_kernel(*refs, gated: bool, dt_softplus: bool, chunk: int):
    """Refs: x, dt, [z], A, dt_bias, D, B, C, onehot, keep, checkpoints, dy, dfinal
    -> dx, ddt, [dz], dB, dC, dA, dD, dh0, states (scratch)."""
    refs = list(refs)
    x_ref, dt_ref = refs.pop(0), refs.pop(0)
    z_ref = refs.pop(0) if gated else None
    A_ref, bias_ref, D_ref, B_ref, C_ref, onehot_ref, keep_ref, ckpt_ref, dy_ref, dfinal_ref = (
        refs[:10]
    )
    refs = refs[10:]
    dx_ref, ddt_ref = refs.pop(0), refs.pop(0)
    dz_ref = refs.pop(0) if gated else None
    dB_ref, dC_ref, dA_ref, dD_ref, dh0_ref, states_ref = refs
    time, n_chunks = x_ref.shape[0], ckpt_ref.shape[0]
    A, bias, D = A_ref[...], bias_ref[...], D_ref[...]

    def load(t):
        return _step_inputs(t, x_ref, dt_ref, z_ref, B_ref, C_ref, keep_ref, onehot_ref)

    def chunk_body(i, carry):
        c = n_chunks - 1 - i
        start, stop = _chunk_bounds(c, chunk, time)
        h_start = ckpt_ref[c]

        def recompute(t, h):
            s = load(t)
            delta, _ = _step.step_size(s["dt"], bias, dt_softplus)
            h, _ = _step.scan_step(h, s["x"], delta, s["keep"], A, s["B"], s["C"], n_axis=N_AXIS)
            states_ref[t - start] = h
            return h

        jax.lax.fori_loop(start, stop, recompute, h_start)

        def reverse(j, carry):
            g, dA, dD = carry
            t = stop - 1 - j
            s = load(t)
            h_prev = jnp.where(t > start, states_ref[jnp.maximum(t - start - 1, 0)], h_start)
            g, grads = _step.adjoint_step(
                g, states_ref[t - start], h_prev, s["x"], s["dt"], bias, s["keep"], A,
                s["B"], s["C"], D, s["z"], _column(dy_ref, t),
                dt_softplus=dt_softplus, n_axis=N_AXIS,
            )
            dx_ref[t, :] = grads["dx"][:, 0]
            ddt_ref[t, :] = grads["ddt"][:, 0]
            if gated:
                dz_ref[t, :] = grads["dz"][:, 0]
            _store_by_group(dB_ref, t, onehot_ref, grads["dB"])
            _store_by_group(dC_ref, t, onehot_ref, grads["dC"])
            return g, dA + grads["dA"], dD + grads["dD"]

        return jax.lax.fori_loop(0, stop - start, reverse, carry)

    zeros = jnp.zeros_like(A)
    g, dA, dD = jax.lax.fori_loop(
        0, n_chunks, chunk_body, (dfinal_ref[...], zeros, jnp.zeros_like(D))
    )
    dh0_ref[...], dA_ref[...], dD_ref[...] = g, dA, dD


class _Specs:
    """BlockSpecs of one call; grid = (batch, channel blocks)."""

    def __init__(self, time, state, groups, n_chunks, block_d):
        self.rows = pl.BlockSpec((None, time, block_d), lambda b, d: (b, 0, d))  # [B,T,D]
        self.state = pl.BlockSpec((None, block_d, state), lambda b, d: (b, d, 0))  # [B,D,N]
        self.per_d = lambda cols: pl.BlockSpec((block_d, cols), lambda b, d: (d, 0))  # [D,.]
        self.groups = pl.BlockSpec((None, time, groups, state), lambda b, d: (b, 0, 0, 0))
        self.keep = pl.BlockSpec((None, time), lambda b, d: (b, 0))  # [B,T]
        self.ckpt = pl.BlockSpec((None, n_chunks, block_d, state), lambda b, d: (b, 0, d, 0))
        # Per-block group sums [B,T,D/block_d,G,N] and the states buffer [B,C,D,N].
        self.group_sums = pl.BlockSpec(
            (None, time, None, groups, state), lambda b, d: (b, 0, d, 0, 0)
        )


def _shared_inputs(specs, x, dt, z, A, dt_bias, D, B, C, onehot, keep):
    """Inputs and specs common to both kernels (z only when gated)."""
    columns = [dt_bias[:, None], D[:, None]]  # [D,1] each
    args = [x, dt] + ([z] if z is not None else []) + [A, *columns, B, C, onehot, keep]
    in_specs = [specs.rows, specs.rows] + ([specs.rows] if z is not None else []) + [
        specs.per_d(A.shape[1]), specs.per_d(1), specs.per_d(1), specs.groups, specs.groups,
        specs.per_d(onehot.shape[1]), specs.keep,
    ]
    return args, in_specs


@functools.partial(jax.jit, static_argnames=("dt_softplus", "chunk", "block_d", "interpret"))
def forward(x, dt, z, A, dt_bias, D, B, C, onehot, keep, h0, *, dt_softplus, chunk, block_d,
            interpret):
    """Returns y ``[B,T,D]`` (x's dtype), final state and checkpoints (float32).

    Shapes: A ``[D,N]``; dt_bias, D ``[D]``; B, C ``[B,T,G,N]``; onehot
    ``[D,G]``; keep ``[B,T]`` float32; h0 ``[B,D,N]``; z ``[B,T,D]`` or None;
    block_d divides D.
    """
    batch, time, channels = x.shape
    state, groups = A.shape[1], B.shape[2]
    n_chunks = pl.cdiv(time, chunk)
    specs = _Specs(time, state, groups, n_chunks, block_d)
    args, in_specs = _shared_inputs(specs, x, dt, z, A, dt_bias, D, B, C, onehot, keep)
    kernel = functools.partial(
        _forward_kernel, gated=z is not None, dt_softplus=dt_softplus, chunk=chunk
    )
    f32 = jnp.float32
    return pl.pallas_call(
        kernel,
        grid=(batch, channels // block_d),
        in_specs=in_specs + [specs.state],
        out_specs=[specs.rows, specs.state, specs.ckpt],
        out_shape=[
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct((batch, channels, state), f32),
            jax.ShapeDtypeStruct((batch, n_chunks, channels, state), f32),
        ],
        interpret=interpret,
        compiler_params=TRITON,
        name="selective_scan_forward",
    )(*args, h0)


@functools.partial(jax.jit, static_argnames=("dt_softplus", "chunk", "block_d", "interpret"))
def backward(x, dt, z, A, dt_bias, D, B, C, onehot, keep, checkpoints, dy, dfinal, *,
             dt_softplus, chunk, block_d, interpret):
    """Float32 gradients keyed by argument name: x, dt, z (None without z) ``[B,T,D]``;
    B, C ``[B,T,G,N]``; A ``[D,N]``; D, dt_bias ``[D]``; initial_state ``[B,D,N]``."""
    batch, time, channels = x.shape
    state, groups = A.shape[1], B.shape[2]
    n_chunks, n_blocks = checkpoints.shape[1], channels // block_d
    specs = _Specs(time, state, groups, n_chunks, block_d)
    args, in_specs = _shared_inputs(specs, x, dt, z, A, dt_bias, D, B, C, onehot, keep)
    gated = z is not None
    f32 = jnp.float32
    btd = jax.ShapeDtypeStruct(x.shape, f32)
    group_sums = jax.ShapeDtypeStruct((batch, time, n_blocks, groups, state), f32)
    bdn = jax.ShapeDtypeStruct((batch, channels, state), f32)
    states = pl.BlockSpec((None, min(chunk, time), block_d, state), lambda b, d: (b, 0, d, 0))
    out_shape = [btd, btd] + ([btd] if gated else []) + [
        group_sums, group_sums, bdn, jax.ShapeDtypeStruct((batch, channels, 1), f32), bdn,
        jax.ShapeDtypeStruct((batch, min(chunk, time), channels, state), f32),
    ]
    out_specs = [specs.rows, specs.rows] + ([specs.rows] if gated else []) + [
        specs.group_sums, specs.group_sums, specs.state,
        pl.BlockSpec((None, block_d, 1), lambda b, d: (b, d, 0)), specs.state, states,
    ]
    kernel = functools.partial(
        _backward_kernel, gated=gated, dt_softplus=dt_softplus, chunk=chunk
    )
    outs = list(pl.pallas_call(
        kernel,
        grid=(batch, n_blocks),
        in_specs=in_specs + [specs.ckpt, specs.rows, specs.state],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=TRITON,
        name="selective_scan_backward",
    )(*args, checkpoints, dy, dfinal))
    dx, ddt = outs.pop(0), outs.pop(0)
    dz = outs.pop(0) if gated else None
    dB, dC, dA, dD, dh0, _ = outs
    return dict(
        x=dx, dt=ddt, z=dz, B=dB.sum(2), C=dC.sum(2), A=dA.sum(0), D=dD.sum((0, 2)),
        dt_bias=ddt.sum((0, 1)), initial_state=dh0,
    )
