"""Softmax attention: the unbounded-state limit of the linear recurrence.

``ops.attention`` computes ``softmax(scale * q k^T + mask) v`` per head in one
of three forms that give the same numbers within tolerance:

- ``"xla"``: plain masked softmax; materialises the ``[B,H,T,S]`` logits. The
  readable reference.
- ``"chunked"``: blockwise online softmax in XLA, flash-attention style
  (Dao et al. 2022, arXiv:2205.14135, Alg. 1; FlashAttention-2,
  arXiv:2307.08691, Alg. 1-2): query blocks times key blocks with a running
  max and denominator, never more than one ``[C,C]`` block of logits per head.
  A ``jax.custom_vjp`` recomputes the blocks in the backward pass from the
  saved log-sum-exp, so gradients are memory-efficient too.
- ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` on an
  NVIDIA GPU, where its options cover the call.
- ``"pallas"``: ``pallas_kernels.attention``: our FlashAttention-2 kernels
  (Pallas Triton) on GPU, JAX's splash attention (or our kernels' Mosaic
  form where splash cannot serve the call) on TPU, interpret mode on CPU.
  Every option is supported. Verified in interpret mode and lowered, not yet
  run on a device, so ``"auto"`` does not choose it (docs/kernels_attention.md).

``ops.decode_attention`` is the decoding step: one query per sequence against
the filled slots of a KV cache, in time proportional to how many are filled
(a loop over filled key blocks), not to the cache's allocated length.

Grouped-query attention (GQA/MQA) never repeats K/V: queries are viewed as
``[B,T,Hkv,G,K]`` with ``G = Hq / Hkv`` query heads per key/value head.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from effarch.op_contract import check_attention_inputs, check_dims, check_rank, pad_to_multiple
from effarch.ops._common import log_once, platform, resolve_implementation
from effarch.typing import Array, Float, Int
from pallas_kernels import attention as attention_kernel

OP = "ops.attention"
IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn", "pallas")

# Logit written over masked-out entries before the max and the exp (finite, so
# that a fully masked row never computes inf - inf; masked probabilities are
# then set to exactly 0 with a `where`, and such rows output 0). One constant
# for the XLA forms and the kernels.
MASKED_LOGIT = attention_kernel.MASKED_LOGIT

# "auto" on TPU (and on CPU for fewer than CPU_BLOCK queries, as in decoding)
# uses "xla" while one head's logits fit in this many entries, "chunked" beyond.
XLA_MAX_LOGITS = 2**20
# "auto" on CPU runs the chunked form, in query and key blocks of at most this
# many, from this many queries on: 1.6-2.2x faster forward + backward and
# 2.1-3.9x forward than "xla" at T = 256 ... 1024 (docs/design.md §3), where the
# XLA form's softmax over the whole [T, S] logits is memory-bound.
CPU_BLOCK = 64

AttentionSegmentIds = Int[Array, "B T"] | tuple[Int[Array, "B T"], Int[Array, "B S"]]


def attention(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B S Hkv K"],
    v: Float[Array, "B S Hkv V"],
    *,
    causal: bool = True,
    window: int | None = None,
    segment_ids: AttentionSegmentIds | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    chunk_size: int = 256,
    implementation: str = "auto",
) -> Float[Array, "B T H V"]:
    """Multi-head softmax attention with GQA/MQA, causal/sliding masks and packing.

    ``o[b,t,h] = sum_s softmax_s(logit[b,h,t,s]) v[b,s,h // G]`` with
    ``logit = scale * q . k``, soft-capped to ``softcap * tanh(logit / softcap)``
    when ``softcap`` is given, over the keys ``s`` that query ``t`` may see.

    Query and key positions are aligned at their ends: query ``t`` sits at key
    position ``t + S - T``. So with a KV cache of ``S`` keys whose last ``T``
    entries are the current tokens, causal decoding (``T = 1``) sees every
    cached key; with ``T == S`` this is ordinary self-attention.

    Args:
      q: queries ``[B,T,H,K]``.
      k: keys ``[B,S,Hkv,K]``; ``Hkv`` divides ``H`` (``Hkv = H``: MHA,
        ``1 < Hkv < H``: GQA, ``Hkv = 1``: MQA).
      v: values ``[B,S,Hkv,V]``; ``V`` may differ from ``K``.
      causal: query ``t`` sees only keys ``s <= t + S - T``.
      window: sliding window ``w >= 1``: query ``t`` sees keys ``s`` with
        ``t' - w < s <= t'`` where ``t' = t + S - T`` (``w`` keys, itself
        included). Needs ``causal=True``.
      segment_ids: packed sequences, attention never crosses a segment. Either
        one integer ``[B,T]`` array when ``T == S`` (a new segment starts
        wherever the id changes from the previous step, as in every op), or a
        pair ``(q_segment_ids [B,T], kv_segment_ids [B,S])``: query ``t`` sees
        key ``s`` only where the two ids are equal. A query that sees no key
        outputs zeros.
      scale: logit scale, a Python float (static under jit); default ``K ** -0.5``.
      softcap: ``c > 0`` soft-caps logits to ``c * tanh(logit / c)`` (Gemma 2).
      chunk_size: block length of queries and keys in the ``"chunked"`` form.
      implementation: ``"auto"``, ``"xla"``, ``"chunked"``, ``"cudnn"`` or
        ``"pallas"`` (``pallas_kernels.attention``; ``chunk_size`` does not
        apply, the kernels tile with their own ``BlockSizes``).
        ``"auto"`` takes ``"cudnn"`` on a GPU where it supports the call (and
        logs once why not otherwise); on CPU ``"chunked"`` in blocks of at
        most ``CPU_BLOCK`` from ``T >= CPU_BLOCK`` queries on; otherwise
        ``"xla"`` for short sequences and ``"chunked"`` when one head's
        ``T * S`` logits exceed ``XLA_MAX_LOGITS``.

    Returns:
      ``[B,T,H,V]`` in ``q.dtype``. Softmax statistics are float32.

    Raises:
      ValueError: inconsistent shapes, dtypes or options (the message names
        the arrays and the expected form).
      NotImplementedError: an implementation that cannot serve the call
        (``"cudnn"`` off GPU or with unsupported options).
    """
    q_seg, kv_seg = _check_inputs(q, k, v, causal, window, segment_ids, softcap, chunk_size)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)

    def auto(plat: str) -> str:
        if plat == "gpu":
            reason = _cudnn_unsupported(q, k, v, causal, segment_ids, softcap)
            if reason is None:
                return "cudnn"
            log_once(f"{OP}: implementation='auto' cannot use cudnn ({reason}); "
                     "falling back to an XLA form.")
        if plat == "cpu" and q.shape[1] >= CPU_BLOCK:
            return "chunked"
        return "xla" if q.shape[1] * k.shape[1] <= XLA_MAX_LOGITS else "chunked"

    if implementation == "auto" and platform() == "cpu":
        chunk_size = min(chunk_size, CPU_BLOCK)
    implementation = resolve_implementation(OP, implementation, IMPLEMENTATIONS, auto)
    if implementation == "cudnn":
        reason = _cudnn_unsupported(q, k, v, causal, segment_ids, softcap)
        if reason is not None:
            raise NotImplementedError(f"{OP}(implementation='cudnn'): {reason}.")
        return _attention_cudnn(q, k, v, causal=causal, window=window, scale=scale)
    if implementation == "pallas":
        return attention_kernel.attention(
            q, k, v, causal=causal, window=window, segment_ids=segment_ids, scale=scale,
            softcap=softcap)

    b, t, h, dk = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, h // hkv, dk)  # [B, T, Hkv, G, K]
    if implementation == "xla":
        o = _attention_xla(qg, k, v, q_seg, kv_seg, causal=causal, window=window,
                           scale=scale, softcap=softcap)
    else:
        static = _Static(
            causal=causal, window=window, scale=scale, softcap=softcap,
            q_len=t, kv_len=k.shape[1],
            block_q=min(chunk_size, t), block_k=min(chunk_size, k.shape[1]),
        )
        o = _attention_chunked(static, qg, k, v, q_seg, kv_seg)
    return o.reshape(b, t, h, v.shape[-1])  # [B, T, H, V]


def _check_inputs(q, k, v, causal, window, segment_ids, softcap, chunk_size):
    """Validates shapes and options; returns ``(q_seg, kv_seg)`` (or Nones)."""
    q_seg, kv_seg, _ = check_attention_inputs(OP, q, k, v, causal=causal, window=window,
                                              segment_ids=segment_ids, softcap=softcap)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{OP}: chunk_size={chunk_size!r}; expected an int >= 1.")
    return q_seg, kv_seg


# --------------------------------------------------------------------------
# Shared pieces of the XLA forms.


def _logits(q, k, scale: float, softcap: float | None):
    """``[B,Hkv,G,T,S]`` float32 logits from q ``[B,T,Hkv,G,K]``, k ``[B,S,Hkv,K]``."""
    z = jnp.einsum("bthgk,bshk->bhgts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        z = softcap * jnp.tanh(z / softcap)
    return z


def _visible(q_pos, k_pos, q_seg, kv_seg, *, causal: bool, window: int | None, kv_len: int):
    """Which keys each query sees: ``[B or 1, Tq, Sk]`` bool.

    Args:
      q_pos: ``[Tq]`` key-axis positions of the queries (``t + S - T``).
      k_pos: ``[Sk]`` key positions; those ``>= kv_len`` are padding.
      q_seg, kv_seg: ``[B,Tq]``, ``[B,Sk]`` segment ids, or both None.
    """
    vis = (k_pos < kv_len)[None, None, :]  # [1, 1, Sk]
    if causal:
        vis = vis & (k_pos[None, :] <= q_pos[:, None])
    if window is not None:
        vis = vis & (k_pos[None, :] > q_pos[:, None] - window)
    if q_seg is not None:
        vis = vis & (q_seg[:, :, None] == kv_seg[:, None, :])  # [B, Tq, Sk]
    return vis


def _attention_xla(q, k, v, q_seg, kv_seg, *, causal, window, scale, softcap):
    """Masked softmax over the full ``[B,Hkv,G,T,S]`` logits; q ``[B,T,Hkv,G,K]``."""
    t, s = q.shape[1], k.shape[1]
    logits = _logits(q, k, scale, softcap)  # [B, Hkv, G, T, S]
    vis = _visible(jnp.arange(t) + s - t, jnp.arange(s), q_seg, kv_seg,
                   causal=causal, window=window, kv_len=s)[:, None, None]  # [B|1,1,1,T,S]
    logits = jnp.where(vis, logits, MASKED_LOGIT)
    m = lax.stop_gradient(logits.max(axis=-1, keepdims=True))  # [B, Hkv, G, T, 1]
    e = jnp.where(vis, jnp.exp(logits - m), 0.0)
    denom = e.sum(axis=-1, keepdims=True)
    p = e / jnp.where(denom > 0, denom, 1.0)  # rows with no visible key stay 0
    o = jnp.einsum("bhgts,bshv->bthgv", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
    return o.astype(q.dtype)  # [B, T, Hkv, G, V]


# --------------------------------------------------------------------------
# "chunked": blockwise online softmax with a recomputing backward pass.


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Static:
    """The hashable options of one chunked call (a custom_vjp nondiff arg)."""

    causal: bool
    window: int | None
    scale: float
    softcap: float | None
    q_len: int  # T
    kv_len: int  # S
    block_q: int
    block_k: int

    def visible(self, iq, ik, q_seg, kv_seg):
        """``[B|1,1,1,Cq,Ck]`` mask of query block ``iq`` against key block ``ik``."""
        q_pos = iq * self.block_q + jnp.arange(self.block_q) + self.kv_len - self.q_len
        k_pos = ik * self.block_k + jnp.arange(self.block_k)
        vis = _visible(q_pos, k_pos, q_seg, kv_seg, causal=self.causal,
                       window=self.window, kv_len=self.kv_len)
        return vis[:, None, None]

    def needed(self, iq, ik):
        """Whether query block ``iq`` sees any key of key block ``ik`` (segments aside): a scalar bool.

        The others are skipped (``lax.cond``): causal attention computes about half of the
        ``T / Cq x S / Ck`` block pairs, a sliding window only those near the diagonal.
        """
        q_first = iq * self.block_q + self.kv_len - self.q_len
        k_first = ik * self.block_k
        need = k_first < self.kv_len
        if self.causal:
            need = need & (k_first <= q_first + self.block_q - 1)
        if self.window is not None:
            need = need & (k_first + self.block_k - 1 > q_first - self.window)
        return need


def _blocks(x, size: int):
    """``[B, T, ...] -> [T/C, B, C, ...]``, zero-padding T to a multiple of C."""
    if x is None:
        return None
    x = pad_to_multiple(x, size, axis=1)
    x = x.reshape(x.shape[0], x.shape[1] // size, size, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _unblocks(x, length: int):
    """Inverse of ``_blocks``: ``[T/C, B, C, ...] -> [B, T, ...]``."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _chunked_forward(st: _Static, q, k, v, q_seg, kv_seg):
    """Online-softmax forward; returns o ``[B,T,Hkv,G,V]`` and blocked lse.

    lse is ``[T/Cq, B, Hkv, G, Cq]`` float32, the log-sum-exp of each query's
    visible logits (its value for a query with no visible key is unused).
    """
    qb, q_segb = _blocks(q, st.block_q), _blocks(q_seg, st.block_q)  # [Nq, B, Cq, ...]
    kb, vb = _blocks(k, st.block_k), _blocks(v, st.block_k)  # [Nk, B, Ck, ...]
    kv_segb = _blocks(kv_seg, st.block_k)
    b, _, hkv, g, _ = q.shape
    dv = v.shape[-1]

    def query_block(args):
        iq, q_i, q_seg_i = args

        def key_block(carry, xs):  # a block no query sees leaves the statistics as they are
            return lax.cond(st.needed(iq, xs[0]), online_softmax_step, lambda carry, xs: carry, carry, xs), None

        def online_softmax_step(carry, xs):
            m, l, acc = carry  # [B,Hkv,G,Cq], [B,Hkv,G,Cq], [B,Hkv,G,Cq,V]
            ik, k_j, v_j, kv_seg_j = xs
            vis = st.visible(iq, ik, q_seg_i, kv_seg_j)
            logits = jnp.where(vis, _logits(q_i, k_j, st.scale, st.softcap), MASKED_LOGIT)
            m_new = jnp.maximum(m, logits.max(axis=-1))
            p = jnp.where(vis, jnp.exp(logits - m_new[..., None]), 0.0)  # [B,Hkv,G,Cq,Ck]
            correction = jnp.exp(m - m_new)
            l = l * correction + p.sum(axis=-1)
            pv = jnp.einsum("bhgts,bshv->bhgtv", p.astype(v.dtype), v_j,
                            preferred_element_type=jnp.float32)
            return m_new, l, acc * correction[..., None] + pv

        init = (
            jnp.full((b, hkv, g, st.block_q), MASKED_LOGIT, jnp.float32),
            jnp.zeros((b, hkv, g, st.block_q), jnp.float32),
            jnp.zeros((b, hkv, g, st.block_q, dv), jnp.float32),
        )
        (m, l, acc), _ = lax.scan(key_block, init, (jnp.arange(kb.shape[0]), kb, vb, kv_segb))
        has_key = l > 0
        o_i = acc / jnp.where(has_key, l, 1.0)[..., None]  # no visible key -> 0
        lse_i = m + jnp.log(jnp.where(has_key, l, 1.0))
        return jnp.einsum("bhgtv->bthgv", o_i).astype(q.dtype), lse_i

    ob, lse = lax.map(query_block, (jnp.arange(qb.shape[0]), qb, q_segb))
    return _unblocks(ob, st.q_len), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_chunked(st: _Static, q, k, v, q_seg, kv_seg):
    """Chunked attention on grouped queries ``[B,T,Hkv,G,K]``."""
    return _chunked_forward(st, q, k, v, q_seg, kv_seg)[0]


