"""Mamba-2 block (Dao & Gu, 2024, "Transformers are SSMs"), the SSD layer.

Per head h with a scalar decay and a ``[N, P]`` state (paper sec. 7, Fig. 6)::

    z, xBC, dt = in_proj(u)                           # xBC = [x (E*D), B (G*N), C (G*N)]
    x, B, C    = split(silu(causal_depthwise_conv(xBC)))
    dt         = softplus(dt + dt_bias)                # [B,T,H]
    S_t = exp(dt_t A_h) S_{t-1} + B_t (dt_t x_t)^T,    y_t = S_t^T C_t + D_h x_t
    out        = out_proj(RMSNorm_grouped(y * silu(z)))

So SSD is ``ops.linear_attention`` with ``q = C``, ``k = B``, ``v = x * dt``,
``log_decay = dt * A`` ``[B,T,H]`` and ``scale = 1``; heads in a group share
B and C (like GQA). ``A = -exp(A_log)`` with ``-A`` uniform in ``[1, 16]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from effarch.layers.conv import ShortConv
from effarch.layers.norms import GatedRMSNorm
from effarch.mixers import _recurrence as rec
from effarch.mixers.base import Mixer, MixerConfig, check_decode_inputs, register
from effarch.mixers.mamba import check_dt_range, dt_bias_init


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mamba2Config(MixerConfig):
    """Mamba-2 block options (defaults: ``mamba_ssm.Mamba2``).

    Attributes:
      d_state: state size N per head.
      d_conv: taps of the causal depthwise convolution over ``xBC``.
      expand: inner width ``E * D``.
      head_dim: P, channels per head (``E * D / P`` heads).
      ngroups: G groups of heads sharing B and C; divides the number of heads.
      a_init_range: range of the initial ``-A`` per head.
      dt_min, dt_max: range of the initial step sizes.
      dt_init_floor: smallest initial step size.
      chunk_size: chunk length of the chunked form of the op.
      norm_eps: epsilon of the gated RMSNorm (``mamba_ssm`` and transformers'
        ``Mamba2Mixer``: 1e-5).
    """

    IMPLEMENTATIONS: ClassVar[tuple[str, ...]] = rec.LINEAR_ATTENTION_IMPLEMENTATIONS
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"d_state": 8, "head_dim": 16, "ngroups": 2, "chunk_size": 8},
        "paper": {"d_state": 128, "head_dim": 64, "expand": 2},
    }

    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 64
    ngroups: int = 1
    a_init_range: tuple[float, float] = (1.0, 16.0)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    chunk_size: int = 256
    norm_eps: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        for field in ("d_state", "d_conv", "expand", "head_dim", "ngroups", "chunk_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"mamba2: {field}={getattr(self, field)}; expected >= 1.")
        if self.d_inner % self.head_dim:
            raise ValueError(f"mamba2: head_dim={self.head_dim} must divide the inner width "
                             f"expand * d_model = {self.d_inner}.")
        if self.num_heads % self.ngroups:
            raise ValueError(f"mamba2: ngroups={self.ngroups} must divide the number of heads "
                             f"expand * d_model / head_dim = {self.num_heads}.")
        if self.norm_eps <= 0:
            raise ValueError(f"mamba2: norm_eps={self.norm_eps}; expected > 0.")
        low, high = self.a_init_range
        if not 0 < low <= high:
            raise ValueError(f"mamba2: a_init_range={self.a_init_range}; expected 0 < low <= high.")
        check_dt_range("mamba2", self.dt_min, self.dt_max, self.dt_init_floor)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def num_heads(self) -> int:
        return self.d_inner // self.head_dim

    @property
    def conv_dim(self) -> int:
        """Width of ``xBC``: ``E*D + 2 G N``."""
        return self.d_inner + 2 * self.ngroups * self.d_state


def log_uniform_a(low: float, high: float):
    """``A_log`` initialiser: ``log(-A)`` with ``-A`` uniform in ``[low, high]``."""

    def init(key, shape, dtype=jnp.float32):
        return jnp.log(jax.random.uniform(key, shape, jnp.float32, low, high)).astype(dtype)

    return init


@register("mamba2", Mamba2Config)
class Mamba2(Mixer):
    """Mamba-2 (SSD) block; see the module docstring."""

    config: Mamba2Config

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> rec.RecurrentCache:
        cfg = self.config
        return rec.empty_cache(batch_size, cfg.num_heads, cfg.d_state, cfg.head_dim, (cfg.conv_dim,),
                               cfg.d_conv, dtype)

    @nn.compact
    def __call__(self, x, cache=None, *, segment_ids=None):
        cfg = self.config
        check_decode_inputs(self.registry_name, x, cache, segment_ids, cfg.d_model)
        di, n, g, h, p = cfg.d_inner, cfg.d_state, cfg.ngroups, cfg.num_heads, cfg.head_dim
        x = x.astype(cfg.dtype)
        zxbcdt = self.proj(2 * di + 2 * g * n + h, "in_proj")(x)
        z, xbc, dt = zxbcdt[..., :di], zxbcdt[..., di : di + cfg.conv_dim], zxbcdt[..., di + cfg.conv_dim :]
        xbc, conv_state = ShortConv(kernel_size=cfg.d_conv, activation="silu", dtype=cfg.dtype,
                                    param_dtype=cfg.param_dtype, name="conv")(
            xbc, None if cache is None else cache.conv[0], segment_ids=segment_ids)
        u = rec.split_heads(xbc[..., :di], h)  # [B,T,H,P]
        b_in = rec.split_heads(xbc[..., di : di + g * n], g)  # [B,T,G,N]
        c_out = rec.split_heads(xbc[..., di + g * n :], g)  # [B,T,G,N]
        dt_bias = self.param("dt_bias", dt_bias_init(cfg.dt_min, cfg.dt_max, cfg.dt_init_floor), (h,),
                             cfg.param_dtype)
        dt = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias.astype(jnp.float32))  # [B,T,H]
        a = -jnp.exp(self.param("A_log", log_uniform_a(*cfg.a_init_range), (h,), cfg.param_dtype)
                     .astype(jnp.float32))  # [H]
        v = (u.astype(jnp.float32) * dt[..., None]).astype(cfg.dtype)  # [B,T,H,P]
        # C and B by group (ops.linear_attention shares each among the group's H / G heads).
        y, cache = rec.run_linear_attention(
            c_out, b_in, v, dt * a, cache=cache, conv_states=(conv_state,) if cache is not None else None,
            segment_ids=segment_ids, scale=1.0, chunk_size=cfg.chunk_size, implementation=cfg.implementation)
        d_skip = self.param("D", nn.initializers.ones, (h,), cfg.param_dtype)
        y = y.astype(jnp.float32) + u.astype(jnp.float32) * d_skip.astype(jnp.float32)[:, None]
        y = GatedRMSNorm(group_size=di // g, eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         name="norm")(rec.merge_heads(y), z)
        return self.proj(cfg.d_model, "out_proj")(y), cache
