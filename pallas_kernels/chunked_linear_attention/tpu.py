"""TPU kernels (Pallas, Mosaic TPU): grid (batch, head, V block, chunk).

The chunk axis is last and "arbitrary" (sequential): the ``[K, BV]`` float32
state lives in a VMEM scratch across its iterations, while the pipeline brings
one chunk's ``[C, K]`` / ``[C, BV]`` tiles per step. The backward grid visits
the chunks in reverse (index maps ``N - 1 - n``) carrying the state gradient.
Inputs are head-major ``[B,H,T,X]`` so every block's last two dims are
``(C, 128 k)`` or whole axes; K and V are padded to multiples of 128 lanes.
Per-step vectors come in both column (``[C, 1]``) and row (``[1, C]``) form
so that no in-kernel transpose is needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._call import call
from pallas_kernels._tpu import interpret_params
from pallas_kernels.chunked_linear_attention import _chunk


def _heads_first(x):
    return jnp.transpose(x, (0, 2, 1, 3))


def _specs(p, chunk: int, block_v: int, reverse: bool):
    """Inputs shared by forward and backward over grid (b, h, j, n)."""
    b, tp, h, kd = p.q.shape
    n = tp // chunk
    at = (lambda i: n - 1 - i) if reverse else (lambda i: i)
    col = lambda x: None if x is None else x[:, :, None]  # [B,Tp] -> [B,Tp,1]
    kg = 1 if p.g is None else p.g.shape[-1]
    seq = lambda last: pl.BlockSpec((None, None, chunk, last),
                                    lambda b, h, j, i: (b, h, at(i), 0))
    per_batch = pl.BlockSpec((None, chunk, 1), lambda b, h, j, i: (b, at(i), 0))
    return {
        "q": (_heads_first(p.q), seq(kd)),
        "k": (_heads_first(p.k), seq(kd)),
        "v": (_heads_first(p.v), pl.BlockSpec((None, None, chunk, block_v),
                                              lambda b, h, j, i: (b, h, at(i), j))),
        "g": (p.g, seq(kg)),
        "g_row": (None if p.g_row is None else p.g_row[:, :, :, None, :], pl.BlockSpec((None, None, None, 1, chunk),
                                             lambda b, h, j, i: (b, h, at(i), 0, 0))),
        "tot": (None if p.tot is None else p.tot[..., None],
                pl.BlockSpec((None, None, None, kg, 1), lambda b, h, j, i: (b, h, at(i), 0, 0))),
        "r": (col(p.r), per_batch),
        "r_row": (None if p.r is None else p.r.reshape(b, n, 1, chunk), pl.BlockSpec((None, None, 1, chunk),
                                         lambda b, h, j, i: (b, at(i), 0, 0))),
        "seg_in": (col(p.seg_in), per_batch),
        "seg_out": (col(p.seg_out), per_batch),
    }


def _state_spec(kd: int, block_v: int):
    return pl.BlockSpec((None, None, kd, block_v), lambda b, h, j, i: (b, h, 0, j))


def _states_spec(kd: int, block_v: int, n: int, reverse: bool):
    at = (lambda i: n - 1 - i) if reverse else (lambda i: i)
    return pl.BlockSpec((None, None, None, kd, block_v), lambda b, h, j, i: (b, h, at(i), 0, j))


def _params():
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def forward(p, initial_state, *, block_sizes, scale: float, interpret: bool):
    """Runs the forward kernel; arguments and returns as ``gpu.forward``."""
    chunk, sub_chunk, block_v = block_sizes.chunk, block_sizes.sub_chunk, block_sizes.block_v
    b, tp, h, kd = p.q.shape
    vd = p.v.shape[-1]
    n = tp // chunk
    f32 = jnp.float32
    inputs = _specs(p, chunk, block_v, reverse=False)
    inputs["s0"] = (initial_state, _state_spec(kd, block_v))
    outputs = {
        "o": (jax.ShapeDtypeStruct((b, h, tp, vd), p.v.dtype),
              pl.BlockSpec((None, None, chunk, block_v), lambda b, h, j, i: (b, h, i, j))),
        "states": (jax.ShapeDtypeStruct((b, h, n, kd, vd), f32),
                   _states_spec(kd, block_v, n, reverse=False)),
        "final": (jax.ShapeDtypeStruct((b, h, kd, vd), f32), _state_spec(kd, block_v)),
    }
    ch = _chunk.Chunk(start=0, index=0, size=chunk)

    def kernel(refs):
        i = pl.program_id(3)
        carry = refs["carry"]

        @pl.when(i == 0)
        def _():
            carry[...] = refs["s0"][...] if "s0" in refs else jnp.zeros((kd, block_v), f32)

        x = _chunk.refs_of(refs)
        state = carry[...]
        ch.store_block(refs["states"], state)
        _chunk.forward_chunk(x, ch, state, refs["o"], scale=scale, sub_chunk=sub_chunk)
        state = _chunk.next_state(x, ch, state)
        carry[...] = state

        @pl.when(i == n - 1)
        def _():
            refs["final"][...] = state

    out = call(kernel, inputs, outputs, grid=(b, h, vd // block_v, n),
               interpret=interpret_params(interpret), compiler_params=_params(),
               scratch={"carry": pltpu.VMEM((kd, block_v), f32)},
               name="chunked_linear_attention_fwd")
    return _heads_first(out["o"]), out["states"], out["final"]


def backward(p, do, states, dfinal, *, block_sizes, scale: float, interpret: bool) -> dict:
    """Runs the backward kernel; arguments and returns as ``gpu.backward``."""
    chunk, sub_chunk, block_v = block_sizes.chunk, block_sizes.sub_chunk, block_sizes.block_v
    b, tp, h, kd = p.q.shape
    vd = p.v.shape[-1]
    n = tp // chunk
    nv = vd // block_v
    f32 = jnp.float32
    inputs = _specs(p, chunk, block_v, reverse=True)
    inputs["do"] = (_heads_first(do), pl.BlockSpec((None, None, chunk, block_v),
                                                   lambda b, h, j, i: (b, h, n - 1 - i, j)))
    inputs["states"] = (states, _states_spec(kd, block_v, n, reverse=True))
    inputs["dfinal"] = (dfinal, _state_spec(kd, block_v))
    partial = lambda last: (
        jax.ShapeDtypeStruct((nv, b, h, tp, last), f32),
        pl.BlockSpec((None, None, None, chunk, last), lambda b, h, j, i: (j, b, h, n - 1 - i, 0)))
    outputs = {
        "dq": partial(kd),
        "dk": partial(kd),
        "dv": (jax.ShapeDtypeStruct((b, h, tp, vd), f32),
               pl.BlockSpec((None, None, chunk, block_v), lambda b, h, j, i: (b, h, n - 1 - i, j))),
        "ds0": (jax.ShapeDtypeStruct((b, h, kd, vd), f32), _state_spec(kd, block_v)),
    }
    if p.g is not None:
        outputs["dga"] = outputs["dgb"] = partial(p.g.shape[-1])
    ch = _chunk.Chunk(start=0, index=0, size=chunk)

    def kernel(refs):
        i = pl.program_id(3)
        carry = refs["carry"]

        @pl.when(i == 0)
        def _():
            carry[...] = refs["dfinal"][...]

        x = _chunk.refs_of(refs)
        dstate = carry[...]
        _chunk.backward_chunk(x, ch, lambda: refs["states"][...], lambda: dstate, refs,
                              scale=scale, sub_chunk=sub_chunk)
        dstate = _chunk.previous_dstate(x, ch, dstate, scale=scale)
        carry[...] = dstate

        @pl.when(i == n - 1)
        def _():
            refs["ds0"][...] = dstate

    out = call(kernel, inputs, outputs, grid=(b, h, nv, n),
               interpret=interpret_params(interpret), compiler_params=_params(),
               scratch={"carry": pltpu.VMEM((kd, block_v), f32)},
               name="chunked_linear_attention_bwd")
    grads = {"dq": _heads_first(out["dq"].sum(0)), "dk": _heads_first(out["dk"].sum(0)),
             "dv": _heads_first(out["dv"]), "ds0": out["ds0"]}
    if p.g is not None:
        grads["dga"], grads["dgb"] = out["dga"].sum(0), out["dgb"].sum(0)
    return grads