def _attention_chunked_fwd(st: _Static, q, k, v, q_seg, kv_seg):
    o, lse = _chunked_forward(st, q, k, v, q_seg, kv_seg)
    return o, (q, k, v, q_seg, kv_seg, o, lse)


def _attention_chunked_bwd(st: _Static, residuals, do):
    """Recomputes each block's probabilities from lse (FlashAttention-2, Alg. 2).

    With ``P = exp(logits - lse)`` and ``Delta_t = sum_v dO[t] O[t]``:
    ``dV = P^T dO``, ``dP = dO V^T``, ``dlogits = P * (dP - Delta)``, times
    ``1 - (logits / c)^2`` under a soft cap ``c``, times ``scale`` for dq, dk.
    Outer loop over key blocks (accumulating dk, dv), inner over query blocks,
    whose dq contributions are summed across the outer loop.
    """
    q, k, v, q_seg, kv_seg, o, lse = residuals
    delta = jnp.einsum("bthgv,bthgv->bhgt", do.astype(jnp.float32), o.astype(jnp.float32))
    qb, q_segb = _blocks(q, st.block_q), _blocks(q_seg, st.block_q)
    dob = _blocks(do, st.block_q)  # [Nq, B, Cq, Hkv, G, V]
    deltab = _blocks(jnp.moveaxis(delta, -1, 1), st.block_q)  # [Nq, B, Cq, Hkv, G]
    kb, vb, kv_segb = _blocks(k, st.block_k), _blocks(v, st.block_k), _blocks(kv_seg, st.block_k)

    def key_block(dq_acc, xs):
        ik, k_j, v_j, kv_seg_j = xs

        def query_block(carry, ys):  # a block no query sees adds nothing to dk, dv or dq
            def skip(carry, ys):
                return carry, jnp.zeros(ys[1].shape, jnp.float32)

            return lax.cond(st.needed(ys[0], ik), gradient_step, skip, carry, ys)

        def gradient_step(carry, ys):
            dk_j, dv_j = carry  # [B, Ck, Hkv, K], [B, Ck, Hkv, V] float32
            iq, q_i, q_seg_i, do_i, lse_i, delta_i = ys
            vis = st.visible(iq, ik, q_seg_i, kv_seg_j)
            logits = _logits(q_i, k_j, st.scale, st.softcap)  # [B, Hkv, G, Cq, Ck]
            p = jnp.exp(jnp.where(vis, logits - lse_i[..., None], MASKED_LOGIT))
            dv_j = dv_j + jnp.einsum("bhgts,bthgv->bshv", p.astype(do.dtype), do_i,
                                     preferred_element_type=jnp.float32)
            dp = jnp.einsum("bthgv,bshv->bhgts", do_i, v_j, preferred_element_type=jnp.float32)
            dlogits = p * (dp - jnp.einsum("bthg->bhgt", delta_i)[..., None])
            if st.softcap is not None:
                dlogits = dlogits * (1.0 - jnp.square(logits / st.softcap))
            dz = (dlogits * st.scale).astype(q.dtype)  # d/d(q . k)
            dq_i = jnp.einsum("bhgts,bshk->bthgk", dz, k_j, preferred_element_type=jnp.float32)
            dk_j = dk_j + jnp.einsum("bhgts,bthgk->bshk", dz, q_i,
                                     preferred_element_type=jnp.float32)
            return (dk_j, dv_j), dq_i

        init = (jnp.zeros(k_j.shape, jnp.float32), jnp.zeros(v_j.shape, jnp.float32))
        (dk_j, dv_j), dq = lax.scan(
            query_block, init, (jnp.arange(qb.shape[0]), qb, q_segb, dob, lse, deltab))
        return dq_acc + dq, (dk_j, dv_j)

    dq, (dk, dv) = lax.scan(key_block, jnp.zeros(qb.shape, jnp.float32),
                            (jnp.arange(kb.shape[0]), kb, vb, kv_segb))
    return (
        _unblocks(dq, st.q_len).astype(q.dtype),
        _unblocks(dk, st.kv_len).astype(k.dtype),
        _unblocks(dv, st.kv_len).astype(v.dtype),
        None,
        None,
    )


