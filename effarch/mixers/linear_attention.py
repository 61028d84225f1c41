"""Linear attention (Katharopoulos et al., 2020) and Based (Arora et al., 2024).

``o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t)`` with ``S_t = S_{t-1} + phi(k_t) v_t^T``
and ``z_t = z_{t-1} + phi(k_t)``: the one recurrence with no decay (a = 1).
The normaliser ``z`` is not a second recurrence: a column of ones appended to
``v`` makes ``ops.linear_attention`` return ``phi(q_t)^T z_t`` as its last
output channel.

Feature maps ``phi``:
- ``"identity"``: ``phi(x) = x``;
- ``"elu"``: ``phi(x) = elu(x) + 1`` (Katharopoulos et al., eq. 7);
- ``"taylor"``: Based's 2nd-order Taylor map of ``exp(q.k / sqrt(d))``,
  ``phi(x) = [1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))]`` on a reduced
  feature dim ``d`` (16 in Based), so ``phi(q).phi(k) = 1 + q.k/sqrt(d) + (q.k)^2/(2d)``;
- ``"hedgehog"``: Hedgehog's learnable map (Zhang et al., 2024, eq. 4),
  ``phi(x) = [softmax(x W), softmax(-x W)]`` over the feature axis, one
  ``W [d, d]`` per head for queries (``q_feature``) and one for keys
  (``k_feature``), initialised to the identity; ``2 d`` state rows. It is
  what a softmax-attention layer converts to (effarch.models.linearize).

Optional short convolutions on q, k, v (Based puts one in front of the layer).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from effarch.layers.norms import HeadNorm
from effarch.mixers import _recurrence as rec
from effarch.mixers.base import Mixer, MixerConfig, check_decode_inputs, register

FEATURE_MAPS = ("identity", "elu", "taylor", "hedgehog")
NORMALIZATIONS = ("sum", "head_norm", "none")
# Guards the "sum" normaliser phi(q).z against zero.
DENOMINATOR_EPS = 1e-6


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearAttentionConfig(MixerConfig):
    """Linear attention options.

    Attributes:
      num_heads: heads H; ``d_model`` splits into H value heads of size ``D/H``.
      feature_map: ``"identity"``, ``"elu"`` (elu + 1), ``"taylor"`` (Based) or
        ``"hedgehog"`` (learnable, initialised from the identity).
      feature_dim: per-head width of q and k before the feature map (None:
        ``D/H``); ``"taylor"`` expands it to ``1 + d + d^2`` state rows,
        ``"hedgehog"`` to ``2 d``.
      normalization: ``"sum"`` divides by ``phi(q).sum_s phi(k_s)`` (needs a
        positive feature map: elu, taylor or hedgehog); ``"head_norm"`` applies an RMS
        norm per head instead; ``"none"`` leaves the output unnormalised.
      use_short_conv: causal depthwise convolutions (+ SiLU) on q, k and v.
      conv_size: taps of those convolutions.
      chunk_size: chunk length of the chunked form of the op.
    """

    IMPLEMENTATIONS: ClassVar[tuple[str, ...]] = rec.LINEAR_ATTENTION_IMPLEMENTATIONS
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"num_heads": 2, "feature_map": "elu", "use_short_conv": True, "chunk_size": 8},
        "based": {"num_heads": 16, "feature_map": "taylor", "feature_dim": 16, "use_short_conv": True},
        "tiny_based": {"num_heads": 2, "feature_map": "taylor", "feature_dim": 4, "use_short_conv": True,
                       "chunk_size": 8},
        "tiny_hedgehog": {"num_heads": 2, "feature_map": "hedgehog", "chunk_size": 8},
    }

    num_heads: int = 4
    feature_map: str = "elu"
    feature_dim: int | None = None
    normalization: str = "sum"
    use_short_conv: bool = False
    conv_size: int = 4
    chunk_size: int = 64

    def __post_init__(self):
        super().__post_init__()
        if self.num_heads < 1 or self.d_model % self.num_heads:
            raise ValueError(f"linear_attention: num_heads={self.num_heads} must divide d_model={self.d_model}.")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"linear_attention: feature_map={self.feature_map!r}; expected one of {FEATURE_MAPS}.")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"linear_attention: normalization={self.normalization!r}; expected one of {NORMALIZATIONS}.")
        if self.normalization == "sum" and self.feature_map == "identity":
            raise ValueError("linear_attention: normalization='sum' needs a positive feature map "
                             "('elu' or 'taylor'); feature_map='identity' can divide by zero.")
        if self.feature_dim is not None and self.feature_dim < 1:
            raise ValueError(f"linear_attention: feature_dim={self.feature_dim}; expected >= 1 or None.")
        if self.conv_size < 1 or self.chunk_size < 1:
            raise ValueError(f"linear_attention: conv_size={self.conv_size}, chunk_size={self.chunk_size}; "
                             "expected both >= 1.")

    @property
    def head_dim(self) -> int:
        """Per-head value width ``D/H``."""
        return self.d_model // self.num_heads

    @property
    def qk_dim(self) -> int:
        """Per-head width of q and k before the feature map."""
        return self.head_dim if self.feature_dim is None else self.feature_dim

    @property
    def state_key_dim(self) -> int:
        """Per-head key width after the feature map (rows of the state)."""
        d = self.qk_dim
        if self.feature_map == "taylor":
            return 1 + d + d * d
        return 2 * d if self.feature_map == "hedgehog" else d

    @property
    def state_value_dim(self) -> int:
        """Per-head value width of the state (+1 for the "sum" normaliser column)."""
        return self.head_dim + (self.normalization == "sum")


def taylor_feature_map(x: jax.Array) -> jax.Array:
    """Based's ``[1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))]``: ``[..., d] -> [..., 1 + d + d^2]``."""
    d = x.shape[-1]
    outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
    ones = jnp.ones((*x.shape[:-1], 1), x.dtype)
    return jnp.concatenate([ones, x / d**0.25, outer / (math.sqrt(2.0) * math.sqrt(d))], axis=-1)


