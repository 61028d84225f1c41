"""The Griffin / Hawk recurrent block with the RG-LRU (De et al. 2024, "Griffin").

Recurrent block (paper Fig. 2): two linear branches of width ``lru_width``;
one is ``gelu(W_y x)``, the other passes a causal depthwise conv and the
Real-Gated Linear Recurrent Unit; their product is projected back to ``D``.

RG-LRU (paper eqs. 1-4), per channel, with ``Λ`` learned::

    r_t = sigmoid(W_a x_t + b_a)              recurrence gate
    i_t = sigmoid(W_x x_t + b_x)              input gate
    a_t = a^(c r_t),  a = sigmoid(Λ),  c = 8   so log a_t = -c r_t softplus(-Λ)
    h_t = a_t ⊙ h_{t-1} + sqrt(1 - a_t^2) ⊙ (i_t ⊙ x_t)

``h`` is ``ops.linear_scan`` with decays ``a_t`` and inputs
``sqrt(1 - a_t^2) i_t x_t``. Here ``Λ`` is stored as ``decay_param = -Λ``
(``log a = -softplus(decay_param)``). The normalisation applies at every step,
the first included, as in the paper's equation (the recurrentgemma release
skips it at position 0). The gates are dense ``self.proj`` maps (the release
uses block-diagonal ones).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from effarch import ops
from effarch.layers.conv import ShortConv, init_conv_state
from effarch.mixers.base import Mixer, MixerConfig, check_decode_inputs, register
from effarch.ops.linear_scan import SUPPORTED as _LINEAR_SCAN_SUPPORTED

# The derivative of sqrt(1 - a^2) is unbounded as a -> 1; it is clipped here
# (as in recurrentgemma's SqrtBoundDerivative).
MAX_SQRT_GRADIENT = 1000.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class RGLRUConfig(MixerConfig):
    """Griffin recurrent block options.

    Attributes:
      lru_width: width of the recurrence and both branches (None: ``d_model``,
        as in recurrentgemma).
      conv_kernel: taps of the causal conv before the RG-LRU.
      c: the fixed exponent ``c`` of ``a_t = a^(c r_t)`` (8 in the paper).
      decay_init_range: ``(low, high)``; ``a^c`` is initialised uniformly in it.
    """

    IMPLEMENTATIONS: ClassVar[tuple[str, ...]] = tuple(i for i in _LINEAR_SCAN_SUPPORTED if i != "auto")
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"tiny": {"conv_kernel": 4}}

    lru_width: int | None = None
    conv_kernel: int = 4
    c: float = 8.0
    decay_init_range: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self):
        super().__post_init__()
        if self.lru_width is not None and self.lru_width < 1:
            raise ValueError(f"rglru: lru_width={self.lru_width}; expected a positive int or None.")
        if self.conv_kernel < 1:
            raise ValueError(f"rglru: conv_kernel={self.conv_kernel}; expected >= 1.")
        if self.c <= 0:
            raise ValueError(f"rglru: c={self.c}; expected > 0.")
        low, high = self.decay_init_range
        if not 0.0 < low <= high < 1.0:
            raise ValueError(f"rglru: decay_init_range={self.decay_init_range}; expected 0 < low <= high < 1.")

    @property
    def width(self) -> int:
        """The recurrence width ``lru_width`` (``d_model`` when None)."""
        return self.d_model if self.lru_width is None else self.lru_width


class RGLRUCache(NamedTuple):
    """Decode cache of the recurrent block.

    Attributes:
      conv: ``[B,W-1,lru_width]`` last inputs of the conv.
      h: ``[B,lru_width]`` float32 RG-LRU state.
    """

    conv: jax.Array
    h: jax.Array


@jax.custom_jvp
def sqrt_bounded_derivative(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` whose derivative is clipped at ``MAX_SQRT_GRADIENT``."""
    return jnp.sqrt(x)


@sqrt_bounded_derivative.defjvp
def _sqrt_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    floor = 1.0 / (4.0 * MAX_SQRT_GRADIENT**2)  # 1 / (2 sqrt(floor)) == MAX_SQRT_GRADIENT
    return jnp.sqrt(x), dx / (2.0 * jnp.sqrt(jnp.maximum(x, floor)))