_attention_chunked.defvjp(_attention_chunked_fwd, _attention_chunked_bwd)


# --------------------------------------------------------------------------
# "cudnn": jax.nn.dot_product_attention's cuDNN flash attention.


def _cudnn_unsupported(q, k, v, causal, segment_ids, softcap) -> str | None:
    """Why cuDNN cannot serve this call, or None when it can."""
    if platform() != "gpu":
        return f"it needs a GPU and the platform is {platform()!r}"
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if capability is None:
        return f"it needs an NVIDIA GPU and the device is {device.device_kind!r}"
    dtypes = {jnp.dtype(x.dtype).name for x in (q, k, v)}
    if len(dtypes) != 1 or dtypes.pop() not in ("bfloat16", "float16"):
        return (f"it needs q, k, v all bfloat16 or all float16, got "
                f"{q.dtype}, {k.dtype}, {v.dtype}")
    head_dim = q.shape[-1]
    max_head_dim = 256 if tuple(map(int, str(capability).split("."))) >= (9, 0) else 128
    if head_dim % 8 or head_dim > max_head_dim:
        return f"head dim K={head_dim} must be a multiple of 8 and <= {max_head_dim}"
    if v.shape[-1] != head_dim:
        return f"value head dim V={v.shape[-1]} must equal K={head_dim}"
    if causal and q.shape[1] != k.shape[1]:
        return (f"its causal mask aligns the first query with the first key, but "
                f"T={q.shape[1]} != S={k.shape[1]} needs the ends aligned")
    if segment_ids is not None:
        return "jax.nn.dot_product_attention takes padding lengths, not packed segment_ids"
    if softcap is not None:
        return "jax.nn.dot_product_attention has no logit softcap"
    return None


