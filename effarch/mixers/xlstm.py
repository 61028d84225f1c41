"""mLSTM, the matrix-memory cell of xLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory").

Per head, with matrix memory ``C_t [K,V]``, normaliser ``n_t [K]`` and the
exponential input gate ``i_t = exp(ĩ_t)``, forget gate ``f_t = sigmoid(f̃_t)``
(paper section 2.3)::

    C_t = f_t C_{t-1} + i_t k_t v_t^T
    n_t = f_t n_{t-1} + i_t k_t
    h_t = o_t ⊙ (C_t^T q_t) / max(|n_t^T q_t|, 1)

``exp(ĩ_t)`` overflows quickly, so the cell carries a stabiliser
``m_t = max(log f_t + m_{t-1}, ĩ_t)`` and the scaled states ``C̃_t = C_t e^{-m_t}``,
``ñ_t = n_t e^{-m_t}``::

    C̃_t = exp(log f_t + m_{t-1} - m_t) C̃_{t-1} + exp(ĩ_t - m_t) k_t v_t^T
    h_t = o_t ⊙ (C̃_t^T q_t) / (max(|ñ_t^T q_t|, exp(-m_t)) + eps)

Both exponents are ``<= 0``, so the stabilised cell is one call of
``ops.linear_attention`` with ``log_decay = log f + m_{t-1} - m_t`` and keys
scaled by ``exp(ĩ - m)``; appending a column of ones to ``v`` makes the same
call produce ``ñ_t^T q_t``. The result does not depend on ``m`` (it cancels),
so ``m`` is held constant under differentiation; only the small ``eps`` of
the NX-AI release (1e-6, added in the stabilised frame) sees it.

The layer is the paper's mLSTM block (pre-norm left to the model), as NX-AI's
``xlstm`` package builds it (``mLSTMLayer``): up-projection to two branches of
width ``proj_factor * D`` rounded up to a multiple of 64; causal conv + SiLU
feeding ``q`` and ``k``; ``v`` from the un-convolved branch, each of ``q, k, v``
a block-diagonal map with blocks of 4 channels (``qkv_blocksize=None``: dense);
gates from ``[q, k, v]``; per-head LayerNorm; a learnable skip from the conv
branch; the output gate ``o = silu(z)`` from the second branch; down-projection.
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
from effarch.layers.norms import HeadNorm
from effarch.mixers._recurrence import LINEAR_ATTENTION_IMPLEMENTATIONS, merge_heads, split_heads
from effarch.mixers.base import Mixer, MixerConfig, check_decode_inputs, register
from effarch.mixers.rglru import BlockDiagonalLinear
from effarch.op_contract import segment_starts

# Initial value of the stabiliser m for an empty state (and at a segment start).
M_INIT = 0.0
# Forget-gate bias initialisation range (xLSTM: linspace(3, 6) over heads).
FORGET_BIAS_RANGE = (3.0, 6.0)
# Input-gate bias initialisation std (xLSTM: normal(0, 0.1)).
INPUT_BIAS_STD = 0.1
# Smallest denominator, guarding 0/0 when exp(-m) underflows (m > 87).
DENOMINATOR_FLOOR = float(jnp.finfo(jnp.float32).tiny)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLSTMConfig(MixerConfig):
    """mLSTM block options (defaults: NX-AI's ``mLSTMLayerConfig``).

    Attributes:
      num_heads: heads H; the inner width splits into H heads of size
        ``K = V = inner / H``.
      proj_factor: width of each up-projected branch relative to ``d_model``.
      inner_multiple: the inner width is ``proj_factor * d_model`` rounded up
        to a multiple of this (xLSTM: 64).
      qkv_blocksize: width of the diagonal blocks of the q, k, v maps (xLSTM's
        ``qkv_proj_blocksize``: 4); None: dense maps.
      conv_kernel: taps of the causal convolution feeding ``q`` and ``k``.
      norm_eps: epsilon of the per-head LayerNorm (xLSTM: 1e-5).
      normalizer_eps: added to the cell's denominator
        ``max(|ñ^T q|, exp(-m))`` (xLSTM: 1e-6).
      chunk_size: chunk length of the chunked ``linear_attention``.
    """

    IMPLEMENTATIONS: ClassVar[tuple[str, ...]] = LINEAR_ATTENTION_IMPLEMENTATIONS
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"num_heads": 2, "proj_factor": 2.0, "conv_kernel": 4, "chunk_size": 8},
        # xLSTM[1:0] (Beck et al. 2024, sec. 4): the mLSTM block of the language models.
        "paper": {"num_heads": 4, "proj_factor": 2.0, "qkv_blocksize": 4, "conv_kernel": 4},
    }

    num_heads: int = 4
    proj_factor: float = 2.0
    inner_multiple: int = 64
    qkv_blocksize: int | None = 4
    conv_kernel: int = 4
    norm_eps: float = 1e-5
    normalizer_eps: float = 1e-6
    chunk_size: int = 64

    def __post_init__(self):
        super().__post_init__()
        if self.proj_factor <= 0 or self.inner_multiple < 1:
            raise ValueError(f"mlstm: proj_factor={self.proj_factor}, inner_multiple={self.inner_multiple}; "
                             "expected proj_factor > 0 and inner_multiple >= 1.")
        inner = self.inner_dim
        if self.num_heads < 1 or inner % self.num_heads:
            raise ValueError(
                f"mlstm: num_heads={self.num_heads} must be positive and divide the inner width "
                f"{inner} (proj_factor * d_model = {self.proj_factor} * {self.d_model} rounded up to a "
                f"multiple of inner_multiple={self.inner_multiple})."
            )
        if self.qkv_blocksize is not None and (self.qkv_blocksize < 1 or inner % self.qkv_blocksize):
            raise ValueError(f"mlstm: qkv_blocksize={self.qkv_blocksize} must be positive and divide the inner "
                             f"width {inner} (or None for dense q, k, v maps).")
        if self.conv_kernel < 1:
            raise ValueError(f"mlstm: conv_kernel={self.conv_kernel}; expected >= 1.")
        if self.norm_eps <= 0 or self.normalizer_eps < 0:
            raise ValueError(f"mlstm: norm_eps={self.norm_eps}, normalizer_eps={self.normalizer_eps}; "
                             "expected norm_eps > 0 and normalizer_eps >= 0.")
        if self.chunk_size < 1:
            raise ValueError(f"mlstm: chunk_size={self.chunk_size}; expected >= 1.")

    @property
    def inner_dim(self) -> int:
        """Width of each up-projected branch: ``proj_factor * d_model`` rounded up to ``inner_multiple``."""
        return math.ceil(self.proj_factor * self.d_model / self.inner_multiple) * self.inner_multiple

    @property
    def head_dim(self) -> int:
        return self.inner_dim // self.num_heads


class MLSTMState(NamedTuple):
    """The cell's recurrent state (float32).

    Attributes:
      C: ``[B,H,K,V]`` stabilised matrix memory ``C̃``.
      n: ``[B,H,K]`` stabilised normaliser ``ñ``.
      m: ``[B,H]`` stabiliser.
    """

    C: jax.Array
    n: jax.Array
    m: jax.Array


class MLSTMCache(NamedTuple):
    """Decode cache of the mLSTM block.

    Attributes:
      conv: ``[B,W-1,inner]`` last inputs of the causal convolution.
      cell: the cell state.
    """

    conv: jax.Array
    cell: MLSTMState


def empty_state(batch_size: int, num_heads: int, key_dim: int, value_dim: int) -> MLSTMState:
    """An empty cell state: zero memory and normaliser, ``m = M_INIT``."""
    return MLSTMState(
        C=jnp.zeros((batch_size, num_heads, key_dim, value_dim), jnp.float32),
        n=jnp.zeros((batch_size, num_heads, key_dim), jnp.float32),
        m=jnp.full((batch_size, num_heads), M_INIT, jnp.float32),
    )


def stabilizer(log_f: jax.Array, i_pre: jax.Array, m0: jax.Array, segment_ids=None) -> jax.Array:
    """``m_t = max(log f_t + m_{t-1}, ĩ_t)`` for every step, by an associative scan.

    Steps compose in the max-plus semiring: ``m -> max(m + a, b)`` after
    ``m -> max(m + a', b')`` is ``m -> max(m + a' + a, max(b' + a, b))``. A
    segment start restarts from ``m = M_INIT``.

    Args:
      log_f: ``[B,T,H]`` log forget gates.
      i_pre: ``[B,T,H]`` input-gate pre-activations ĩ.
      m0: ``[B,H]`` stabiliser before step 0.
      segment_ids: optional ``[B,T]`` int ids of packed sequences.

    Returns:
      ``m [B,T,H]`` float32.
    """
    b, t, _ = log_f.shape
    start = segment_starts(segment_ids, b, t)[..., None]  # [B,T,1]
    add = jnp.where(start, -jnp.inf, log_f)
    floor = jnp.where(start, jnp.maximum(log_f + M_INIT, i_pre), i_pre)

    def combine(left, right):
        a_l, b_l = left
        a_r, b_r = right
        return a_l + a_r, jnp.maximum(b_l + a_r, b_r)

    total, best = jax.lax.associative_scan(combine, (add, floor), axis=1)
    return jnp.maximum(total + m0[:, None], best)


def mlstm_cell(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    i_pre: jax.Array,
    f_pre: jax.Array,
    *,
    state: MLSTMState | None = None,
    segment_ids: jax.Array | None = None,
    eps: float = 0.0,
    chunk_size: int = 64,
    implementation: str = "auto",
) -> tuple[jax.Array, MLSTMState | None]:
    """The max-stabilised mLSTM cell over a sequence, before the output gate.

    Args:
      q, k: ``[B,T,H,K]`` queries and keys (``q.k`` is scaled by ``K**-0.5``).
      v: ``[B,T,H,V]`` values.
      i_pre: ``[B,T,H]`` input-gate pre-activations (``i = exp(i_pre)``).
      f_pre: ``[B,T,H]`` forget-gate pre-activations (``f = sigmoid(f_pre)``).
      state: the state before step 0, or None for an empty one.
      segment_ids: optional ``[B,T]`` int ids of packed sequences.
      eps: added to the stabilised denominator ``max(|ñ^T q|, exp(-m))``
        (0: the paper's cell exactly; the NX-AI release adds 1e-6).
      chunk_size, implementation: passed to ``ops.linear_attention``.

    Returns:
      ``h [B,T,H,V]`` float32 (``(C^T q) / max(|n^T q|, 1)`` per head when
      ``eps = 0``) and the state after the last step (None when ``state`` was None).
    """
    b, t, h, kd = q.shape
    vd = v.shape[-1]
    start_state = empty_state(b, h, kd, vd) if state is None else state
    log_f = jax.nn.log_sigmoid(f_pre.astype(jnp.float32))  # [B,T,H]
    i_pre = i_pre.astype(jnp.float32)
    frozen = jax.lax.stop_gradient
    m = stabilizer(frozen(log_f), frozen(i_pre), frozen(start_state.m), segment_ids)  # [B,T,H]
    m_prev = jnp.concatenate([start_state.m[:, None], m[:, :-1]], axis=1)
    m_prev = jnp.where(segment_starts(segment_ids, b, t)[..., None], M_INIT, m_prev)
    log_decay = log_f + m_prev - m  # <= 0
    k_scaled = k * jnp.exp(i_pre - m)[..., None].astype(k.dtype)  # exp(ĩ - m) <= 1
    ones = jnp.ones((b, t, h, 1), v.dtype)
    initial = jnp.concatenate([start_state.C, start_state.n[..., None]], axis=-1)  # [B,H,K,V+1]
    out, final = ops.linear_attention(
        q, k_scaled, jnp.concatenate([v, ones], axis=-1), log_decay,
        scale=kd**-0.5, initial_state=initial, return_final_state=state is not None,
        segment_ids=segment_ids, chunk_size=chunk_size, implementation=implementation,
    )
    out = out.astype(jnp.float32)
    numerator, normalizer = out[..., :vd], out[..., vd]  # C̃^T q [B,T,H,V], ñ^T q [B,T,H]
    denominator = jnp.maximum(jnp.maximum(jnp.abs(normalizer), jnp.exp(-m)), DENOMINATOR_FLOOR) + eps
    hidden = numerator / denominator[..., None]
    if state is None:
        return hidden, None
    return hidden, MLSTMState(C=final[..., :vd], n=final[..., vd], m=m[:, -1])


@register("mlstm", MLSTMConfig)
class MLSTM(Mixer):
    """The xLSTM mLSTM block: ``x [B,T,D] -> y [B,T,D]``.

    The cache (:class:`MLSTMCache`) holds the conv inputs and the cell state
    ``(C̃, ñ, m)``.
    """

    config: MLSTMConfig

    @nn.compact
    def __call__(self, x, cache: MLSTMCache | None = None, *, segment_ids=None):
        cfg = self.config
        check_decode_inputs(self.registry_name, x, cache, segment_ids, cfg.d_model)
        inner, heads = cfg.inner_dim, cfg.num_heads
        x = x.astype(cfg.dtype)
        up = self.proj(2 * inner, "up_proj")(x)
        x_m, z = jnp.split(up, 2, axis=-1)  # [B,T,inner] each
        x_c, conv_state = ShortConv(
            kernel_size=cfg.conv_kernel, activation="silu", dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, name="conv",
        )(x_m, None if cache is None else cache.conv, segment_ids=segment_ids)
        q = self._qkv_map("q_proj", x_c)
        k = self._qkv_map("k_proj", x_c)
        v = self._qkv_map("v_proj", x_m)
        qkv = jnp.concatenate([q, k, v], axis=-1)  # [B,T,3 inner]
        zeros = nn.initializers.zeros
        i_pre = self.proj(heads, "igate", kernel_init=zeros)(qkv).astype(jnp.float32)
        f_pre = self.proj(heads, "fgate", kernel_init=zeros)(qkv).astype(jnp.float32)
        i_bias = self.param("igate_bias", nn.initializers.normal(INPUT_BIAS_STD), (heads,), cfg.param_dtype)
        f_bias = self.param("fgate_bias", _linspace_init(*FORGET_BIAS_RANGE), (heads,), cfg.param_dtype)
        hidden, cell = mlstm_cell(
            split_heads(q, heads), split_heads(k, heads), split_heads(v, heads),
            i_pre + i_bias.astype(jnp.float32), f_pre + f_bias.astype(jnp.float32),
            state=None if cache is None else cache.cell, segment_ids=segment_ids, eps=cfg.normalizer_eps,
            chunk_size=cfg.chunk_size, implementation=cfg.implementation,
        )
        hidden = HeadNorm(kind="layer", eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                          name="norm")(hidden)
        skip = self.param("skip", nn.initializers.ones, (inner,), cfg.param_dtype)
        hidden = merge_heads(hidden) + skip.astype(cfg.dtype) * x_c
        y = self.proj(cfg.d_model, "down_proj")(hidden * jax.nn.silu(z))
        if cache is None:
            return y, None
        return y, MLSTMCache(conv=conv_state, cell=cell)

    def _qkv_map(self, name: str, x: jax.Array) -> jax.Array:
        """One of the q, k, v maps ``[B,T,inner] -> [B,T,inner]``: block-diagonal (xLSTM) or dense."""
        cfg = self.config
        if cfg.qkv_blocksize is None:
            return self.proj(cfg.inner_dim, name)(x)
        # xLSTM's small init (Nguyen & Salazar 2019) over the model width: N(0, 2 / (5 D)).
        small_init = nn.initializers.normal((2.0 / (5.0 * cfg.d_model)) ** 0.5)
        return BlockDiagonalLinear(num_blocks=cfg.inner_dim // cfg.qkv_blocksize, use_bias=False,
                                   kernel_init=small_init, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                   name=name)(x)

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> MLSTMCache:
        """An empty cache; its size does not depend on ``max_len``."""
        cfg = self.config
        return MLSTMCache(
            conv=init_conv_state(batch_size, cfg.conv_kernel, cfg.inner_dim, dtype),
            cell=empty_state(batch_size, cfg.num_heads, cfg.head_dim, cfg.head_dim),
        )


def _linspace_init(low: float, high: float):
    """Initialiser filling a 1-D parameter with ``linspace(low, high)``."""

    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.linspace(low, high, shape[0], dtype=dtype)

    return init


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLSTM7BConfig(MixerConfig):
    """The xLSTM-7B mLSTM layer's options (defaults: transformers' ``xLSTMConfig``).

    Attributes:
      num_heads: heads H.
      qk_dim_factor: query/key width relative to ``d_model`` (0.5), split over the heads.
      v_dim_factor: value width relative to ``d_model`` (1.0), split over the heads.
      gate_soft_cap: the input and forget gate pre-activations are soft-capped
        to ``c * tanh(x / c)`` (15).
      norm_eps: epsilon of the per-head LayerNorm (1e-6).
      normalizer_eps: added to the cell's denominator (1e-6).
      use_bias: biases on the q, k, v, output-gate and output projections and the norm.
      chunk_size: chunk length of the chunked ``linear_attention``.
    """

    IMPLEMENTATIONS: ClassVar[tuple[str, ...]] = LINEAR_ATTENTION_IMPLEMENTATIONS
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"num_heads": 2, "chunk_size": 8},
        # xLSTM-7B (Beck et al. 2025): d_model 4096, 8 heads.
        "paper": {"num_heads": 8},
    }

    num_heads: int = 8
    qk_dim_factor: float = 0.5
    v_dim_factor: float = 1.0
    gate_soft_cap: float | None = 15.0
    norm_eps: float = 1e-6
    normalizer_eps: float = 1e-6
    use_bias: bool = False
    chunk_size: int = 64

    def __post_init__(self):
        super().__post_init__()
        for name in ("qk_dim", "v_dim"):
            width = getattr(self, name)
            if self.num_heads < 1 or width < self.num_heads or width % self.num_heads:
                raise ValueError(
                    f"mlstm7b: num_heads={self.num_heads} must be positive and divide the {name} {width} "
                    f"(d_model={self.d_model} * {name}_factor)."
                )
        if self.gate_soft_cap is not None and self.gate_soft_cap <= 0:
            raise ValueError(f"mlstm7b: gate_soft_cap={self.gate_soft_cap}; expected None or > 0.")
        if self.norm_eps <= 0 or self.normalizer_eps < 0 or self.chunk_size < 1:
            raise ValueError(f"mlstm7b: norm_eps={self.norm_eps}, normalizer_eps={self.normalizer_eps}, "
                             f"chunk_size={self.chunk_size}; expected > 0, >= 0 and >= 1.")

    @property
    def qk_dim(self) -> int:
        return int(self.d_model * self.qk_dim_factor)

    @property
    def v_dim(self) -> int:
        return int(self.d_model * self.v_dim_factor)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)`` (None: ``x``)."""
    return x if cap is None else cap * jnp.tanh(x / cap)


