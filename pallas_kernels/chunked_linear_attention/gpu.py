"""GPU kernels (Pallas, Triton lowering), two per pass.

Forward: (1) the state recurrence, one program per (batch, head, V block)
walking the chunks in a ``lax.fori_loop`` with the ``[K, BV]`` float32 state
in registers, storing the state entering each chunk (``states [B,H,N*K,V]``,
also the backward's residual); (2) the outputs, one program per (batch, head,
V block, chunk): in-chunk quadratic part + the entering state's part.
Backward: (1) the state-gradient recurrence in reverse (``dstates``); (2) the
gradients, one program per chunk, recomputing the in-chunk quantities.

q, k, v stay in their ``[B,T,H,X]`` layout (BlockSpecs squeeze the head axis);
each program indexes its chunk with 2D ``pl.ds`` loads whose sides are powers
of two; cumulative sums come from XLA. dq and dk sum over V, so with several V
blocks each program writes its own partial (``[NV, ...]``), summed in XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._call import call
from pallas_kernels.chunked_linear_attention import _chunk

NUM_STAGES = 2


def _specs(p, chunk: int, block_v: int):
    """Inputs every kernel reads: name -> (array, BlockSpec) over grid (b, h, j[, chunk])."""
    b, tp, h, kd = p.q.shape
    n = tp // chunk
    col = lambda x: None if x is None else x[:, :, None]  # [B,Tp] -> [B,Tp,1]
    kg = None if p.g is None else p.g.shape[-1]
    tot = None if p.tot is None else p.tot.reshape(b, h, n * p.tot.shape[-1], 1)
    r_row = None if p.r is None else p.r.reshape(b, n, chunk)
    seq = lambda last: pl.BlockSpec((None, tp, None, last), lambda b, h, j, *_: (b, 0, h, 0))
    seq_v = pl.BlockSpec((None, tp, None, block_v), lambda b, h, j, *_: (b, 0, h, j))
    per_head = lambda shape: pl.BlockSpec((None, None, *shape), lambda b, h, j, *_: (b, h, 0, 0))
    per_batch = lambda shape: pl.BlockSpec((None, *shape), lambda b, h, j, *_: (b, 0, 0))
    return {
        "q": (p.q, seq(kd)),
        "k": (p.k, seq(kd)),
        "v": (p.v, seq_v),
        "g": (p.g, per_head((tp, kg))),
        "g_row": (p.g_row, per_head((n, chunk))),
        "tot": (tot, per_head((None if tot is None else tot.shape[2], 1))),
        "r": (col(p.r), per_batch((tp, 1))),
        "r_row": (r_row, per_batch((n, chunk))),
        "seg_in": (col(p.seg_in), per_batch((tp, 1))),
        "seg_out": (col(p.seg_out), per_batch((tp, 1))),
    }


def _state_spec(kd: int, block_v: int):
    return pl.BlockSpec((None, None, kd, block_v), lambda b, h, j, *_: (b, h, 0, j))


def _stacked_spec(n: int, kd: int, block_v: int):
    """One ``[K, BV]`` block per chunk, stacked: ``[B,H,N*K,V]``."""
    return pl.BlockSpec((None, None, n * kd, block_v), lambda b, h, j, *_: (b, h, 0, j))


def _chunk_at(i, chunk: int):
    return _chunk.Chunk(start=pl.multiple_of(i * chunk, chunk), index=i, size=chunk)


def _params(kd: int, block_v: int, *, grads: bool = False):
    """4 warps while the carried ``[K, BV]`` float32 state fits 32 registers a thread, else 8.

    The gradient kernel holds several ``[C, K]`` and ``[C, BV]`` tiles at once
    and always gets 8 (at 4 it spilled on sm_90: ``benchmarks/kernel_compile.py``).
    """
    num_warps = 4 if kd * block_v <= 128 * 32 and not grads else 8
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=NUM_STAGES)


def forward(p, initial_state, *, block_sizes, scale: float, interpret: bool):
    """Runs the forward kernels.

    Args:
      p: ``ops.Prepared`` inputs; initial_state: ``[B,H,Kp,Vp]`` float32 or None.
      block_sizes: ``ops.BlockSizes`` for this target (chunk, sub_chunk, block_v).
      scale: output scale; interpret: run in Pallas interpret mode.
    Returns:
      ``(o [B,Tp,H,Vp] in v.dtype, states [B,H,N,Kp,Vp], final [B,H,Kp,Vp])``,
      states and final in float32; ``states[:, :, n]`` enters chunk ``n``.
    """
    chunk, sub_chunk, block_v = block_sizes.chunk, block_sizes.sub_chunk, block_sizes.block_v
    b, tp, h, kd = p.q.shape
    vd = p.v.shape[-1]
    n, nv = tp // chunk, vd // block_v
    f32 = jnp.float32
    common = dict(interpret=interpret, compiler_params=_params(kd, block_v))

    def state_kernel(refs):
        x = _chunk.refs_of(refs)
        state = refs["s0"][...] if "s0" in refs else jnp.zeros((kd, block_v), f32)

        def body(i, state):
            ch = _chunk_at(i, chunk)
            ch.store_block(refs["states"], state)
            return _chunk.next_state(x, ch, state)

        refs["final"][...] = lax.fori_loop(0, n, body, state)

    inputs = _specs(p, chunk, block_v)
    inputs["s0"] = (initial_state, _state_spec(kd, block_v))
    out = call(state_kernel, inputs, {
        "states": (jax.ShapeDtypeStruct((b, h, n * kd, vd), f32), _stacked_spec(n, kd, block_v)),
        "final": (jax.ShapeDtypeStruct((b, h, kd, vd), f32), _state_spec(kd, block_v)),
    }, grid=(b, h, nv), name="chunked_linear_attention_states", **common)

    def output_kernel(refs):
        ch = _chunk_at(pl.program_id(3), chunk)
        _chunk.forward_chunk(_chunk.refs_of(refs), ch, ch.block(refs["states"], kd), refs["o"],
                             scale=scale, sub_chunk=sub_chunk)

    inputs = _specs(p, chunk, block_v)
    inputs["states"] = (out["states"], _stacked_spec(n, kd, block_v))
    o = call(output_kernel, inputs, {
        "o": (jax.ShapeDtypeStruct((b, tp, h, vd), p.v.dtype),
              pl.BlockSpec((None, tp, None, block_v), lambda b, h, j, i: (b, 0, h, j))),
    }, grid=(b, h, nv, n), name="chunked_linear_attention_fwd", **common)["o"]
    return o, out["states"].reshape(b, h, n, kd, vd), out["final"]


def backward(p, do, states, dfinal, *, block_sizes, scale: float, interpret: bool) -> dict:
    """Runs the backward kernels.

    Args:
      p: ``ops.Prepared`` inputs; do: ``[B,Tp,H,Vp]`` output gradient.
      states: ``[B,H,N,Kp,Vp]`` from :func:`forward`; dfinal: ``[B,H,Kp,Vp]``.
      block_sizes, scale, interpret: as :func:`forward`.
    Returns:
      dict with ``dq, dk [B,Tp,H,Kp]``, ``dv [B,Tp,H,Vp]``, ``ds0 [B,H,Kp,Vp]``
      and, with decay, ``dga, dgb [B,H,Tp,Kg]`` (see ``ops._log_decay_grad``),
      all float32.
    """
    chunk, sub_chunk, block_v = block_sizes.chunk, block_sizes.sub_chunk, block_sizes.block_v
    b, tp, h, kd = p.q.shape
    vd = p.v.shape[-1]
    n, nv = tp // chunk, vd // block_v
    f32 = jnp.float32
    common = dict(interpret=interpret, compiler_params=_params(kd, block_v))
    inputs = _specs(p, chunk, block_v)
    inputs["do"] = (do, pl.BlockSpec((None, tp, None, block_v), lambda b, h, j, *_: (b, 0, h, j)))

    def dstate_kernel(refs):
        x = _chunk.refs_of(refs)

        def body(i, dstate):  # dstate: gradient of the state leaving chunk n - 1 - i
            ch = _chunk_at(n - 1 - i, chunk)
            ch.store_block(refs["dstates"], dstate)
            return _chunk.previous_dstate(x, ch, dstate, scale=scale)

        refs["ds0"][...] = lax.fori_loop(0, n, body, refs["dfinal"][...])

    out = call(dstate_kernel, {**inputs, "dfinal": (dfinal, _state_spec(kd, block_v))}, {
        "dstates": (jax.ShapeDtypeStruct((b, h, n * kd, vd), f32), _stacked_spec(n, kd, block_v)),
        "ds0": (jax.ShapeDtypeStruct((b, h, kd, vd), f32), _state_spec(kd, block_v)),
    }, grid=(b, h, nv), name="chunked_linear_attention_dstates", **common)

    partial = lambda last: (
        jax.ShapeDtypeStruct((nv, b, tp, h, last), f32),
        pl.BlockSpec((None, None, tp, None, last), lambda b, h, j, i: (j, b, 0, h, 0)))
    outputs = {
        "dq": partial(kd),
        "dk": partial(kd),
        "dv": (jax.ShapeDtypeStruct((b, tp, h, vd), f32),
               pl.BlockSpec((None, tp, None, block_v), lambda b, h, j, i: (b, 0, h, j))),
    }
    if p.g is not None:
        kg = p.g.shape[-1]
        for name in ("dga", "dgb"):
            outputs[name] = (jax.ShapeDtypeStruct((nv, b, h, tp, kg), f32),
                             pl.BlockSpec((None, None, None, tp, kg),
                                          lambda b, h, j, i: (j, b, h, 0, 0)))

    def grads_kernel(refs):
        ch = _chunk_at(pl.program_id(3), chunk)
        _chunk.backward_chunk(_chunk.refs_of(refs), ch, lambda: ch.block(refs["states"], kd),
                              lambda: ch.block(refs["dstates"], kd), refs, scale=scale,
                              sub_chunk=sub_chunk)

    inputs["states"] = (states.reshape(b, h, n * kd, vd), _stacked_spec(n, kd, block_v))
    inputs["dstates"] = (out["dstates"], _stacked_spec(n, kd, block_v))
    grads = call(grads_kernel, inputs, outputs, grid=(b, h, nv, n),
                 name="chunked_linear_attention_bwd",
                 **dict(common, compiler_params=_params(kd, block_v, grads=True)))
    result = {"dq": grads["dq"].sum(0), "dk": grads["dk"].sum(0), "dv": grads["dv"],
              "ds0": out["ds0"]}
    if p.g is not None:
        result["dga"], result["dgb"] = grads["dga"].sum(0), grads["dgb"].sum(0)
    return result