def _attention_cudnn(q, k, v, *, causal, window, scale):
    """cuDNN flash attention; ``window`` w maps to the left window ``w - 1``."""
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal,
        local_window_size=None if window is None else (window - 1, 0),
        implementation="cudnn",
    )


# --------------------------------------------------------------------------
# Decoding: one query against the filled part of a KV cache.

DECODE_OP = "ops.decode_attention"


def decode_attention(
    q: Float[Array, "B 1 H K"],
    k_cache: Float[Array, "B L Hkv K"],
    v_cache: Float[Array, "B L Hkv V"],
    length: Int[Array, ""] | int,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    block_size: int = 256,
) -> Float[Array, "B 1 H V"]:
    """Softmax attention of one query step over slots ``[0, length)`` of a cache.

    The query sees every slot below ``length`` (the caller has already written
    its own key there; order within the cache does not matter, so a ring
    buffer works). The work is a loop over the ``ceil(length / block_size)``
    filled key blocks with an online softmax in float32, so a step costs time
    proportional to ``length``, whatever the cache's allocated length ``L``.
    No gradient: the loop's trip count is dynamic (a ``while`` loop).

    Args:
      q: ``[B, 1, H, K]`` one query per sequence.
      k_cache: ``[B, L, Hkv, K]`` cached keys; ``Hkv`` divides ``H`` (GQA/MQA).
      v_cache: ``[B, L, Hkv, V]`` cached values.
      length: int32 scalar in ``[1, L]``: the number of filled slots.
      scale: logit scale (default ``K ** -0.5``).
      softcap: ``c * tanh(logit / c)`` when given, as in :func:`attention`.
      block_size: key slots per loop step.

    Returns:
      ``[B, 1, H, V]`` in q's dtype.
    """
    check_rank("q", q, 4, "[B,1,H,K]")
    check_dims(DECODE_OP, {}, q=(q, "BTHK"), k_cache=(k_cache, "BSGK"), v_cache=(v_cache, "BSG_"))
    b, t, h, dk = q.shape
    cache_len, hkv = k_cache.shape[1], k_cache.shape[2]
    if t != 1:
        raise ValueError(f"{DECODE_OP}: q {tuple(q.shape)} has T={t}; expected one query step [B,1,H,K] "
                         "(use ops.attention for several).")
    if h % hkv:
        raise ValueError(f"{DECODE_OP}: the {hkv} key/value heads of k_cache {tuple(k_cache.shape)} must "
                         f"divide the {h} query heads of q {tuple(q.shape)}.")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{DECODE_OP}: block_size={block_size!r}; expected an int >= 1.")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{DECODE_OP}: softcap={softcap!r}; expected None or a float > 0.")
    scale = dk ** -0.5 if scale is None else float(scale)
    block = min(block_size, cache_len)
    length = jnp.clip(jnp.asarray(length, jnp.int32), 1, cache_len)
    qg = q[:, 0].reshape(b, hkv, h // hkv, dk)  # [B, Hkv, G, K]

    def step(i, carry):
        m, denom, acc = carry  # [B,Hkv,G], [B,Hkv,G], [B,Hkv,G,V] float32
        # The last block may overlap the one before it; slots counted there are masked here.
        start = jnp.minimum(i * block, cache_len - block)
        kb = lax.dynamic_slice_in_dim(k_cache, start, block, axis=1).astype(q.dtype)  # [B, C, Hkv, K]
        vb = lax.dynamic_slice_in_dim(v_cache, start, block, axis=1).astype(q.dtype)  # [B, C, Hkv, V]
        slots = start + jnp.arange(block)
        valid = (slots >= i * block) & (slots < length)  # [C]
        z = jnp.einsum("bhgk,bshk->bhgs", qg, kb, preferred_element_type=jnp.float32) * scale
        if softcap is not None:
            z = softcap * jnp.tanh(z / softcap)
        z = jnp.where(valid, z, MASKED_LOGIT)  # [B, Hkv, G, C]
        m_new = jnp.maximum(m, z.max(axis=-1))
        p = jnp.where(valid, jnp.exp(z - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        denom = denom * correction + p.sum(axis=-1)
        acc = acc * correction[..., None] + jnp.einsum("bhgs,bshv->bhgv", p.astype(vb.dtype), vb,
                                                       preferred_element_type=jnp.float32)
        return m_new, denom, acc

    shape = (b, hkv, h // hkv)
    init = (jnp.full(shape, MASKED_LOGIT, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, v_cache.shape[-1]), jnp.float32))
    _, denom, acc = lax.fori_loop(0, (length + block - 1) // block, step, init)
    o = acc / denom[..., None]  # every call sees at least one slot
    return o.reshape(b, 1, h, v_cache.shape[-1]).astype(q.dtype)
