"""Gated Linear Attention (GLA; Yang et al., 2024, "Gated Linear Attention
Transformers with Hardware-Efficient Training").

Per head, a data-dependent decay per key channel (paper sec. 4.1)::

    S_t = diag(alpha_t) S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t / sqrt(K)
    log alpha_t = logsigmoid(W_2 W_1 x_t + b) / 16

``W_1 W_2`` is a low-rank (16) projection and the division by 16 (the "gate
logit normaliser") keeps ``alpha`` close to 1 at initialisation. The output is
``W_O (swish(W_G x) * RMSNorm_per_head(o))`` (paper eq. 9-10). Keys are
``expand_k * D`` wide (0.5), values ``expand_v * D`` (1).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from effarch.layers.norms import HeadNorm
from effarch.mixers import _recurrence as rec
from effarch.mixers.base import Mixer, MixerConfig, check_decode_inputs, register


@dataclasses.dataclass(frozen=True, kw_only=True)
class GLAConfig(MixerConfig):
    """Gated Linear Attention options.

    Attributes:
      num_heads: heads H.
      expand_k: key width relative to ``d_model`` (paper: 0.5).
      expand_v: value width relative to ``d_model`` (paper: 1).
      gate_low_rank_dim: rank of the decay projection ``W_2 W_1`` (paper: 16).
      gate_logit_normalizer: divides ``logsigmoid(.)`` (paper: 16).
      use_short_conv: causal depthwise convolutions (+ SiLU) on q, k, v.
      conv_size: taps of those convolutions.
      chunk_size: chunk length of the chunked form of the op.
    """

    IMPLEMENTATIONS: ClassVar[tuple[str, ...]] = rec.LINEAR_ATTENTION_IMPLEMENTATIONS
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"num_heads": 2, "gate_low_rank_dim": 4, "use_short_conv": True, "chunk_size": 8},
        "paper": {"num_heads": 4, "expand_k": 0.5, "expand_v": 1.0},
    }

    num_heads: int = 4
    expand_k: float = 0.5
    expand_v: float = 1.0
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0
    use_short_conv: bool = False
    conv_size: int = 4
    chunk_size: int = 64

    def __post_init__(self):
        super().__post_init__()
        if self.num_heads < 1 or self.key_dim % self.num_heads or self.value_dim % self.num_heads:
            raise ValueError(
                f"gla: num_heads={self.num_heads} must divide the key width expand_k * d_model = "
                f"{self.key_dim} and the value width expand_v * d_model = {self.value_dim}.")
        if self.gate_low_rank_dim < 1 or self.gate_logit_normalizer <= 0:
            raise ValueError(f"gla: gate_low_rank_dim={self.gate_low_rank_dim}, gate_logit_normalizer="
                             f"{self.gate_logit_normalizer}; expected >= 1 and > 0.")
        if self.conv_size < 1 or self.chunk_size < 1:
            raise ValueError(f"gla: conv_size={self.conv_size}, chunk_size={self.chunk_size}; expected >= 1.")

    @property
    def key_dim(self) -> int:
        return int(round(self.expand_k * self.d_model))

    @property
    def value_dim(self) -> int:
        return int(round(self.expand_v * self.d_model))


@register("gla", GLAConfig)
class GLA(Mixer):
    """Gated Linear Attention; see the module docstring."""

    config: GLAConfig

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> rec.RecurrentCache:
        cfg = self.config
        h = cfg.num_heads
        widths = (cfg.key_dim, cfg.key_dim, cfg.value_dim) if cfg.use_short_conv else ()
        return rec.empty_cache(batch_size, h, cfg.key_dim // h, cfg.value_dim // h, widths,
                               cfg.conv_size, dtype)

    @nn.compact
    def __call__(self, x, cache=None, *, segment_ids=None):
        cfg = self.config
        check_decode_inputs(self.registry_name, x, cache, segment_ids, cfg.d_model)
        h = cfg.num_heads
        x = x.astype(cfg.dtype)
        streams = {"q": self.proj(cfg.key_dim, "q_proj")(x), "k": self.proj(cfg.key_dim, "k_proj")(x),
                   "v": self.proj(cfg.value_dim, "v_proj")(x)}
        conv_states = None
        if cfg.use_short_conv:
            streams, conv_states = rec.short_convs(streams, kernel_size=cfg.conv_size, cache=cache,
                                                   segment_ids=segment_ids, dtype=cfg.dtype,
                                                   param_dtype=cfg.param_dtype)
        gate_logits = self.proj(cfg.key_dim, "gk_up", use_bias=True)(
            self.proj(cfg.gate_low_rank_dim, "gk_down")(x))  # [B,T,H*K]
        log_decay = jax.nn.log_sigmoid(gate_logits.astype(jnp.float32)) / cfg.gate_logit_normalizer
        q, k, v = (rec.split_heads(streams[n], h) for n in "qkv")
        o, cache = rec.run_linear_attention(q, k, v, rec.split_heads(log_decay, h), cache=cache,
                                            conv_states=conv_states, segment_ids=segment_ids,
                                            chunk_size=cfg.chunk_size, implementation=cfg.implementation)
        o = HeadNorm(kind="rms", dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="head_norm")(o)
        gate = jax.nn.silu(self.proj(cfg.value_dim, "g_proj")(x))
        return self.proj(cfg.d_model, "o_proj")(gate * rec.merge_heads(o)), cache
