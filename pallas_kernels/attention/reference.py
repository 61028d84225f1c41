"""The truth the attention kernels are tested against: plain masked softmax.

Per batch row and query head, in float32, over the whole ``[T, S]`` logits::

    z[t, s] = scale * q_t . k_s        (softcap c: c * tanh(z / c))
    o_t = sum_s softmax_s(z[t, s] over visible s) v_s

Query ``t`` sits at key position ``t + S - T`` (ends aligned). It shares no
code with the kernels or with ``effarch.ops``.
"""

from __future__ import annotations

import jax.numpy as jnp


def attention_reference(q, k, v, *, causal: bool, window: int | None = None,
                        segment_ids=None, scale: float, softcap: float | None = None):
    """Float32 masked softmax attention with the arguments of ``ops.attention``.

    Args:
      q: ``[B,T,H,K]``; k: ``[B,S,Hkv,K]``; v: ``[B,S,Hkv,V]`` (``Hkv`` divides ``H``).
      causal: query ``t`` sees keys ``s <= t + S - T``.
      window: None or ``w``: keys ``t + S - T - w < s``.
      segment_ids: None or ``(q_ids [B,T], kv_ids [B,S])``: equal ids only.
      scale: logit scale; softcap: None or ``c > 0``.

    Returns:
      ``[B,T,H,V]`` float32; a query that sees no key outputs zeros.
    """
    f32 = jnp.float32
    t, h, s, hkv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    k = jnp.repeat(k.astype(f32), h // hkv, axis=2)  # [B, S, H, K]: plain, not efficient
    v = jnp.repeat(v.astype(f32), h // hkv, axis=2)
    z = jnp.einsum("bthk,bshk->bhts", q.astype(f32), k) * scale
    if softcap is not None:
        z = softcap * jnp.tanh(z / softcap)
    q_pos = jnp.arange(t)[:, None] + s - t
    k_pos = jnp.arange(s)[None, :]
    visible = jnp.ones((t, s), bool)
    if causal:
        visible &= k_pos <= q_pos
    if window is not None:
        visible &= k_pos > q_pos - window
    visible = visible[None, None]  # [1, 1, T, S]
    if segment_ids is not None:
        q_ids, kv_ids = segment_ids
        visible = visible & (q_ids[:, None, :, None] == kv_ids[:, None, None, :])
    z = jnp.where(visible, z, -jnp.inf)
    m = jnp.max(z, axis=-1, keepdims=True)
    e = jnp.where(visible, jnp.exp(z - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    total = e.sum(-1, keepdims=True)
    p = e / jnp.where(total > 0, total, 1.0)
    return jnp.einsum("bhts,bshv->bthv", p, v)
