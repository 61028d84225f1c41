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

from pallas_kernels._call import call
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


def _step_inputs(t, refs):
    """Everything the step at time t reads, float32, in the [block_d, .] layout."""
    onehot_ref = refs["onehot"]
    return dict(
        x=_column(refs["x"], t),
        dt=_column(refs["dt"], t),
        z=_column(refs["z"], t) if "z" in refs else None,
        B=_by_channel(onehot_ref, refs["B"], t),
        C=_by_channel(onehot_ref, refs["C"], t),
        keep=refs["keep"][t],
    )


def _chunk_bounds(c, chunk, time):
    start = c * chunk
    return start, jnp.minimum(start + chunk, time)


def _forward_kernel(refs, *, dt_softplus: bool, chunk: int):
    """Refs: x, dt, z (gated only), A, dt_bias, D, B, C, onehot, keep, h0 -> y, final,
    checkpoints."""
    y_ref, ckpt_ref = refs["y"], refs["checkpoints"]
    time, n_chunks = refs["x"].shape[0], ckpt_ref.shape[0]
    A, bias, D = refs["A"][...], refs["dt_bias"][...], refs["D"][...]

    def step(t, h):
        s = _step_inputs(t, refs)
        delta, _ = _step.step_size(s["dt"], bias, dt_softplus)
        h, y = _step.scan_step(h, s["x"], delta, s["keep"], A, s["B"], s["C"], n_axis=N_AXIS)
        y_ref[t, :] = _step.gated_output(y, s["x"], D, s["z"])[:, 0].astype(y_ref.dtype)
        return h

    def chunk_body(c, h):
        ckpt_ref[c] = h
        return jax.lax.fori_loop(*_chunk_bounds(c, chunk, time), step, h)

    refs["final"][...] = jax.lax.fori_loop(0, n_chunks, chunk_body, refs["h0"][...])


def _backward_kernel(refs, *, dt_softplus: bool, chunk: int):
    """Refs: x, dt, z (gated only), A, dt_bias, D, B, C, onehot, keep, checkpoints, dy,
    dfinal -> dx, ddt, dz (gated only), dB, dC, dA, dD, dh0, states (a buffer)."""
    ckpt_ref, states_ref, onehot_ref = refs["checkpoints"], refs["states"], refs["onehot"]
    time, n_chunks = refs["x"].shape[0], ckpt_ref.shape[0]
    A, bias, D = refs["A"][...], refs["dt_bias"][...], refs["D"][...]

    def chunk_body(i, carry):
        c = n_chunks - 1 - i
        start, stop = _chunk_bounds(c, chunk, time)
        h_start = ckpt_ref[c]

        def recompute(t, h):
            s = _step_inputs(t, refs)
            delta, _ = _step.step_size(s["dt"], bias, dt_softplus)
            h, _ = _step.scan_step(h, s["x"], delta, s["keep"], A, s["B"], s["C"], n_axis=N_AXIS)
            states_ref[t - start] = h
            return h

        jax.lax.fori_loop(start, stop, recompute, h_start)

        def reverse(j, carry):
            g, dA, dD = carry
            t = stop - 1 - j
            s = _step_inputs(t, refs)
            h_prev = jnp.where(t > start, states_ref[jnp.maximum(t - start - 1, 0)], h_start)
            g, grads = _step.adjoint_step(
                g, states_ref[t - start], h_prev, s["x"], s["dt"], bias, s["keep"], A,
                s["B"], s["C"], D, s["z"], _column(refs["dy"], t),
                dt_softplus=dt_softplus, n_axis=N_AXIS,
            )
            for name in ("dx", "ddt", "dz"):
                if name in refs:
                    refs[name][t, :] = grads[name][:, 0]
            _store_by_group(refs["dB"], t, onehot_ref, grads["dB"])
            _store_by_group(refs["dC"], t, onehot_ref, grads["dC"])
            return g, dA + grads["dA"], dD + grads["dD"]

        return jax.lax.fori_loop(0, stop - start, reverse, carry)

    g, dA, dD = jax.lax.fori_loop(
        0, n_chunks, chunk_body, (refs["dfinal"][...], jnp.zeros_like(A), jnp.zeros_like(D))
    )
    refs["dh0"][...], refs["dA"][...], refs["dD"][...] = g, dA, dD


class _Specs:
    """BlockSpecs of one call; grid = (batch, channel blocks)."""

    def __init__(self, time, state, groups, n_chunks, block_d):
        self.rows = pl.BlockSpec((None, time, block_d), lambda b, d: (b, 0, d))  # [B,T,D]
        self.state = pl.BlockSpec((None, block_d, state), lambda b, d: (b, d, 0))  # [B,D,N]
        self.per_d = lambda cols: pl.BlockSpec((block_d, cols), lambda b, d: (d, 0))  # [D,.]
        self.vector = pl.BlockSpec((None, block_d, 1), lambda b, d: (b, d, 0))  # [B,D,1]
        self.groups = pl.BlockSpec((None, time, groups, state), lambda b, d: (b, 0, 0, 0))
        self.keep = pl.BlockSpec((None, time), lambda b, d: (b, 0))  # [B,T]
        self.ckpt = pl.BlockSpec((None, n_chunks, block_d, state), lambda b, d: (b, 0, d, 0))
        # Per-block group sums [B,T,D/block_d,G,N].
        self.group_sums = pl.BlockSpec(
            (None, time, None, groups, state), lambda b, d: (b, 0, d, 0, 0)
        )


