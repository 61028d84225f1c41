"""Multi-scale retention (RetNet; Sun et al., 2023, "Retentive Network").

Per head h, with a fixed decay ``gamma_h = 1 - 2^(-5 - h)`` (paper sec. 2.2)::

    S_t = gamma_h S_{t-1} + k_t v_t^T,    o_t = S_t^T q_t / sqrt(K)

with rotary-rotated q and k (the paper's ``e^{i n theta}``, eq. 5), then a
per-head group norm, a swish gate and the output projection (eq. 8)::

    Y = W_O (swish(X W_G) * GroupNorm(retention(X)))

Values are ``expand_v * D`` wide (the paper uses 2). Log decay ``[H]`` goes to
``ops.linear_attention`` as the constant-per-head form.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effarch.layers.norms import HEAD_NORM_KINDS, HeadNorm
from effarch.layers.rotary import apply_rotary, token_positions
from effarch.mixers import _recurrence as rec
from effarch.mixers.base import Mixer, MixerConfig, check_decode_inputs, register


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetNetConfig(MixerConfig):
    """Multi-scale retention options.

    Attributes:
      num_heads: heads H; q, k heads are ``D/H`` wide, v heads ``expand_v * D/H``.
      expand_v: value width relative to ``d_model`` (paper: 2).
      rotary_base: base of the rotary frequencies.
      head_norm: ``"layer"`` (the paper's GroupNorm) or ``"rms"`` statistics.
      chunk_size: chunk length of the chunked form of the op.
    """

    IMPLEMENTATIONS: ClassVar[tuple[str, ...]] = rec.LINEAR_ATTENTION_IMPLEMENTATIONS
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"num_heads": 2, "chunk_size": 8},
        "paper": {"num_heads": 4, "expand_v": 2.0},
    }

    num_heads: int = 4
    expand_v: float = 2.0
    rotary_base: float = 10_000.0
    head_norm: str = "layer"
    chunk_size: int = 64

    def __post_init__(self):
        super().__post_init__()
        if self.num_heads < 1 or self.d_model % self.num_heads or self.value_dim % self.num_heads:
            raise ValueError(
                f"retnet: num_heads={self.num_heads} must divide d_model={self.d_model} and the value "
                f"width expand_v * d_model = {self.value_dim}.")
        if self.head_norm not in HEAD_NORM_KINDS:
            raise ValueError(f"retnet: head_norm={self.head_norm!r}; expected one of {HEAD_NORM_KINDS}.")
        if self.chunk_size < 1:
            raise ValueError(f"retnet: chunk_size={self.chunk_size}; expected >= 1.")

    @property
    def value_dim(self) -> int:
        """Total value width ``expand_v * D``."""
        return int(round(self.expand_v * self.d_model))


def retention_log_decay(num_heads: int) -> jax.Array:
    """``log(1 - 2^(-5 - h))`` for ``h < H``, ``[H]`` float32 (paper sec. 2.2)."""
    return jnp.asarray(np.log1p(-(2.0 ** (-5.0 - np.arange(num_heads)))), jnp.float32)


@register("retnet", RetNetConfig)
class RetNet(Mixer):
    """Multi-scale retention; see the module docstring."""

    config: RetNetConfig

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> rec.RecurrentCache:
        cfg = self.config
        h = cfg.num_heads
        return rec.empty_cache(batch_size, h, cfg.d_model // h, cfg.value_dim // h, dtype=dtype)

    @nn.compact
    def __call__(self, x, cache=None, *, segment_ids=None):
        cfg = self.config
        check_decode_inputs(self.registry_name, x, cache, segment_ids, cfg.d_model)
        h = cfg.num_heads
        x = x.astype(cfg.dtype)
        t = x.shape[1]
        q = rec.split_heads(self.proj(cfg.d_model, "q_proj")(x), h)  # [B,T,H,K]
        k = rec.split_heads(self.proj(cfg.d_model, "k_proj")(x), h)
        v = rec.split_heads(self.proj(cfg.value_dim, "v_proj")(x), h)  # [B,T,H,V]
        positions = token_positions(t, start=None if cache is None else cache.position,
                                    segment_ids=segment_ids)
        q = apply_rotary(q, positions, base=cfg.rotary_base)
        k = apply_rotary(k, positions, base=cfg.rotary_base)
        o, cache = rec.run_linear_attention(q, k, v, retention_log_decay(h), cache=cache,
                                            segment_ids=segment_ids, chunk_size=cfg.chunk_size,
                                            implementation=cfg.implementation)
        o = HeadNorm(kind=cfg.head_norm, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="head_norm")(o)
        gate = jax.nn.silu(self.proj(cfg.value_dim, "g_proj")(x))
        return self.proj(cfg.d_model, "o_proj")(gate * rec.merge_heads(o)), cache
