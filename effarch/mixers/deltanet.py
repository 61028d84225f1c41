"""DeltaNet and Gated DeltaNet: the delta rule with short convolutions.

DeltaNet (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta
Rule over Sequence Length") writes by error correction, per head::

    S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T q_t / sqrt(K)

with ``q``, ``k`` from SiLU short convolutions and L2-normalised, ``v`` from a
SiLU short convolution, ``beta_t = sigmoid(W_beta x_t)`` per head, and an RMS
norm over each head's ``V`` channels (one scale shared by the heads) before
the output projection.

Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024, "Gated Delta Networks")
adds a Mamba-2-style decay per head and step, and an output gate::

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    alpha_t = exp(-exp(A_log) softplus(W_alpha x_t + dt_bias))
    y = W_o (rmsnorm(o_t) ⊙ silu(W_g x_t))

Both are one call of ``ops.delta_rule``. Keys and values may have separate
head counts (``num_v_heads``, Qwen3-Next's grouped value heads): each of the
``H_k`` query/key heads serves ``H_v / H_k`` consecutive value heads, which
carry their own state, ``beta``, decay and gate.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from effarch import ops
from effarch.layers.norms import RMSNorm
from effarch.mixers import _recurrence as rec
from effarch.mixers.base import Mixer, MixerConfig, check_decode_inputs, register

# Added to |x|^2 in the L2 normalisation of q and k (flash-linear-attention's l2norm).
L2_EPS = 1e-6
# Gated DeltaNet init (Mamba-2): A ~ U(A_INIT_RANGE), dt ~ logU(DT_INIT_RANGE), dt >= DT_FLOOR.
A_INIT_RANGE = (1.0, 16.0)
DT_INIT_RANGE = (1e-3, 1e-1)
DT_FLOOR = 1e-4


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeltaNetConfig(MixerConfig):
    """DeltaNet options.

    Attributes:
      head_dim: key width K per head.
      num_heads: query/key heads H_k (None: ``d_model // head_dim``).
      num_v_heads: value heads H_v, a multiple of H_k (None: H_k); each key
        head serves ``H_v / H_k`` consecutive value heads.
      expand_v: value width per head ``V = expand_v * head_dim``.
      conv_size: taps of the short convolutions on q, k and v.
      chunk_size: chunk length of the chunked delta rule.
      norm_eps: epsilon of the output RMS norm (flash-linear-attention: 1e-5;
        Qwen3-Next: 1e-6).
    """

    IMPLEMENTATIONS: ClassVar[tuple[str, ...]] = ("recurrent", "chunked")
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"tiny": {"head_dim": 8, "chunk_size": 8}}

    head_dim: int = 64
    num_heads: int | None = None
    num_v_heads: int | None = None
    expand_v: int = 1
    conv_size: int = 4
    chunk_size: int = 64
    norm_eps: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if self.head_dim < 1:
            raise ValueError(f"{name}: head_dim={self.head_dim}; expected >= 1.")
        if self.num_heads is None and self.d_model % self.head_dim:
            raise ValueError(
                f"{name}: head_dim={self.head_dim} must divide d_model={self.d_model} when num_heads is None.")
        if self.num_heads is not None and self.num_heads < 1:
            raise ValueError(f"{name}: num_heads={self.num_heads}; expected >= 1 or None.")
        if self.num_v_heads is not None and (self.num_v_heads < 1 or self.num_v_heads % self.heads):
            raise ValueError(f"{name}: num_v_heads={self.num_v_heads} must be a positive multiple of the "
                             f"query/key heads num_heads={self.heads}.")
        if self.norm_eps <= 0:
            raise ValueError(f"{name}: norm_eps={self.norm_eps}; expected > 0.")
        if self.expand_v < 1 or self.conv_size < 1 or self.chunk_size < 1:
            raise ValueError(f"{name}: expand_v={self.expand_v}, conv_size={self.conv_size}, "
                             f"chunk_size={self.chunk_size}; expected all >= 1.")

    @property
    def heads(self) -> int:
        """The number of query/key heads H_k."""
        return self.d_model // self.head_dim if self.num_heads is None else self.num_heads

    @property
    def value_heads(self) -> int:
        """The number of value heads H_v (each with its own state)."""
        return self.heads if self.num_v_heads is None else self.num_v_heads

    @property
    def value_dim(self) -> int:
        """Value width V per head."""
        return self.expand_v * self.head_dim


@dataclasses.dataclass(frozen=True, kw_only=True)
class GatedDeltaNetConfig(DeltaNetConfig):
    """Gated DeltaNet options (see :class:`DeltaNetConfig`); values twice as wide by default."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"head_dim": 8, "expand_v": 2, "chunk_size": 8},
        "tiny_grouped": {"head_dim": 8, "num_heads": 2, "num_v_heads": 4, "chunk_size": 8},
        # Qwen3-Next-80B-A3B's linear-attention layers (d_model 2048).
        "qwen3_next": {"head_dim": 128, "num_heads": 16, "num_v_heads": 32, "expand_v": 1, "norm_eps": 1e-6},
    }

    expand_v: int = 2


