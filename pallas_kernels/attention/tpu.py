"""TPU: JAX's splash attention where it covers the call, else our kernels' Mosaic form.

Splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) has
causal and local masks, segment ids, a logit soft cap and MQA, forward and
backward: :func:`splash_attention` adapts a call to it (one MQA kernel per
key/value head, ``vmap``-ed over batch and key/value heads, so GQA repeats
nothing; ``scale`` folded into q; T and S padded to whole blocks). Its
softmax needs every query to see at least one key, which two kinds of call
break (:func:`splash_unsupported`): segment ids given as a ``(q_ids, kv_ids)``
pair, and a causal mask with ``T > S`` (the first ``T - S`` queries see no
key). Those run :func:`forward` / :func:`backward`: the GPU kernels' math
(``_block``) on a Mosaic grid.

Our Mosaic kernels: grid (batch, head, query block, key block) with the key
axis "arbitrary" and ``m``, ``l`` and the accumulator in VMEM scratch (dq the
same); dk/dv over (batch, key/value head, key block, query head of the group,
query block), the last two "arbitrary". Blocks the band cannot see are
skipped with ``pl.when``. Arrays are head-major ``[B,H,T,X]`` (block shapes end
in ``(C, 128 k)``), segment ids query columns ``[B,T,1]`` and key rows ``[B,1,S]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from pallas_kernels._call import call
from pallas_kernels._tpu import interpret_params
from pallas_kernels.attention import _block


def splash_unsupported(cfg, segments: str | None) -> str | None:
    """Why splash attention cannot serve this call, or None when it can.

    Args:
      cfg: ``ops._Config``.
      segments: None, ``"runs"`` (one ``[B,T]`` array: each query's own key
        shares its segment) or ``"pair"`` (``(q_ids, kv_ids)``).
    """
    if segments == "pair":
        return ("segment ids as a (q_ids, kv_ids) pair may leave a query no key, and "
                "splash's softmax needs every query to see one")
    if cfg.causal and cfg.q_len > cfg.kv_len:
        return (f"causal with T={cfg.q_len} > S={cfg.kv_len} leaves the first queries no key, "
                "and splash's softmax needs every query to see one")
    return None


def _map(fn, interpret: bool):
    """``jax.vmap(fn)`` when compiling; ``lax.map`` in interpret mode.

    jax 0.10.2's TPU interpreter cannot run a vmapped ``pallas_call`` that
    sets ``dimension_semantics`` (it zips the batched grid against the
    unbatched semantics); the compiled lowering handles vmap.
    """
    if interpret:
        return lambda *xs: jax.lax.map(lambda args: fn(*args), xs)
    return jax.vmap(fn)


def _heads_first(x):
    return jnp.transpose(x, (0, 2, 1, 3))


def _mask(cfg, shape, heads: int):
    """Splash's static mask for ``heads`` query heads over the padded ``shape = (Tp, Sp)``."""
    offset = cfg.kv_len - cfg.q_len  # query t sits at key position t + S - T
    if cfg.window is not None:
        one = splash.LocalMask(shape, window_size=(cfg.window - 1, 0), offset=offset)
    elif cfg.causal:
        one = splash.CausalMask(shape, offset=offset)
    else:
        one = splash.FullMask(shape)
    return splash.MultiHeadMask([one] * heads)