def hedgehog_feature_map(x: jax.Array, weight: jax.Array) -> jax.Array:
    """Hedgehog's ``[softmax(x W), softmax(-x W)]``: ``x [B,T,H,d]``, ``weight [H,d,d]`` -> ``[B,T,H,2d]``."""
    u = jnp.einsum("bthd,hde->bthe", x, weight.astype(x.dtype))  # [B,T,H,d]
    u32 = u.astype(jnp.float32)
    return jnp.concatenate([jax.nn.softmax(u32, axis=-1), jax.nn.softmax(-u32, axis=-1)], axis=-1).astype(x.dtype)


def identity_per_head(key, shape, dtype=jnp.float32):
    """``[H, d, d]`` identity matrices (the initial Hedgehog map weights)."""
    del key
    return jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype), shape)


def feature_map(name: str, x: jax.Array) -> jax.Array:
    """Applies the named parameter-free feature map to ``x [..., d]`` (not ``"hedgehog"``, which has weights)."""
    if name == "hedgehog":
        raise ValueError("feature_map: 'hedgehog' has learned weights; use hedgehog_feature_map(x, weight).")
    if name == "identity":
        return x
    if name == "elu":
        return jax.nn.elu(x) + 1.0
    return taylor_feature_map(x)


@register("linear_attention", LinearAttentionConfig)
class LinearAttention(Mixer):
    """Linear attention / Based; see the module docstring."""

    config: LinearAttentionConfig

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> rec.RecurrentCache:
        cfg = self.config
        h = cfg.num_heads
        widths = (h * cfg.qk_dim, h * cfg.qk_dim, cfg.d_model) if cfg.use_short_conv else ()
        return rec.empty_cache(batch_size, h, cfg.state_key_dim, cfg.state_value_dim, widths,
                               cfg.conv_size, dtype)

    @nn.compact
    def __call__(self, x, cache=None, *, segment_ids=None):
        cfg = self.config
        check_decode_inputs(self.registry_name, x, cache, segment_ids, cfg.d_model)
        h = cfg.num_heads
        x = x.astype(cfg.dtype)
        streams = {"q": self.proj(h * cfg.qk_dim, "q_proj")(x), "k": self.proj(h * cfg.qk_dim, "k_proj")(x),
                   "v": self.proj(cfg.d_model, "v_proj")(x)}
        conv_states = None
        if cfg.use_short_conv:
            streams, conv_states = rec.short_convs(streams, kernel_size=cfg.conv_size, cache=cache,
                                                   segment_ids=segment_ids, dtype=cfg.dtype,
                                                   param_dtype=cfg.param_dtype)
        q, k = rec.split_heads(streams["q"], h), rec.split_heads(streams["k"], h)  # [B,T,H,d]
        if cfg.feature_map == "hedgehog":
            shape = (h, cfg.qk_dim, cfg.qk_dim)
            q = hedgehog_feature_map(q, self.param("q_feature", identity_per_head, shape, cfg.param_dtype))
            k = hedgehog_feature_map(k, self.param("k_feature", identity_per_head, shape, cfg.param_dtype))
        else:
            q, k = feature_map(cfg.feature_map, q), feature_map(cfg.feature_map, k)  # [B,T,H,K']
        v = rec.split_heads(streams["v"], h)  # [B,T,H,V]
        if cfg.normalization == "sum":
            v = jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)  # [B,T,H,V+1]
        scale = 1.0 if cfg.feature_map == "taylor" else None
        o, cache = rec.run_linear_attention(q, k, v, None, cache=cache, conv_states=conv_states,
                                            segment_ids=segment_ids, scale=scale,
                                            chunk_size=cfg.chunk_size, implementation=cfg.implementation)
        if cfg.normalization == "sum":
            o32 = o.astype(jnp.float32)
            o = (o32[..., :-1] / (o32[..., -1:] + DENOMINATOR_EPS)).astype(cfg.dtype)
        elif cfg.normalization == "head_norm":
            o = HeadNorm(kind="rms", dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="head_norm")(o)
        return self.proj(cfg.d_model, "o_proj")(rec.merge_heads(o)), cache
