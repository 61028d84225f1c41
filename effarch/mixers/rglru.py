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
(``log a = -softplus(decay_param)``). Three details follow the recurrentgemma
release (and transformers' ``RecurrentGemmaRecurrentBlock``) rather than the
paper's text:

- the first token of a sequence (position 0, and each packed-segment start)
  enters without the ``sqrt(1 - a^2)`` factor: ``h_0 = i_0 ⊙ x_0``;
- the gates ``W_a``, ``W_x`` are block-diagonal, one ``[W/H, W/H]`` block per
  head (``gates="dense"``: one full matrix each);
- ``a`` is initialised with ``a^2`` uniform in ``[0.9^2, 0.999^2]``
  (``rnn_param_init``).
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
from effarch.op_contract import segment_starts
from effarch.ops.linear_scan import IMPLEMENTATIONS as _LINEAR_SCAN_IMPLEMENTATIONS

# The derivative of sqrt(1 - a^2) is unbounded as a -> 1; it is clipped here
# (as in recurrentgemma's SqrtBoundDerivative).
MAX_SQRT_GRADIENT = 1000.0
# How the recurrence and input gates map the conv output: one block per head
# (the recurrentgemma release) or one full matrix.
GATE_KINDS = ("block_diagonal", "dense")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RGLRUConfig(MixerConfig):
    """Griffin recurrent block options.

    Attributes:
      lru_width: width of the recurrence and both branches (None: ``d_model``,
        as in recurrentgemma).
      num_heads: blocks H of the block-diagonal gates (recurrentgemma: one per
        attention head, 10 in the 2B model); must divide ``lru_width``.
      gates: ``"block_diagonal"`` (the release) or ``"dense"``.
      conv_kernel: taps of the causal conv before the RG-LRU.
      c: the fixed exponent ``c`` of ``a_t = a^(c r_t)`` (8 in the paper).
      decay_init_range: ``(low, high)``; ``a = sigmoid(Λ)`` is initialised with
        ``a^2`` uniform in ``[low^2, high^2]`` (recurrentgemma's ``rnn_param_init``).
    """

    IMPLEMENTATIONS: ClassVar[tuple[str, ...]] = tuple(i for i in _LINEAR_SCAN_IMPLEMENTATIONS if i != "auto")
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"conv_kernel": 4},
        "paper": {"num_heads": 10, "conv_kernel": 4},  # recurrentgemma-2b (d_model = lru_width = 2560)
    }

    lru_width: int | None = None
    num_heads: int = 4
    gates: str = "block_diagonal"
    conv_kernel: int = 4
    c: float = 8.0
    decay_init_range: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self):
        super().__post_init__()
        if self.lru_width is not None and self.lru_width < 1:
            raise ValueError(f"rglru: lru_width={self.lru_width}; expected a positive int or None.")
        if self.gates not in GATE_KINDS:
            raise ValueError(f"rglru: gates={self.gates!r}; expected one of {GATE_KINDS}.")
        if self.gates == "block_diagonal" and (self.num_heads < 1 or self.width % self.num_heads):
            raise ValueError(f"rglru: num_heads={self.num_heads} must divide lru_width={self.width} "
                             "for block-diagonal gates (or pass gates='dense').")
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
      position: ``[]`` int32, tokens seen so far (the first one skips the normalisation).
    """

    conv: jax.Array
    h: jax.Array
    position: jax.Array


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
    position: int | jax.Array = 0,
    segment_ids: jax.Array | None = None,
    implementation: str = "auto",
) -> tuple[jax.Array, jax.Array | None]:
    """The RG-LRU over a sequence: ``h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t x_t)``.

    The first token of a sequence has no ``sqrt(1 - a^2)`` factor (the
    recurrentgemma release): step 0 when ``position`` is 0, and each segment start.

    Args:
      x: ``[B,T,W]`` inputs.
      gate_a: ``[B,T,W]`` recurrence-gate pre-activations (``r = sigmoid``).
      gate_x: ``[B,T,W]`` input-gate pre-activations (``i = sigmoid``).
      decay_param: ``[W]`` (``log a = -softplus(decay_param)``).
      c: the fixed exponent of ``a_t = a^(c r_t)``.
      state: ``[B,W]`` float32 state before step 0, or None for zeros.
      position: ``[]`` int, tokens of the sequence before step 0 (0: step 0
        starts it, and ``state`` is the empty one).
      segment_ids: optional ``[B,T]`` int; the state restarts at a segment start.
      implementation: passed to ``ops.linear_scan``.

    Returns:
      ``h [B,T,W]`` in ``x.dtype`` and the final state (None when ``state`` was None).
    """
    b, t, _ = x.shape
    log_a = rg_lru_log_decay(gate_a, decay_param, c)  # [B,T,W]
    first = segment_starts(segment_ids, b, t).at[:, 0].set(jnp.asarray(position) == 0)  # [B,T]
    normalizer = jnp.where(first[..., None], 1.0, sqrt_bounded_derivative(-jnp.expm1(2.0 * log_a)))
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
        check_decode_inputs(self.registry_name, x, cache, segment_ids, cfg.d_model)
        width = cfg.width
        x = x.astype(cfg.dtype)
        gate = jax.nn.gelu(self.proj(width, "gate_proj", use_bias=True)(x))
        xb = self.proj(width, "in_proj", use_bias=True)(x)
        xb, conv_state = ShortConv(
            kernel_size=cfg.conv_kernel, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="conv",
        )(xb, None if cache is None else cache.conv, segment_ids=segment_ids)
        gate_a = self._gate("recurrence_gate", xb)
        gate_x = self._gate("input_gate", xb)
        decay_param = self.param("decay_param", decay_param_init(cfg.decay_init_range), (width,), cfg.param_dtype)
        h, h_last = rg_lru(
            xb, gate_a, gate_x, decay_param, c=cfg.c, state=None if cache is None else cache.h,
            position=0 if cache is None else cache.position, segment_ids=segment_ids,
            implementation=cfg.implementation,
        )
        y = self.proj(cfg.d_model, "out_proj", use_bias=True)(h.astype(cfg.dtype) * gate)
        if cache is None:
            return y, None
        return y, RGLRUCache(conv=conv_state, h=h_last, position=cache.position + x.shape[1])

    def _gate(self, name: str, x: jax.Array) -> jax.Array:
        """A gate's pre-activations ``[B,T,W]``: block-diagonal (one block per head) or dense."""
        cfg = self.config
        if cfg.gates == "dense":
            return self.proj(cfg.width, name, use_bias=True)(x)
        return BlockDiagonalLinear(num_blocks=cfg.num_heads, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                   name=name)(x)

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> RGLRUCache:
        """An empty cache; its size does not depend on ``max_len``."""
        cfg = self.config
        return RGLRUCache(
            conv=init_conv_state(batch_size, cfg.conv_kernel, cfg.width, dtype),
            h=jnp.zeros((batch_size, cfg.width), jnp.float32),
            position=jnp.zeros((), jnp.int32),
        )