def l2_normalize(x: jax.Array) -> jax.Array:
    """``x / sqrt(|x|^2 + L2_EPS)`` over the last axis, computed in float32, returned in ``x.dtype``."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + L2_EPS)).astype(x.dtype)


@register("deltanet", DeltaNetConfig)
class DeltaNet(Mixer):
    """DeltaNet: ``x [B,T,D] -> y [B,T,D]``; cache ``_recurrence.RecurrentCache``."""

    config: DeltaNetConfig
    # Gated DeltaNet: decay alpha_t and an output gate.
    GATED: ClassVar[bool] = False

    @nn.compact
    def __call__(self, x, cache: rec.RecurrentCache | None = None, *, segment_ids=None):
        cfg = self.config
        check_decode_inputs(self.registry_name, x, cache, segment_ids, cfg.d_model)
        heads, v_heads, kd, vd = cfg.heads, cfg.value_heads, cfg.head_dim, cfg.value_dim
        x = x.astype(cfg.dtype)
        streams = {"q": self.proj(heads * kd, "q_proj")(x), "k": self.proj(heads * kd, "k_proj")(x),
                   "v": self.proj(v_heads * vd, "v_proj")(x)}
        streams, conv_states = rec.short_convs(
            streams, kernel_size=cfg.conv_size, cache=cache, segment_ids=segment_ids,
            dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        group = v_heads // heads
        q = jnp.repeat(l2_normalize(rec.split_heads(streams["q"], heads)), group, axis=2)  # [B,T,H_v,K]
        k = jnp.repeat(l2_normalize(rec.split_heads(streams["k"], heads)), group, axis=2)
        v = rec.split_heads(streams["v"], v_heads)  # [B,T,H_v,V]
        beta = jax.nn.sigmoid(self.proj(v_heads, "b_proj")(x).astype(jnp.float32))  # [B,T,H_v]
        log_decay = self._log_decay(x) if self.GATED else None
        o, state = ops.delta_rule(
            q, k, v, beta, log_decay, scale=kd**-0.5,
            initial_state=None if cache is None else cache.state,
            return_final_state=cache is not None, segment_ids=segment_ids,
            chunk_size=cfg.chunk_size, implementation=cfg.implementation)
        o = RMSNorm(eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="o_norm")(o)  # scale [V]
        if self.GATED:
            o = o * jax.nn.silu(rec.split_heads(self.proj(v_heads * vd, "g_proj")(x), v_heads))
        y = self.proj(cfg.d_model, "o_proj")(rec.merge_heads(o))
        if cache is None:
            return y, None
        return y, rec.RecurrentCache(state=state, conv=conv_states, position=cache.position + x.shape[1])

    def _log_decay(self, x):
        """Gated DeltaNet's ``log alpha = -exp(A_log) softplus(W_alpha x + dt_bias)``, ``[B,T,H_v]`` float32."""
        cfg = self.config
        heads = cfg.value_heads
        a_log = self.param("A_log", a_log_init, (heads,), cfg.param_dtype)
        dt_bias = self.param("dt_bias", dt_bias_init, (heads,), cfg.param_dtype)
        dt = jax.nn.softplus(self.proj(heads, "a_proj")(x).astype(jnp.float32) + dt_bias.astype(jnp.float32))
        return -jnp.exp(a_log.astype(jnp.float32)) * dt

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> rec.RecurrentCache:
        """An empty cache; its size does not depend on ``max_len``."""
        cfg = self.config
        kd, vd = cfg.heads * cfg.head_dim, cfg.value_heads * cfg.value_dim
        return rec.empty_cache(batch_size, cfg.value_heads, cfg.head_dim, cfg.value_dim, conv_widths=(kd, kd, vd),
                               kernel_size=cfg.conv_size, dtype=dtype)


@register("gated_deltanet", GatedDeltaNetConfig)
class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet: DeltaNet with the decay ``alpha_t`` and a SiLU output gate."""

    config: GatedDeltaNetConfig
    GATED: ClassVar[bool] = True


def a_log_init(key, shape, dtype=jnp.float32):
    """``log A`` with ``A`` uniform in ``A_INIT_RANGE``."""
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, *A_INIT_RANGE)).astype(dtype)


def dt_bias_init(key, shape, dtype=jnp.float32):
    """``softplus^{-1}(dt)`` with ``dt`` log-uniform in ``DT_INIT_RANGE``."""
    low, high = (math.log(v) for v in DT_INIT_RANGE)
    dt = jnp.maximum(jnp.exp(jax.random.uniform(key, shape, jnp.float32, low, high)), DT_FLOOR)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
