"""Causal softmax attention: MHA, GQA, MQA, sliding window, QK-norm, softcap, output gate, q/k/v convs.

The unbounded-state limit of the one recurrence (docs/design.md §1): the
"state" is the KV cache. ``num_kv_heads`` picks MHA (= num_heads), GQA or MQA
(1; Shazeer, 2019; Ainslie et al., 2023). Rotary positions (Su et al., 2021),
optional RMS QK-norm (Dehghani et al., 2023) and a tanh logit softcap
(Gemma 2). ``window`` gives local attention: each query sees the ``window``
most recent keys, itself included (Longformer / Mistral style).
``output_gate`` multiplies each head's output by ``sigmoid(W_g x)`` before the
output projection (gated attention; Qiu et al., 2025, as in Qwen3-Next).
``qkv_conv_size`` puts a causal depthwise convolution after each of the q, k
and v projections (Primer's multi-dconv-head attention; So et al., 2021): each
key then carries its few predecessors, the short convolution that the
recurrent mixers have in front and that lets one layer form an induction head
(what associative recall needs).

The decode cache holds the last ``L`` keys and values, ``L = window`` for local
attention (memory O(window)) and ``L = max_len`` otherwise, in a ring buffer:
the token at position ``p`` lives in slot ``p % L``. A one-token decode step
writes its key in place and attends over the filled slots only
(``ops.decode_attention``), so its cost grows with the tokens seen, not with
``max_len``. A call with several tokens (a prefill, or speculative
verification) puts the ring in time order, appends its ``T`` keys, attends
over those ``L + T`` keys with ``ops.attention`` (newest at the end, so the
end-aligned causal mask applies; slots never filled are masked out) and
writes the newest ``L`` back. Either way a query sees at most the ``L`` most
recent keys, itself included: past ``max_len`` tokens global attention acts as
a sliding window of ``max_len``; size the cache for the whole sequence.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from effarch import ops
from effarch.layers.conv import init_conv_state
from effarch.layers.norms import RMSNorm
from effarch.layers.rotary import apply_rotary, rotary_dim, token_positions
from effarch.mixers import _recurrence as rec
from effarch.mixers.base import Mixer, MixerConfig, check_decode_inputs, register


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig(MixerConfig):
    """Softmax attention options.

    Attributes:
      num_heads: query heads H.
      num_kv_heads: key/value heads; divides ``num_heads`` (None: MHA, 1: MQA).
      head_dim: per-head width (None: ``d_model / num_heads``).
      window: sliding window in tokens, the query included (None: global).
      rotary_base: base of the rotary frequencies.
      rotary_fraction: share of each head's channels that are rotated (0: no
        rotary embedding).
      qk_norm: RMS-normalise q and k per head before the rotation.
      qk_norm_eps: epsilon of those norms.
      qk_norm_zero_centered: their scales are stored as offsets from 1
        (``(1 + scale)``, Qwen3-Next's Gemma-style norms).
      softcap: ``c`` soft-caps logits to ``c * tanh(logit / c)`` (None: off).
      use_bias: biases on the q, k, v projections.
      out_bias: a bias on the output projection (RecurrentGemma has one).
      output_gate: gate every output channel by ``sigmoid(W_g x)`` (its own
        projection ``g_proj``, with a bias when ``use_bias``).
      qkv_conv_size: taps of a causal depthwise convolution (no bias, no
        activation) after each of the q, k, v projections, per channel, before
        QK-norm and rotary (None: off; Primer uses 3).
      chunk_size: block length of the ``"chunked"`` implementation.
    """

    IMPLEMENTATIONS: ClassVar[tuple[str, ...]] = ("xla", "chunked", "cudnn")
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"num_heads": 4, "num_kv_heads": 2, "chunk_size": 8},
        "tiny_local": {"num_heads": 4, "num_kv_heads": 1, "window": 8, "qk_norm": True,
                       "softcap": 30.0, "chunk_size": 8},
        "tiny_conv": {"num_heads": 4, "num_kv_heads": 2, "qkv_conv_size": 3, "chunk_size": 8},
        "gqa": {"num_heads": 16, "num_kv_heads": 4},
    }

    num_heads: int = 8
    num_kv_heads: int | None = None
    head_dim: int | None = None
    window: int | None = None
    rotary_base: float = 10_000.0
    rotary_fraction: float = 1.0
    qk_norm: bool = False
    qk_norm_eps: float = 1e-6
    qk_norm_zero_centered: bool = False
    softcap: float | None = None
    use_bias: bool = False
    out_bias: bool = False
    output_gate: bool = False
    qkv_conv_size: int | None = None
    chunk_size: int = 256

    def __post_init__(self):
        super().__post_init__()
        if self.num_heads < 1:
            raise ValueError(f"attention: num_heads={self.num_heads}; expected >= 1.")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(f"attention: num_heads={self.num_heads} must divide d_model={self.d_model} "
                             "when head_dim is None.")
        if self.kv_heads < 1 or self.num_heads % self.kv_heads:
            raise ValueError(f"attention: num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}.")
        if self.window is not None and self.window < 1:
            raise ValueError(f"attention: window={self.window}; expected >= 1 or None.")
        if not 0.0 <= self.rotary_fraction <= 1.0:
            raise ValueError(f"attention: rotary_fraction={self.rotary_fraction}; expected 0 <= fraction <= 1.")
        if self.softcap is not None and self.softcap <= 0:
            raise ValueError(f"attention: softcap={self.softcap}; expected > 0 or None.")
        if self.chunk_size < 1:
            raise ValueError(f"attention: chunk_size={self.chunk_size}; expected >= 1.")
        if self.qkv_conv_size is not None and self.qkv_conv_size < 1:
            raise ValueError(f"attention: qkv_conv_size={self.qkv_conv_size}; expected >= 1 or None.")
        if not self.qk_norm_eps > 0:
            raise ValueError(f"attention: qk_norm_eps={self.qk_norm_eps}; expected > 0.")

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def dim_per_head(self) -> int:
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim


class KVCache(NamedTuple):
    """Ring-buffer KV cache: the token at position ``p`` is in slot ``p % L``.

    Attributes:
      k: ``[B,L,Hkv,K]`` rotated keys, ``L = min(window, max_len)`` or ``max_len``.
      v: ``[B,L,Hkv,K]`` values.
      position: ``[]`` int32, tokens seen so far.
      conv: with ``qkv_conv_size``, the q, k, v convolutions' windows
        ``[B,W-1,width]`` (the projections of the last ``W-1`` tokens); else ``()``.
    """

    k: jax.Array
    v: jax.Array
    position: jax.Array
    conv: tuple[jax.Array, ...] = ()


@register("attention", AttentionConfig)
class Attention(Mixer):
    """Causal softmax attention; see the module docstring."""

    config: AttentionConfig

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
        cfg = self.config
        length = max_len if cfg.window is None else min(cfg.window, max_len)
        shape = (batch_size, length, cfg.kv_heads, cfg.dim_per_head)
        conv = ()
        if cfg.qkv_conv_size is not None:
            widths = (cfg.num_heads * cfg.dim_per_head, *(2 * (cfg.kv_heads * cfg.dim_per_head,)))
            conv = tuple(init_conv_state(batch_size, cfg.qkv_conv_size, w, dtype) for w in widths)
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), position=jnp.zeros((), jnp.int32),
                       conv=conv)

    @nn.compact
    def __call__(self, x, cache=None, *, segment_ids=None):
        cfg = self.config
        check_decode_inputs(self.registry_name, x, cache, segment_ids, cfg.d_model)
        h, hkv, dh = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        x = x.astype(cfg.dtype)
        t = x.shape[1]
        streams = {name: self.proj(width, f"{name}_proj", use_bias=cfg.use_bias)(x)
                   for name, width in (("q", h * dh), ("k", hkv * dh), ("v", hkv * dh))}
        conv_states = ()
        if cfg.qkv_conv_size is not None:
            streams, conv_states = rec.short_convs(streams, kernel_size=cfg.qkv_conv_size, cache=cache,
                                                   segment_ids=segment_ids, dtype=cfg.dtype,
                                                   param_dtype=cfg.param_dtype, activation="none")
        q = rec.split_heads(streams["q"], h)  # [B,T,H,K]
        k, v = rec.split_heads(streams["k"], hkv), rec.split_heads(streams["v"], hkv)  # [B,T,Hkv,K]
        if cfg.qk_norm:
            norm = dict(eps=cfg.qk_norm_eps, zero_centered=cfg.qk_norm_zero_centered, dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype)
            q = RMSNorm(**norm, name="q_norm")(q)
            k = RMSNorm(**norm, name="k_norm")(k)
        if cfg.rotary_fraction > 0 and rotary_dim(dh, cfg.rotary_fraction) > 0:
            positions = token_positions(t, start=None if cache is None else cache.position,
                                        segment_ids=segment_ids)
            q = apply_rotary(q, positions, base=cfg.rotary_base, fraction=cfg.rotary_fraction)
            k = apply_rotary(k, positions, base=cfg.rotary_base, fraction=cfg.rotary_fraction)

        def attend(k, v, ids, window):
            return ops.attention(q, k, v, causal=True, window=window, segment_ids=ids,
                                 softcap=cfg.softcap, chunk_size=cfg.chunk_size,
                                 implementation=cfg.implementation)

        if cache is None:
            o = attend(k, v, segment_ids, cfg.window)
        elif t == 1:
            o, cache = self.decode_step(q, k, v, cache)
        else:
            o, cache = self.extend(q, k, v, cache, attend)
        if cache is not None:
            cache = cache._replace(conv=conv_states)
        o = rec.merge_heads(o)  # [B,T,H*K]
        if cfg.output_gate:
            o = o * jax.nn.sigmoid(self.proj(h * dh, "g_proj", use_bias=cfg.use_bias)(x)).astype(o.dtype)
        return self.proj(cfg.d_model, "o_proj", use_bias=cfg.out_bias)(o), cache

    @nn.nowrap
    def decode_step(self, q, k, v, cache: KVCache):
        """One token: write its key and value in place, attend over the filled slots only."""
        length = cache.k.shape[1]
        slot = cache.position % length
        keys = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), slot, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), slot, axis=1)
        filled = jnp.minimum(cache.position + 1, length)
        o = ops.decode_attention(q, keys, values, filled, softcap=self.config.softcap,
                                 block_size=self.config.chunk_size)
        return o, KVCache(k=keys, v=values, position=cache.position + 1)

    @nn.nowrap
    def extend(self, q, k, v, cache: KVCache, attend):
        """T > 1 tokens after a cache: the ring in time order, then the new keys, then the newest L kept."""
        b, length = cache.k.shape[:2]
        t = q.shape[1]
        oldest_first = cache.position % length  # the ring's oldest slot once it has wrapped, else the first empty one
        keys = jnp.concatenate([jnp.roll(cache.k, -oldest_first, axis=1), k.astype(cache.k.dtype)], axis=1)
        values = jnp.concatenate([jnp.roll(cache.v, -oldest_first, axis=1), v.astype(cache.v.dtype)], axis=1)
        filled = jnp.minimum(cache.position, length)
        slot_used = jnp.arange(length + t) >= length - filled  # [L+T]: never-filled slots are masked
        ids = (jnp.ones((b, t), jnp.int32), jnp.broadcast_to(slot_used.astype(jnp.int32), (b, length + t)))
        # A window of L: each query sees at most the L most recent keys, as a decode step does.
        o = attend(keys.astype(q.dtype), values.astype(q.dtype), ids, length)
        position = cache.position + t
        # keys[:, t:] holds positions position-L .. position-1 in order; entry j belongs in slot (j + position) % L.
        ring = (jnp.roll(keys[:, t:], position % length, axis=1), jnp.roll(values[:, t:], position % length, axis=1))
        return o, KVCache(k=ring[0], v=ring[1], position=position)