def _inputs(specs, x, dt, z, A, dt_bias, D, B, C, onehot, keep) -> dict:
    """Inputs both kernels read: name -> (array, BlockSpec); z is None without a gate."""
    return {
        "x": (x, specs.rows), "dt": (dt, specs.rows), "z": (z, specs.rows),
        "A": (A, specs.per_d(A.shape[1])),
        "dt_bias": (dt_bias[:, None], specs.per_d(1)), "D": (D[:, None], specs.per_d(1)),
        "B": (B, specs.groups), "C": (C, specs.groups),
        "onehot": (onehot, specs.per_d(onehot.shape[1])), "keep": (keep, specs.keep),
    }


@functools.partial(jax.jit, static_argnames=("block_sizes", "dt_softplus", "interpret"))
def forward(x, dt, z, A, dt_bias, D, B, C, onehot, keep, h0, *, block_sizes, dt_softplus,
            interpret):
    """Returns y ``[B,T,D]`` (x's dtype), final state and checkpoints (float32).

    Shapes: A ``[D,N]``; dt_bias, D ``[D]``; B, C ``[B,T,G,N]``; onehot
    ``[D,G]``; keep ``[B,T]`` float32; h0 ``[B,D,N]``; z ``[B,T,D]`` or None;
    ``block_sizes.block_d`` divides D.
    """
    batch, time, channels = x.shape
    state, groups = A.shape[1], B.shape[2]
    chunk, block_d = block_sizes.chunk, block_sizes.block_d
    n_chunks = pl.cdiv(time, chunk)
    specs = _Specs(time, state, groups, n_chunks, block_d)
    f32 = jnp.float32
    out = call(
        functools.partial(_forward_kernel, dt_softplus=dt_softplus, chunk=chunk),
        {**_inputs(specs, x, dt, z, A, dt_bias, D, B, C, onehot, keep), "h0": (h0, specs.state)},
        {"y": (jax.ShapeDtypeStruct(x.shape, x.dtype), specs.rows),
         "final": (jax.ShapeDtypeStruct((batch, channels, state), f32), specs.state),
         "checkpoints": (jax.ShapeDtypeStruct((batch, n_chunks, channels, state), f32),
                         specs.ckpt)},
        grid=(batch, channels // block_d),
        interpret=interpret,
        compiler_params=TRITON,
        name="selective_scan_forward",
    )
    return out["y"], out["final"], out["checkpoints"]


@functools.partial(jax.jit, static_argnames=("block_sizes", "dt_softplus", "interpret"))
def backward(x, dt, z, A, dt_bias, D, B, C, onehot, keep, checkpoints, dy, dfinal, *,
             block_sizes, dt_softplus, interpret):
    """Float32 gradients keyed by argument name: x, dt, z (None without z) ``[B,T,D]``;
    B, C ``[B,T,G,N]``; A ``[D,N]``; D, dt_bias ``[D]``; initial_state ``[B,D,N]``."""
    batch, time, channels = x.shape
    state, groups = A.shape[1], B.shape[2]
    chunk, block_d = block_sizes.chunk, block_sizes.block_d
    n_chunks, n_blocks = checkpoints.shape[1], channels // block_d
    specs = _Specs(time, state, groups, n_chunks, block_d)
    f32 = jnp.float32
    btd = jax.ShapeDtypeStruct(x.shape, f32)
    group_sums = jax.ShapeDtypeStruct((batch, time, n_blocks, groups, state), f32)
    bdn = jax.ShapeDtypeStruct((batch, channels, state), f32)
    rows = min(chunk, time)  # the states buffer: one chunk's states per program, [B,C,D,N]
    out = call(
        functools.partial(_backward_kernel, dt_softplus=dt_softplus, chunk=chunk),
        {**_inputs(specs, x, dt, z, A, dt_bias, D, B, C, onehot, keep),
         "checkpoints": (checkpoints, specs.ckpt), "dy": (dy, specs.rows),
         "dfinal": (dfinal, specs.state)},
        {"dx": (btd, specs.rows), "ddt": (btd, specs.rows),
         "dz": (None if z is None else btd, specs.rows),
         "dB": (group_sums, specs.group_sums), "dC": (group_sums, specs.group_sums),
         "dA": (bdn, specs.state),
         "dD": (jax.ShapeDtypeStruct((batch, channels, 1), f32), specs.vector),
         "dh0": (bdn, specs.state),
         "states": (jax.ShapeDtypeStruct((batch, rows, channels, state), f32),
                    pl.BlockSpec((None, rows, block_d, state), lambda b, d: (b, 0, d, 0)))},
        grid=(batch, n_blocks),
        interpret=interpret,
        compiler_params=TRITON,
        name="selective_scan_backward",
    )
    return dict(
        x=out["dx"], dt=out["ddt"], z=out.get("dz"), B=out["dB"].sum(2), C=out["dC"].sum(2),
        A=out["dA"].sum(0), D=out["dD"].sum((0, 2)), dt_bias=out["ddt"].sum((0, 1)),
        initial_state=out["dh0"],
    )