def splash_attention(cfg, q, k, v, q_seg):
    """Runs splash attention (its own ``custom_vjp``) on a call it covers.

    Args:
      cfg: ``ops._Config``; q ``[B,T,H,K]``, k ``[B,S,Hkv,K]``, v ``[B,S,Hkv,V]``.
      q_seg: ``[B,T]`` int32 run ids (from one segment-id array, so ``T == S``
        and kv ids are the same), or None.
    Returns:
      ``[B,T,H,V]`` in q.dtype.
    """
    bq, bk = cfg.block_sizes.block_q, cfg.block_sizes.block_k
    b, t, h, kd = q.shape
    s, hkv, vd = k.shape[1], k.shape[2], v.shape[3]
    groups = h // hkv
    qs = (q.astype(jnp.float32) * cfg.scale).astype(q.dtype)
    qs = jnp.pad(qs, ((0, 0), (0, -t % bq), (0, 0), (0, 0)))
    k, v = (jnp.pad(x, ((0, 0), (0, -s % bk), (0, 0), (0, 0))) for x in (k, v))
    tp, sp = qs.shape[1], k.shape[1]
    segment_ids = None
    if q_seg is not None or (not cfg.causal and sp > s):
        # Padded queries copy the last query's id (so they see a key and the
        # softmax stays finite); padded keys get an id no query has.
        ids = jnp.zeros((b, t), jnp.int32) if q_seg is None else q_seg
        q_ids = jnp.pad(ids, ((0, 0), (0, tp - t)), mode="edge")
        kv_ids = jnp.pad(ids if q_seg is not None else jnp.zeros((b, s), jnp.int32),
                         ((0, 0), (0, sp - s)), constant_values=-1)
        segment_ids = splash.SegmentIds(q=q_ids, kv=kv_ids)
    blocks = splash.BlockSizes(
        block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
        block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    kernel = splash.make_splash_mqa_single_device(
        _mask(cfg, (tp, sp), groups), block_sizes=blocks, attn_logits_soft_cap=cfg.softcap,
        interpret=interpret_params(cfg.target.interpret))
    # One MQA call per (batch row, key/value head): [B*Hkv, G, Tp, K] queries, [B*Hkv, Sp, X] keys.
    qg = jnp.transpose(qs.reshape(b, tp, hkv, groups, kd), (0, 2, 3, 1, 4))
    qg = qg.reshape(b * hkv, groups, tp, kd)
    kh, vh = (_heads_first(x).reshape(b * hkv, sp, x.shape[3]) for x in (k, v))
    if segment_ids is None:
        o = _map(lambda q, k, v: kernel(q, k, v), cfg.target.interpret)(qg, kh, vh)
    else:
        ids = jax.tree.map(lambda x: jnp.repeat(x, hkv, axis=0), segment_ids)
        o = _map(kernel, cfg.target.interpret)(qg, kh, vh, ids)  # [B*Hkv, G, Tp, V]
    o = jnp.transpose(o.reshape(b, hkv, groups, tp, vd), (0, 3, 1, 2, 4)).reshape(b, tp, h, vd)
    return o[:, :t].astype(q.dtype)


def _band(block_sizes, causal, window, q_len, kv_len):
    return _block.Band(causal=causal, window=window, q_len=q_len, kv_len=kv_len,
                       block_q=block_sizes.block_q, block_k=block_sizes.block_k)


def _segs(q_seg, kv_seg, q_map, kv_map, bq, bk):
    """Segment-id inputs: query columns ``[B,Tp,1]`` and key rows ``[B,1,Sp]``."""
    return {"q_seg": (None if q_seg is None else q_seg[:, :, None],
                      pl.BlockSpec((None, bq, 1), q_map)),
            "kv_seg": (None if kv_seg is None else kv_seg[:, None, :],
                       pl.BlockSpec((None, 1, bk), kv_map))}


def _get(refs, name):
    return refs[name][...] if name in refs else None


def _params(*semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def forward(q, k, v, q_seg, kv_seg, *, block_sizes, causal: bool, window, scale: float,
            softcap, q_len: int, kv_len: int, interpret: bool):
    """Runs our forward kernel; arguments and returns as ``gpu.forward``."""
    bq, bk = block_sizes.block_q, block_sizes.block_k
    b, tp, h, kd = q.shape
    sp, hkv, vd = k.shape[1], k.shape[2], v.shape[3]
    groups, nk = h // hkv, sp // bk
    band = _band(block_sizes, causal, window, q_len, kv_len)

    def kernel(refs):
        i, j = pl.program_id(2), pl.program_id(3)
        m, l, acc = refs["m"], refs["l"], refs["acc"]

        @pl.when(j == 0)
        def _():
            m[...], l[...], acc[...] = _block.init_carry(bq, vd)

        lo, hi = band.key_blocks(i)

        @pl.when((j >= lo) & (j < hi))
        def _():
            vis = band.visible(i, j, _get(refs, "q_seg"), _get(refs, "kv_seg"))
            m[...], l[...], acc[...] = _block.forward_step(
                (m[...], l[...], acc[...]), refs["q"][...], refs["k"][...], refs["v"][...], vis,
                scale=scale, softcap=softcap)

        @pl.when(j == nk - 1)
        def _():
            o, lse = _block.finish((m[...], l[...], acc[...]))
            refs["o"][...] = o.astype(refs["o"].dtype)
            refs["lse"][...] = lse

    q_block = lambda last: pl.BlockSpec((None, None, bq, last), lambda b, h, i, j: (b, h, i, 0))
    k_block = lambda last: pl.BlockSpec((None, None, bk, last),
                                        lambda b, h, i, j: (b, lax.div(h, groups), j, 0))
    inputs = {"q": (_heads_first(q), q_block(kd)), "k": (_heads_first(k), k_block(kd)),
              "v": (_heads_first(v), k_block(vd)),
              **_segs(q_seg, kv_seg, lambda b, h, i, j: (b, i, 0),
                      lambda b, h, i, j: (b, 0, j), bq, bk)}
    f32 = jnp.float32
    out = call(kernel, inputs, {
        "o": (jax.ShapeDtypeStruct((b, h, tp, vd), q.dtype), q_block(vd)),
        "lse": (jax.ShapeDtypeStruct((b, h, tp, 1), f32), q_block(1)),
    }, grid=(b, h, tp // bq, nk), interpret=interpret_params(interpret),
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        scratch={"m": pltpu.VMEM((bq, 1), f32), "l": pltpu.VMEM((bq, 1), f32),
                 "acc": pltpu.VMEM((bq, vd), f32)}, name="attention_fwd")
    return _heads_first(out["o"]), out["lse"]


def backward(q, k, v, q_seg, kv_seg, do, lse, delta, *, block_sizes, causal: bool, window,
             scale: float, softcap, q_len: int, kv_len: int, interpret: bool):
    """Runs our dq kernel and dk/dv kernel; arguments and returns as ``gpu.backward``."""
    bq, bk = block_sizes.block_q, block_sizes.block_k
    b, tp, h, kd = q.shape
    sp, hkv, vd = k.shape[1], k.shape[2], v.shape[3]
    groups, nq, nk = h // hkv, tp // bq, sp // bk
    band = _band(block_sizes, causal, window, q_len, kv_len)
    f32 = jnp.float32
    qh, kh, vh, doh = (_heads_first(x) for x in (q, k, v, do))

    def grads(refs, i, j):
        vis = band.visible(i, j, _get(refs, "q_seg"), _get(refs, "kv_seg"))
        return _block.grad_logits(refs["q"][...], refs["k"][...], refs["v"][...],
                                  refs["do"][...], refs["lse"][...], refs["delta"][...], vis,
                                  scale=scale, softcap=softcap)

    def dq_kernel(refs):
        i, j = pl.program_id(2), pl.program_id(3)
        acc = refs["acc"]

        @pl.when(j == 0)
        def _():
            acc[...] = jnp.zeros((bq, kd), f32)

        lo, hi = band.key_blocks(i)

        @pl.when((j >= lo) & (j < hi))
        def _():
            _, dz = grads(refs, i, j)
            acc[...] += _block.dot(dz, refs["k"][...], (1, 0), q.dtype)

        @pl.when(j == nk - 1)
        def _():
            refs["dq"][...] = acc[...]

    q_block = lambda last: pl.BlockSpec((None, None, bq, last), lambda b, h, i, j: (b, h, i, 0))
    k_block = lambda last: pl.BlockSpec((None, None, bk, last),
                                        lambda b, h, i, j: (b, lax.div(h, groups), j, 0))
    inputs = {"q": (qh, q_block(kd)), "k": (kh, k_block(kd)), "v": (vh, k_block(vd)),
              "do": (doh, q_block(vd)), "lse": (lse, q_block(1)), "delta": (delta, q_block(1)),
              **_segs(q_seg, kv_seg, lambda b, h, i, j: (b, i, 0),
                      lambda b, h, i, j: (b, 0, j), bq, bk)}
    dq = call(dq_kernel, inputs, {"dq": (jax.ShapeDtypeStruct((b, h, tp, kd), f32), q_block(kd))},
              grid=(b, h, nq, nk), interpret=interpret_params(interpret),
              compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
              scratch={"acc": pltpu.VMEM((bq, kd), f32)}, name="attention_bwd_dq")["dq"]

    def dkv_kernel(refs):
        j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
        dk, dv = refs["dk_acc"], refs["dv_acc"]

        @pl.when((g == 0) & (i == 0))
        def _():
            dk[...] = jnp.zeros((bk, kd), f32)
            dv[...] = jnp.zeros((bk, vd), f32)

        lo, hi = band.query_blocks(j, nq)

        @pl.when((i >= lo) & (i < hi))
        def _():
            p, dz = grads(refs, i, j)
            dv[...] += _block.dot(p, refs["do"][...], (0, 0), do.dtype)  # P^T dO
            dk[...] += _block.dot(dz, refs["q"][...], (0, 0), q.dtype)  # dZ^T Q

        @pl.when((g == groups - 1) & (i == nq - 1))
        def _():
            refs["dk"][...] = dk[...]
            refs["dv"][...] = dv[...]

    q_block = lambda last: pl.BlockSpec((None, None, bq, last),
                                        lambda b, c, j, g, i: (b, c * groups + g, i, 0))
    k_block = lambda last: pl.BlockSpec((None, None, bk, last), lambda b, c, j, g, i: (b, c, j, 0))
    inputs = {"q": (qh, q_block(kd)), "k": (kh, k_block(kd)), "v": (vh, k_block(vd)),
              "do": (doh, q_block(vd)), "lse": (lse, q_block(1)), "delta": (delta, q_block(1)),
              **_segs(q_seg, kv_seg, lambda b, c, j, g, i: (b, i, 0),
                      lambda b, c, j, g, i: (b, 0, j), bq, bk)}
    out = call(dkv_kernel, inputs, {
        "dk": (jax.ShapeDtypeStruct((b, hkv, sp, kd), f32), k_block(kd)),
        "dv": (jax.ShapeDtypeStruct((b, hkv, sp, vd), f32), k_block(vd)),
    }, grid=(b, hkv, nk, groups, nq), interpret=interpret_params(interpret),
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
        scratch={"dk_acc": pltpu.VMEM((bk, kd), f32), "dv_acc": pltpu.VMEM((bk, vd), f32)},
        name="attention_bwd_dkv")
    return _heads_first(dq), _heads_first(out["dk"]), _heads_first(out["dv"])
