"""GPU kernels (Pallas, Triton lowering): FlashAttention-2 forward and backward.

Forward: one program per (batch, query head, query block), a ``fori_loop``
over the key blocks it can see (the causal / window band gives the bounds;
segments are masked inside), saving ``lse``. Backward, as FlashAttention-2:
a dq kernel with the same grid and loop, and a dk/dv kernel with one program
per (batch, key/value head, key block) looping over the ``G`` query heads of
its group and the query blocks that see it, so GQA/MQA never repeats K/V and
dk, dv need no reduction outside.

Arrays keep the ``[B,T,H,X]`` layout (BlockSpecs squeeze the head axis and
cover the whole key sequence; programs load ``[C, X]`` tiles with ``pl.ds``).
Segment ids come as query columns ``[B,T,1]`` and key rows ``[B,1,S]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._call import call
from pallas_kernels.attention import _block

NUM_STAGES = 2


def _params(head_dim: int):
    """4 warps for head dims up to 64, else 8 (a ``[C,128]`` float32 accumulator)."""
    return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=NUM_STAGES)


def _band(block_sizes, causal, window, q_len, kv_len):
    return _block.Band(causal=causal, window=window, q_len=q_len, kv_len=kv_len,
                       block_q=block_sizes.block_q, block_k=block_sizes.block_k)


def _rows(i, size):
    """Block ``i`` of ``size`` rows: a ``pl.ds`` index."""
    return pl.ds(pl.multiple_of(i * size, size), size)


def _key_tiles(refs, j, bk):
    """Key block ``j``: ``(k [Ck,K], v [Ck,V], kv_seg [1,Ck] or None)``."""
    rows = _rows(j, bk)
    kv_seg = refs["kv_seg"][:, rows] if "kv_seg" in refs else None
    return refs["k"][rows, :], refs["v"][rows, :], kv_seg


def _seg_inputs(q_seg, kv_seg, q_spec, kv_spec):
    return {"q_seg": (None if q_seg is None else q_seg[:, :, None], q_spec),
            "kv_seg": (None if kv_seg is None else kv_seg[:, None, :], kv_spec)}


def forward(q, k, v, q_seg, kv_seg, *, block_sizes, causal: bool, window, scale: float,
            softcap, q_len: int, kv_len: int, interpret: bool):
    """Runs the forward kernel.

    Args:
      q: ``[B,Tp,H,Kp]``; k: ``[B,Sp,Hkv,Kp]``; v: ``[B,Sp,Hkv,Vp]`` (padded: ``ops``).
      q_seg, kv_seg: ``[B,Tp]``, ``[B,Sp]`` int32 or both None.
      block_sizes: ``ops.BlockSizes`` for this target; the rest as ``ops._Config``.
    Returns:
      ``(o [B,Tp,H,Vp] in q.dtype, lse [B,H,Tp,1] float32)``.
    """
    bq, bk = block_sizes.block_q, block_sizes.block_k
    b, tp, h, kd = q.shape
    sp, hkv, vd = k.shape[1], k.shape[2], v.shape[3]
    groups = h // hkv
    band = _band(block_sizes, causal, window, q_len, kv_len)

    def kernel(refs):
        i = pl.program_id(2)
        q_i = refs["q"][...]
        q_seg_i = refs["q_seg"][...] if "q_seg" in refs else None

        def body(j, carry):
            k_j, v_j, kv_seg_j = _key_tiles(refs, j, bk)
            vis = band.visible(i, j, q_seg_i, kv_seg_j)
            return _block.forward_step(carry, q_i, k_j, v_j, vis, scale=scale, softcap=softcap)

        lo, hi = band.key_blocks(i)
        o, lse = _block.finish(lax.fori_loop(lo, hi, body, _block.init_carry(bq, vd)))
        refs["o"][...] = o.astype(refs["o"].dtype)
        refs["lse"][...] = lse

    seq = lambda last: pl.BlockSpec((None, sp, None, last), lambda b, h, i: (b, 0, h // groups, 0))
    inputs = {
        "q": (q, pl.BlockSpec((None, bq, None, kd), lambda b, h, i: (b, i, h, 0))),
        "k": (k, seq(kd)),
        "v": (v, seq(vd)),
        **_seg_inputs(q_seg, kv_seg, pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0)),
                      pl.BlockSpec((None, 1, sp), lambda b, h, i: (b, 0, 0))),
    }
    out = call(kernel, inputs, {
        "o": (jax.ShapeDtypeStruct((b, tp, h, vd), q.dtype),
              pl.BlockSpec((None, bq, None, vd), lambda b, h, i: (b, i, h, 0))),
        "lse": (jax.ShapeDtypeStruct((b, h, tp, 1), jnp.float32),
                pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))),
    }, grid=(b, h, tp // bq), interpret=interpret, compiler_params=_params(max(kd, vd)),
        name="attention_fwd")
    return out["o"], out["lse"]


def backward(q, k, v, q_seg, kv_seg, do, lse, delta, *, block_sizes, causal: bool, window,
             scale: float, softcap, q_len: int, kv_len: int, interpret: bool):
    """Runs the dq kernel and the dk/dv kernel.

    Args:
      q, k, v, q_seg, kv_seg: as :func:`forward`; do: ``[B,Tp,H,Vp]`` in q.dtype.
      lse: ``[B,H,Tp,1]`` from :func:`forward`; delta: ``[B,H,Tp,1]`` float32 ``do . o``.
    Returns:
      ``(dq [B,Tp,H,Kp], dk [B,Sp,Hkv,Kp], dv [B,Sp,Hkv,Vp])`` float32.
    """
    bq, bk = block_sizes.block_q, block_sizes.block_k
    b, tp, h, kd = q.shape
    sp, hkv, vd = k.shape[1], k.shape[2], v.shape[3]
    groups, nq = h // hkv, tp // bq
    band = _band(block_sizes, causal, window, q_len, kv_len)
    f32 = jnp.float32
    common = dict(interpret=interpret, compiler_params=_params(max(kd, vd)))

    def dq_kernel(refs):
        i = pl.program_id(2)
        q_i, do_i = refs["q"][...], refs["do"][...]
        lse_i, delta_i = refs["lse"][...], refs["delta"][...]
        q_seg_i = refs["q_seg"][...] if "q_seg" in refs else None

        def body(j, dq):
            k_j, v_j, kv_seg_j = _key_tiles(refs, j, bk)
            vis = band.visible(i, j, q_seg_i, kv_seg_j)
            _, dz = _block.grad_logits(q_i, k_j, v_j, do_i, lse_i, delta_i, vis, scale=scale,
                                       softcap=softcap)
            return dq + _block.dot(dz, k_j, (1, 0), q_i.dtype)

        lo, hi = band.key_blocks(i)
        refs["dq"][...] = lax.fori_loop(lo, hi, body, jnp.zeros((bq, kd), f32))

    seq = lambda last: pl.BlockSpec((None, sp, None, last), lambda b, h, i: (b, 0, h // groups, 0))
    q_block = lambda last: pl.BlockSpec((None, bq, None, last), lambda b, h, i: (b, i, h, 0))
    row_block = pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))
    inputs = {
        "q": (q, q_block(kd)), "k": (k, seq(kd)), "v": (v, seq(vd)), "do": (do, q_block(vd)),
        "lse": (lse, row_block), "delta": (delta, row_block),
        **_seg_inputs(q_seg, kv_seg, pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0)),
                      pl.BlockSpec((None, 1, sp), lambda b, h, i: (b, 0, 0))),
    }
    dq = call(dq_kernel, inputs, {
        "dq": (jax.ShapeDtypeStruct((b, tp, h, kd), f32), q_block(kd)),
    }, grid=(b, h, nq), name="attention_bwd_dq", **common)["dq"]

    def dkv_kernel(refs):
        j = pl.program_id(2)
        k_j, v_j = refs["k"][...], refs["v"][...]
        kv_seg_j = refs["kv_seg"][...] if "kv_seg" in refs else None
        lo, hi = band.query_blocks(j, nq)

        def head(g, carry):
            def body(i, carry):
                dk, dv = carry
                rows = _rows(i, bq)
                q_i, do_i = refs["q"][rows, g, :], refs["do"][rows, g, :]
                lse_i, delta_i = refs["lse"][g, rows, :], refs["delta"][g, rows, :]
                q_seg_i = refs["q_seg"][rows, :] if "q_seg" in refs else None
                vis = band.visible(i, j, q_seg_i, kv_seg_j)
                p, dz = _block.grad_logits(q_i, k_j, v_j, do_i, lse_i, delta_i, vis, scale=scale,
                                           softcap=softcap)
                dv = dv + _block.dot(p, do_i, (0, 0), do_i.dtype)  # P^T dO
                dk = dk + _block.dot(dz, q_i, (0, 0), q_i.dtype)  # dZ^T Q
                return dk, dv

            return lax.fori_loop(lo, hi, body, carry)

        dk, dv = lax.fori_loop(0, groups, head, (jnp.zeros((bk, kd), f32),
                                                 jnp.zeros((bk, vd), f32)))
        refs["dk"][...] = dk
        refs["dv"][...] = dv

    grouped = lambda x: x.reshape(b, tp, hkv, groups, x.shape[3])  # [B,Tp,Hkv,G,X]
    by_group = lambda x: x.reshape(b, hkv, groups, tp, 1)  # [B,Hkv,G,Tp,1]
    group_seq = lambda last: pl.BlockSpec((None, tp, None, groups, last),
                                          lambda b, g, j: (b, 0, g, 0, 0))
    group_rows = pl.BlockSpec((None, None, groups, tp, 1), lambda b, g, j: (b, g, 0, 0, 0))
    k_block = lambda last: pl.BlockSpec((None, bk, None, last), lambda b, g, j: (b, j, g, 0))
    inputs = {
        "q": (grouped(q), group_seq(kd)), "k": (k, k_block(kd)), "v": (v, k_block(vd)),
        "do": (grouped(do), group_seq(vd)), "lse": (by_group(lse), group_rows),
        "delta": (by_group(delta), group_rows),
        **_seg_inputs(q_seg, kv_seg, pl.BlockSpec((None, tp, 1), lambda b, g, j: (b, 0, 0)),
                      pl.BlockSpec((None, 1, bk), lambda b, g, j: (b, 0, j))),
    }
    out = call(dkv_kernel, inputs, {
        "dk": (jax.ShapeDtypeStruct((b, sp, hkv, kd), f32), k_block(kd)),
        "dv": (jax.ShapeDtypeStruct((b, sp, hkv, vd), f32), k_block(vd)),
    }, grid=(b, hkv, sp // bk), name="attention_bwd_dkv", **common)
    return dq, out["dk"], out["dv"]