class BlockDiagonalLinear(nn.Module):
    """``y[..., h, :] = x[..., h, :] W[h] + b[h]``: a linear map with one dense block per head.

    recurrentgemma's ``BlockDiagonalLinear`` (the RG-LRU gates) and xLSTM's
    ``LinearHeadwiseExpand`` (the mLSTM's q, k, v). ``W [H, W/H, W/H]`` is
    initialised ``N(0, 1 / (W/H))`` unless ``kernel_init`` is given, ``b [H, W/H]``
    at zero. It is always a full-precision map (the ``projection`` option covers
    a mixer's dense projections only).

    Attributes:
      num_blocks: H, must divide the input width.
      use_bias: learn ``b``.
      kernel_init: initialiser of ``W`` (None: ``N(0, 1 / (W/H))``).
      dtype: compute dtype.
      param_dtype: dtype of ``W`` and ``b``.
    """

    num_blocks: int
    use_bias: bool = True
    kernel_init: Any = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [..., W] -> [..., W]``."""
        h, width = self.num_blocks, x.shape[-1]
        if width % h:
            raise ValueError(f"BlockDiagonalLinear: num_blocks={h} must divide the width {width}.")
        block = width // h
        init = nn.initializers.normal(block**-0.5) if self.kernel_init is None else self.kernel_init
        kernel = self.param("kernel", init, (h, block, block), self.param_dtype)
        xh = x.astype(self.dtype).reshape(*x.shape[:-1], h, block)  # [..., H, W/H]
        y = jnp.einsum("...hi,hio->...ho", xh, kernel.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (h, block), self.param_dtype).astype(self.dtype)
        return y.reshape(x.shape)


def decay_param_init(init_range: tuple[float, float]):
    """``decay_param`` with ``a = exp(-softplus(decay_param))``, ``a^2`` uniform in ``[low^2, high^2]``.

    recurrentgemma's ``rnn_param_init``: ``a`` is distributed as the radius of a
    point uniform on the ring ``low < |z| < high`` of the complex plane.
    """

    def init(key, shape, dtype=jnp.float32):
        low, high = init_range
        a_squared = jax.random.uniform(key, shape, jnp.float32, low**2, high**2)
        softplus_value = -0.5 * jnp.log(a_squared)  # -log a
        return jnp.log(jnp.expm1(softplus_value)).astype(dtype)  # inverse softplus

    return init