@register("mlstm7b", MLSTM7BConfig)
class MLSTM7B(Mixer):
    """The xLSTM-7B mLSTM layer (transformers' ``xLSTM``): ``x [B,T,D] -> y [B,T,D]``.

    Unlike the paper's block (``mlstm``) there is no up-projection, convolution
    or skip: q, k, v, the output gate and the soft-capped input and forget gates
    come straight from the input, then the same max-stabilised cell
    (:func:`mlstm_cell`), a per-head LayerNorm, ``sigmoid(o) *`` and the output
    projection. The cache is the cell state ``(C̃, ñ, m)``.
    """

    config: MLSTM7BConfig

    @nn.compact
    def __call__(self, x, cache: MLSTMState | None = None, *, segment_ids=None):
        cfg = self.config
        check_decode_inputs(self.registry_name, x, cache, segment_ids, cfg.d_model)
        heads = cfg.num_heads
        x = x.astype(cfg.dtype)
        q = self.proj(cfg.qk_dim, "q", use_bias=cfg.use_bias)(x)
        k = self.proj(cfg.qk_dim, "k", use_bias=cfg.use_bias)(x)
        v = self.proj(cfg.v_dim, "v", use_bias=cfg.use_bias)(x)
        o_pre = self.proj(cfg.v_dim, "ogate", use_bias=cfg.use_bias)(x)
        i_pre = soft_cap(self.proj(heads, "igate", use_bias=True)(x).astype(jnp.float32), cfg.gate_soft_cap)
        f_pre = soft_cap(self.proj(heads, "fgate", use_bias=True)(x).astype(jnp.float32), cfg.gate_soft_cap)
        hidden, cell = mlstm_cell(
            split_heads(q, heads), split_heads(k, heads), split_heads(v, heads), i_pre, f_pre,
            state=cache, segment_ids=segment_ids, eps=cfg.normalizer_eps, chunk_size=cfg.chunk_size,
            implementation=cfg.implementation,
        )
        hidden = HeadNorm(kind="layer", eps=cfg.norm_eps, use_bias=cfg.use_bias, dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype, name="norm")(hidden)
        y = self.proj(cfg.d_model, "out_proj", use_bias=cfg.use_bias)(
            jax.nn.sigmoid(o_pre) * merge_heads(hidden).astype(cfg.dtype))
        return y, (None if cache is None else cell)

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> MLSTMState:
        """An empty cell state; its size does not depend on ``max_len``."""
        cfg = self.config
        return empty_state(batch_size, cfg.num_heads, cfg.qk_dim // cfg.num_heads, cfg.v_dim // cfg.num_heads)
