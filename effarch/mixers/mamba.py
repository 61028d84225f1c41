"""Mamba-1 block (Gu & Dao, 2023, "Mamba: Linear-Time Sequence Modeling with
Selective State Spaces"), the selective scan S6 at its core.

Per inner channel d with a diagonal state ``h [N]`` (paper Alg. 2)::

    x, z   = in_proj(u)                              # two branches of width E*D
    x      = silu(causal_depthwise_conv(x))
    dt, B, C = split(x_proj(x))                      # dt low-rank (dt_rank), B, C [N]
    dt, B, C = rmsnorm(dt), rmsnorm(B), rmsnorm(C)   # only with dt_bc_norm (Jamba)
    dt     = softplus(dt_proj(dt) + dt_bias)
    h_t    = exp(dt_t A) h_{t-1} + dt_t B_t x_t      # A = -exp(A_log), S4D-real init
    y_t    = (C_t . h_t + D x_t) * silu(z_t)
    out    = out_proj(y)

``ops.selective_scan`` computes the scan, the D skip and the z gate. The
``dt_bias`` initialisation (inverse softplus of a log-uniform ``dt``) is shared
with Mamba-2. ``dt_bc_norm`` adds Jamba's three RMSNorms with learned scales
(Lieber et al., 2024, sec. 3: they stabilise training at scale) on the
low-rank dt, on B and on C, before dt_proj and the scan.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from effarch import ops
from effarch.layers.conv import ShortConv, init_conv_state
from effarch.layers.norms import RMSNorm
from effarch.mixers.base import Mixer, MixerConfig, check_decode_inputs, register
from effarch.ops.selective_scan import IMPLEMENTATIONS as _SELECTIVE_SCAN_IMPLEMENTATIONS


def dt_bias_init(dt_min: float, dt_max: float, dt_floor: float):
    """Initialiser of ``dt_bias``: ``softplus^-1(dt)``, ``dt`` log-uniform in ``[dt_min, dt_max]``.

    So ``softplus(0 + dt_bias)`` starts in the useful range of step sizes
    (Mamba, sec. 3.6 / ``mamba_simple.py``); ``dt`` is floored at ``dt_floor``.
    """

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, dt_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # inverse softplus

    return init


def check_dt_range(name: str, dt_min: float, dt_max: float, dt_floor: float) -> None:
    """``0 < dt_floor <= dt_min <= dt_max``, else a ValueError naming the values."""
    if not 0 < dt_floor <= dt_min <= dt_max:
        raise ValueError(f"{name}: dt_min={dt_min}, dt_max={dt_max}, dt_init_floor={dt_floor}; "
                         "expected 0 < dt_init_floor <= dt_min <= dt_max.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MambaConfig(MixerConfig):
    """Mamba-1 block options (defaults: ``mamba_simple.Mamba``).

    Attributes:
      d_state: state size N per channel.
      d_conv: taps of the causal depthwise convolution.
      expand: inner width ``E * D``.
      dt_rank: rank of the dt projection (None: ``ceil(D / 16)``).
      dt_min, dt_max: range of the initial step sizes.
      dt_init_floor: smallest initial step size.
      dt_bc_norm: RMS-normalise the low-rank dt, B and C, each with a learned
        scale (Jamba's ``dt_layernorm``, ``b_layernorm``, ``c_layernorm``).
      dt_bc_norm_eps: epsilon of those three norms.
    """

    IMPLEMENTATIONS: ClassVar[tuple[str, ...]] = tuple(i for i in _SELECTIVE_SCAN_IMPLEMENTATIONS if i != "auto")
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"d_state": 4, "expand": 2},
        "tiny_jamba": {"d_state": 4, "expand": 2, "dt_bc_norm": True},
        "paper": {"d_state": 16, "d_conv": 4, "expand": 2},
    }

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_bc_norm: bool = False
    dt_bc_norm_eps: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        for field in ("d_state", "d_conv", "expand"):
            if getattr(self, field) < 1:
                raise ValueError(f"mamba: {field}={getattr(self, field)}; expected >= 1.")
        if not self.dt_bc_norm_eps > 0:
            raise ValueError(f"mamba: dt_bc_norm_eps={self.dt_bc_norm_eps}; expected > 0.")
        if self.dt_rank is not None and self.dt_rank < 1:
            raise ValueError(f"mamba: dt_rank={self.dt_rank}; expected >= 1 or None.")
        check_dt_range("mamba", self.dt_min, self.dt_max, self.dt_init_floor)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def rank(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank is None else self.dt_rank


class MambaCache(NamedTuple):
    """Decode cache of a Mamba-1 block.

    Attributes:
      conv: ``[B,W-1,E*D]`` last inputs of the convolution.
      ssm: ``[B,E*D,N]`` float32 scan state.
    """

    conv: jax.Array
    ssm: jax.Array


def symmetric_uniform(bound: float):
    """Initialiser drawing uniformly from ``[-bound, bound)``."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def s4d_real_log_a(d_state: int):
    """``A_log`` initialiser: ``A = -(1, 2, ..., N)`` for every channel (S4D-Real)."""

    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.broadcast_to(jnp.log(jnp.arange(1, d_state + 1, dtype=jnp.float32)), shape).astype(dtype)

    return init


@register("mamba", MambaConfig)
class Mamba(Mixer):
    """Mamba-1 block; see the module docstring."""

    config: MambaConfig

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> MambaCache:
        cfg = self.config
        return MambaCache(conv=init_conv_state(batch_size, cfg.d_conv, cfg.d_inner, dtype),
                          ssm=jnp.zeros((batch_size, cfg.d_inner, cfg.d_state), jnp.float32))

    @nn.compact
    def __call__(self, x, cache=None, *, segment_ids=None):
        cfg = self.config
        check_decode_inputs(self.registry_name, x, cache, segment_ids, cfg.d_model)
        di, n, r = cfg.d_inner, cfg.d_state, cfg.rank
        x = x.astype(cfg.dtype)
        xz = self.proj(2 * di, "in_proj")(x)
        u, z = xz[..., :di], xz[..., di:]  # [B,T,E*D] each
        u, conv_state = ShortConv(kernel_size=cfg.d_conv, activation="silu", dtype=cfg.dtype,
                                  param_dtype=cfg.param_dtype, name="conv")(
            u, None if cache is None else cache.conv, segment_ids=segment_ids)
        dt_bc = self.proj(r + 2 * n, "x_proj")(u)
        dt_low, b_in, c_out = dt_bc[..., :r], dt_bc[..., r : r + n], dt_bc[..., r + n :]
        if cfg.dt_bc_norm:
            norm = dict(eps=cfg.dt_bc_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
            dt_low = RMSNorm(**norm, name="dt_norm")(dt_low)  # [B,T,R]
            b_in = RMSNorm(**norm, name="b_norm")(b_in)  # [B,T,N]
            c_out = RMSNorm(**norm, name="c_norm")(c_out)  # [B,T,N]
        # mamba_simple: dt_proj weights uniform in +-dt_rank^-0.5.
        dt = self.proj(di, "dt_proj", kernel_init=symmetric_uniform(r**-0.5))(dt_low)  # [B,T,E*D]
        dt_bias = self.param("dt_bias", dt_bias_init(cfg.dt_min, cfg.dt_max, cfg.dt_init_floor), (di,),
                             cfg.param_dtype)
        a_log = self.param("A_log", s4d_real_log_a(n), (di, n), cfg.param_dtype)
        d_skip = self.param("D", nn.initializers.ones, (di,), cfg.param_dtype)
        y, ssm = ops.selective_scan(
            u, dt, -jnp.exp(a_log.astype(jnp.float32)), b_in[:, :, None, :], c_out[:, :, None, :],
            d_skip.astype(jnp.float32), z, dt_bias=dt_bias.astype(jnp.float32), dt_softplus=True,
            initial_state=None if cache is None else cache.ssm, return_final_state=cache is not None,
            segment_ids=segment_ids, implementation=cfg.implementation)
        out = self.proj(cfg.d_model, "out_proj")(y.astype(cfg.dtype))
        return out, (None if cache is None else MambaCache(conv=conv_state, ssm=ssm))