def rg_lru_log_decay(gate_a: jax.Array, decay_param: jax.Array, c: float) -> jax.Array:
    """``log a_t = -c sigmoid(gate_a) softplus(decay_param)``, float32 and ``< 0``.

    Args:
      gate_a: ``[B,T,W]`` recurrence-gate pre-activations.
      decay_param: ``[W]``, ``-Λ`` of the paper.
      c: the fixed exponent.
    """
    r = jax.nn.sigmoid(gate_a.astype(jnp.float32))
    return -c * r * jax.nn.softplus(decay_param.astype(jnp.float32))


def rg_lru(
    x: jax.Array,
    gate_a: jax.Array,
    gate_x: jax.Array,
    decay_param: jax.Array,
    *,
    c: float = 8.0,
    state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    implementation: str = "auto",
) -> tuple[jax.Array, jax.Array | None]:
    """The RG-LRU over a sequence: ``h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t x_t)``.

    Args:
      x: ``[B,T,W]`` inputs.
      gate_a: ``[B,T,W]`` recurrence-gate pre-activations (``r = sigmoid``).
      gate_x: ``[B,T,W]`` input-gate pre-activations (``i = sigmoid``).
      decay_param: ``[W]`` (``log a = -softplus(decay_param)``).
      c: the fixed exponent of ``a_t = a^(c r_t)``.
      state: ``[B,W]`` float32 state before step 0, or None for zeros.
      segment_ids: optional ``[B,T]`` int; the state restarts at a segment start.
      implementation: passed to ``ops.linear_scan``.

    Returns:
      ``h [B,T,W]`` in ``x.dtype`` and the final state (None when ``state`` was None).
    """
    log_a = rg_lru_log_decay(gate_a, decay_param, c)  # [B,T,W]
    normalizer = sqrt_bounded_derivative(-jnp.expm1(2.0 * log_a))  # sqrt(1 - a^2)
    inputs = normalizer * jax.nn.sigmoid(gate_x.astype(jnp.float32)) * x.astype(jnp.float32)
    return ops.linear_scan(
        inputs.astype(x.dtype), jnp.exp(log_a), initial_state=state,
        return_final_state=state is not None, segment_ids=segment_ids, implementation=implementation,
    )


@register("rglru", RGLRUConfig)
class RGLRU(Mixer):
    """Griffin's recurrent block: ``x [B,T,D] -> y [B,T,D]``; cache :class:`RGLRUCache`."""

    config: RGLRUConfig

    @nn.compact
    def __call__(self, x, cache: RGLRUCache | None = None, *, segment_ids=None):
        cfg = self.config
        check_decode_inputs("rglru", x, cache, segment_ids, cfg.d_model)
        width = cfg.width
        x = x.astype(cfg.dtype)
        gate = jax.nn.gelu(self.proj(width, "gate_proj", use_bias=True)(x))
        xb = self.proj(width, "in_proj", use_bias=True)(x)
        xb, conv_state = ShortConv(
            kernel_size=cfg.conv_kernel, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="conv",
        )(xb, None if cache is None else cache.conv, segment_ids=segment_ids)
        gate_a = self.proj(width, "recurrence_gate", use_bias=True)(xb)
        gate_x = self.proj(width, "input_gate", use_bias=True)(xb)
        decay_param = self.param("decay_param", decay_param_init(cfg.c, cfg.decay_init_range), (width,),
                                 cfg.param_dtype)
        h, h_last = rg_lru(
            xb, gate_a, gate_x, decay_param, c=cfg.c, state=None if cache is None else cache.h,
            segment_ids=segment_ids, implementation=cfg.implementation,
        )
        y = self.proj(cfg.d_model, "out_proj", use_bias=True)(h.astype(cfg.dtype) * gate)
        if cache is None:
            return y, None
        return y, RGLRUCache(conv=conv_state, h=h_last)

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> RGLRUCache:
        """An empty cache; its size does not depend on ``max_len``."""
        cfg = self.config
        return RGLRUCache(
            conv=init_conv_state(batch_size, cfg.conv_kernel, cfg.width, dtype),
            h=jnp.zeros((batch_size, cfg.width), jnp.float32),
        )


def decay_param_init(c: float, init_range: tuple[float, float]):
    """``decay_param`` with ``a^c = exp(-c softplus(decay_param))`` uniform in ``init_range``."""

    def init(key, shape, dtype=jnp.float32):
        low, high = init_range
        a_c = jax.random.uniform(key, shape, jnp.float32, low, high)
        softplus_value = -jnp.log(a_c) / c
        return jnp.log(jnp.expm1(softplus_value)).astype(dtype)  # inverse softplus

    return init
