"""S4D: the diagonal linear time-invariant SSM (Gu et al., 2022, "On the
Parameterization and Initialization of Diagonal State Space Models").

Per channel d, ``M = N/2`` complex modes in conjugate pairs, zero-order hold
with step ``dt_d`` (paper eq. 5-6)::

    lambda = exp(dt A),   b = (lambda - 1) / A        (B = 1, absorbed into C)
    h_t    = lambda h_{t-1} + b u_t                   (complex, [M] per channel)
    y_t    = 2 Re(C . h_t) + D u_t

Initialisations: ``"lin"`` (S4D-Lin, ``A_m = -1/2 + i pi m``) and ``"real"``
(S4D-Real, ``A_m = -(m + 1)``). The layer is the paper's block: ``GELU`` then a
position-wise ``Linear(D, 2D)`` + GLU.

Two forms of the same map:
- ``"fft"``: the convolution kernel in closed form, ``K_l = 2 Re(sum_m C_m b_m
  lambda_m^l)`` (a Vandermonde product), applied by a causal FFT convolution
  (length ``2T``); O(T log T).
- ``"recurrent"``: the scan through ``ops.linear_scan``, which takes real
  decays only. The rotation is factored out exactly: with
  ``rho_t = e^{i theta (t+1)}`` (``theta = arg lambda``, ``r = |lambda|``) and
  ``g_t = conj(rho_t) h_t``, ``g_t = r g_{t-1} + conj(rho_t) b u_t`` is a real
  decay applied to the real and imaginary parts, and ``h_t = rho_t g_t``.
  Powers of ``e^{i theta}`` come from an associative cumulative product, so
  their error grows like ``log T``, not ``T``.

Decoding and packed ``segment_ids`` use the recurrent form (an FFT
convolution cannot restart at a segment boundary).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from effarch import ops
from effarch.layers.conv import fft_causal_conv
from effarch.mixers.base import Mixer, MixerConfig, check_decode_inputs, register
from effarch.ops.linear_scan import IMPLEMENTATIONS as _LINEAR_SCAN_IMPLEMENTATIONS

INITS = ("lin", "real")
MODES = ("fft", "recurrent")


@dataclasses.dataclass(frozen=True, kw_only=True)
class S4DConfig(MixerConfig):
    """S4D options.

    Attributes:
      d_state: N, real state size per channel (``N/2`` complex modes); even.
      init: ``"lin"`` (S4D-Lin) or ``"real"`` (S4D-Real).
      mode: full-sequence form, ``"fft"`` or ``"recurrent"`` (decoding and
        packed segments always use the recurrent form).
      dt_min, dt_max: range of the log-uniform initial step sizes.
    """

    IMPLEMENTATIONS: ClassVar[tuple[str, ...]] = tuple(i for i in _LINEAR_SCAN_IMPLEMENTATIONS if i != "auto")
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"d_state": 8, "mode": "fft"},
        "tiny_real": {"d_state": 8, "init": "real", "mode": "recurrent"},
        "paper": {"d_state": 64, "init": "lin"},
    }

    d_state: int = 64
    init: str = "lin"
    mode: str = "fft"
    dt_min: float = 0.001
    dt_max: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        if self.d_state < 2 or self.d_state % 2:
            raise ValueError(f"s4d: d_state={self.d_state}; expected an even number >= 2 (conjugate pairs).")
        if self.init not in INITS:
            raise ValueError(f"s4d: init={self.init!r}; expected one of {INITS}.")
        if self.mode not in MODES:
            raise ValueError(f"s4d: mode={self.mode!r}; expected one of {MODES}.")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"s4d: dt_min={self.dt_min}, dt_max={self.dt_max}; expected 0 < dt_min <= dt_max.")


class S4DCache(NamedTuple):
    """Decode cache of S4D.

    Attributes:
      state: ``[B,D,M,2]`` float32 real and imaginary parts of ``h``.
    """

    state: jax.Array


def discretize(log_dt, a_real, a_imag):
    """ZOH: ``(lambda, b) = (exp(dt A), (exp(dt A) - 1) / A)``, each ``[D,M]`` complex64."""
    dt = jnp.exp(log_dt.astype(jnp.float32))[:, None]  # [D,1]
    a = a_real.astype(jnp.float32) + 1j * a_imag.astype(jnp.float32)  # [D,M]
    lam = jnp.exp(dt * a)
    return lam, (lam - 1.0) / a


def cumulative_powers(z: jax.Array, length: int) -> jax.Array:
    """``z^1, ..., z^length`` as ``[length, ...]``, by an associative product (error ~ log T)."""
    return jax.lax.associative_scan(jnp.multiply, jnp.broadcast_to(z, (length, *z.shape)), axis=0)


def ssm_kernel(lam: jax.Array, b: jax.Array, c: jax.Array, length: int) -> jax.Array:
    """``K_l = 2 Re(sum_m c_m b_m lambda_m^l)`` for ``l < length``: ``[T, D]`` float32."""
    powers = jnp.concatenate([jnp.ones((1, *lam.shape), lam.dtype), cumulative_powers(lam, length - 1)])  # [T,D,M]
    return 2.0 * jnp.einsum("dm,ldm->ld", c * b, powers).real


def diagonal_ssm_scan(u, lam, b, c, *, initial_state=None, segment_ids=None, implementation="auto"):
    """The recurrent form through ``ops.linear_scan`` (see the module docstring).

    Args:
      u: ``[B,T,D]`` inputs.
      lam, b: ``[D,M]`` complex64 discrete transition and input weights.
      c: ``[D,M]`` complex64 output weights.
      initial_state: optional ``[B,D,M]`` complex64 state.
      segment_ids: optional ``[B,T]`` packed-sequence ids.
      implementation: passed to ``ops.linear_scan``.

    Returns:
      ``y [B,T,D]`` float32 (without the D skip) and the final state ``[B,D,M]`` complex64.
    """
    bsz, t, d = u.shape
    m = lam.shape[-1]
    r = jnp.abs(lam)  # [D,M]
    rho = cumulative_powers(lam / r, t)  # [T,D,M] e^{i theta (t+1)}
    drive = jnp.conj(rho) * b * u.astype(jnp.float32)[..., None]  # [B,T,D,M]
    x = jnp.stack([drive.real, drive.imag], axis=-1).reshape(bsz, t, d * m * 2)
    a = jnp.broadcast_to(jnp.repeat(r.reshape(d * m), 2), x.shape)
    h0 = None
    if initial_state is not None:
        h0 = jnp.stack([initial_state.real, initial_state.imag], axis=-1).reshape(bsz, d * m * 2)
    g, _ = ops.linear_scan(x, a, initial_state=h0, segment_ids=segment_ids, implementation=implementation)
    g = g.reshape(bsz, t, d, m, 2)
    h = rho * (g[..., 0] + 1j * g[..., 1])  # [B,T,D,M]
    y = 2.0 * jnp.einsum("dm,btdm->btd", c, h).real
    return y, h[:, -1]


def diagonal_ssm_reference(u, lam, b, c, initial_state=None):
    """Readable complex ``lax.scan``: ``h_t = lambda h_{t-1} + b u_t``, ``y_t = 2 Re(c . h_t)``."""
    bsz, _, d = u.shape
    h0 = jnp.zeros((bsz, d, lam.shape[-1]), jnp.complex64) if initial_state is None else initial_state

    def step(h, u_t):
        h = lam * h + b * u_t[..., None]
        return h, 2.0 * jnp.einsum("dm,bdm->bd", c, h).real

    h, y = jax.lax.scan(step, h0, jnp.moveaxis(u.astype(jnp.float32), 1, 0))
    return jnp.moveaxis(y, 0, 1), h


def _uniform(low: float, high: float):
    def fn(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, low, high)

    return fn


def _init_a(init: str, part: str):
    """Initialisers of ``log(-Re A)`` and ``Im A`` for S4D-Lin / S4D-Real."""
    def fn(key, shape, dtype=jnp.float32):
        del key
        m = jnp.broadcast_to(jnp.arange(shape[-1], dtype=jnp.float32), shape)
        if init == "lin":
            value = jnp.full(shape, math.log(0.5)) if part == "log_neg_real" else math.pi * m
        else:
            value = jnp.log(m + 1.0) if part == "log_neg_real" else jnp.zeros(shape)
        return value.astype(dtype)

    return fn


@register("s4d", S4DConfig)
class S4D(Mixer):
    """S4D block; see the module docstring."""

    config: S4DConfig

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> S4DCache:
        cfg = self.config
        return S4DCache(state=jnp.zeros((batch_size, cfg.d_model, cfg.d_state // 2, 2), jnp.float32))

    @nn.compact
    def __call__(self, x, cache=None, *, segment_ids=None):
        cfg = self.config
        check_decode_inputs(self.registry_name, x, cache, segment_ids, cfg.d_model)
        d, m = cfg.d_model, cfg.d_state // 2
        x = x.astype(cfg.dtype)
        log_dt = self.param("log_dt", _uniform(math.log(cfg.dt_min), math.log(cfg.dt_max)), (d,), cfg.param_dtype)
        a_real = -jnp.exp(self.param("log_neg_a_real", _init_a(cfg.init, "log_neg_real"), (d, m), cfg.param_dtype))
        a_imag = self.param("a_imag", _init_a(cfg.init, "imag"), (d, m), cfg.param_dtype)
        c_parts = self.param("C", nn.initializers.normal(math.sqrt(0.5)), (d, m, 2), cfg.param_dtype)
        c = c_parts[..., 0].astype(jnp.float32) + 1j * c_parts[..., 1].astype(jnp.float32)
        d_skip = self.param("D", nn.initializers.normal(1.0), (d,), cfg.param_dtype)
        lam, b = discretize(log_dt, a_real, a_imag)
        if cache is None and segment_ids is None and cfg.mode == "fft":
            y = fft_causal_conv(x, ssm_kernel(lam, b, c, x.shape[1]))
        else:
            h0 = None if cache is None else cache.state[..., 0] + 1j * cache.state[..., 1]
            y, h = diagonal_ssm_scan(x, lam, b, c, initial_state=h0, segment_ids=segment_ids,
                                     implementation=cfg.implementation)
            if cache is not None:
                cache = S4DCache(state=jnp.stack([h.real, h.imag], axis=-1))
        y = jax.nn.gelu(y + x.astype(jnp.float32) * d_skip.astype(jnp.float32)).astype(cfg.dtype)
        return nn.glu(self.proj(2 * d, "out_proj", use_bias=True)(y), axis=-1), cache
