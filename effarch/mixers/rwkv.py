"""RWKV time mixing: RWKV-6 "Finch" and RWKV-7 "Goose".

RWKV-6 (Peng et al. 2024, "Eagle and Finch: RWKV with Matrix-Valued States and
Dynamic Recurrence"). Per head, with ``w_t = exp(-exp(d_t))`` a
data-dependent decay per key channel and ``u`` the per-channel bonus::

    S_t = diag(w_t) S_{t-1} + k_t v_t^T
    o_t = S_{t-1}^T r_t + (r_t . (u ⊙ k_t)) v_t

The readout uses the state *before* the current token; the current token
enters only through the bonus ``u``. :func:`rwkv6_wkv` computes it with one
``ops.linear_attention`` call on keys, values and decays delayed by one step
(the op's state at step t is then ``S_{t-1}``), plus the bonus term.

RWKV-7 (Peng et al. 2025, "RWKV-7 Goose with Expressive Dynamic State
Evolution"): the generalised delta rule ``S_t = diag(w_t) S_{t-1} -
(a_t ⊙ kappa_t) (kappa_t^T S_{t-1}) + k̃_t v_t^T``, ``o_t = S_t^T r_t``, via
``ops.generalized_delta_rule``, with a per-channel decay ``w_t = exp(-e^{-1/2}
sigmoid(.))``, an in-context learning rate ``a_t``, the normalised removal key
``kappa_t`` and a bonus ``(r_t . (k̃_t ⊙ r_k)) v_t`` after the group norm. With
``value_residual`` (the default of letter ``V`` in ``LMConfig``) the layer takes
part in RWKV-7's value residual: the first RWKV-7 layer of the stack hands its
values on as ``v_first``, and every later one mixes them in,
``v = lerp(v, v_first, sigmoid(v0 + LoRA_v(x_v)))``. The initialisation follows
the current RWKV-7 reference (the layer's depth, ``layer_ratio`` and
``num_layers``, which ``LMConfig`` sets per layer).

Both use token shift: inputs are interpolated with the previous token (zero
before the first token and at a packed-segment start); the decode cache keeps
the last token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from effarch import ops
from effarch.layers.norms import HeadNorm
from effarch.mixers._recurrence import LINEAR_ATTENTION_IMPLEMENTATIONS, merge_heads, split_heads
from effarch.mixers.base import Mixer, MixerConfig, check_decode_inputs, register
from effarch.op_contract import segment_starts

# RWKV's per-head GroupNorm epsilon: 1e-5 * head_size_divisor**2 with divisor 8.
GROUP_NORM_EPS = 64e-5
# Init scale of the LoRA up-projections (RWKV-6: uniform(-0.01, 0.01)).
LORA_INIT_SCALE = 0.01
# RWKV-7 decay: log w = -exp(-1/2) * sigmoid(.), so w lies in (exp(-exp(-1/2)), 1).
RWKV7_MAX_LOG_DECAY = math.exp(-0.5)
# Guards the L2 norm of RWKV-7's removal key (torch.nn.functional.normalize).
L2_EPS = 1e-12
# The five token-shift interpolations of RWKV-6 (ddlerp), in parameter order.
RWKV6_MIXES = ("w", "k", "v", "r", "g")
# The six static token-shift interpolations of RWKV-7, in parameter order.
RWKV7_MIXES = ("r", "w", "k", "v", "a", "g")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RWKVConfig(MixerConfig):
    """Options shared by RWKV-6 and RWKV-7.

    Attributes:
      head_size: K = V per head; ``d_model / head_size`` heads.
      decay_lora: rank of the LoRA producing the data-dependent decay.
      layer_ratio: depth of the layer in the stack, ``l / (L - 1)`` in [0, 1];
        only shapes the initialisation (RWKV initialises by depth).
      chunk_size: chunk length of the chunked op form.
    """

    head_size: int = 64
    decay_lora: int = 64
    layer_ratio: float = 0.5
    chunk_size: int = 64

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if self.head_size < 1 or self.d_model % self.head_size:
            raise ValueError(f"{name}: head_size={self.head_size} must be positive and divide d_model={self.d_model}.")
        if self.decay_lora < 1 or self.chunk_size < 1:
            raise ValueError(f"{name}: decay_lora={self.decay_lora}, chunk_size={self.chunk_size}; expected >= 1.")
        if not 0.0 <= self.layer_ratio <= 1.0:
            raise ValueError(f"{name}: layer_ratio={self.layer_ratio}; expected a depth fraction in [0, 1].")

    @property
    def num_heads(self) -> int:
        return self.d_model // self.head_size


@dataclasses.dataclass(frozen=True, kw_only=True)
class RWKV6Config(RWKVConfig):
    """RWKV-6 options (see :class:`RWKVConfig`).

    Attributes:
      mix_lora: rank of the LoRA of the data-dependent token shift (ddlerp).
    """

    IMPLEMENTATIONS: ClassVar[tuple[str, ...]] = LINEAR_ATTENTION_IMPLEMENTATIONS
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"head_size": 8, "mix_lora": 4, "decay_lora": 8, "chunk_size": 8},
    }

    mix_lora: int = 32

    def __post_init__(self):
        super().__post_init__()
        if self.mix_lora < 1:
            raise ValueError(f"RWKV6Config: mix_lora={self.mix_lora}; expected >= 1.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RWKV7Config(RWKVConfig):
    """RWKV-7 options (see :class:`RWKVConfig`).

    Attributes:
      iclr_lora: rank of the LoRA producing the in-context learning rate a.
      gate_lora: rank of the LoRA producing the output gate.
      value_lora: rank of the LoRA producing the value-residual mix.
      value_residual: take part in the value residual across layers: the call
        takes ``value_residual=(v_first,)`` (``(None,)`` in the stack's first
        RWKV-7 layer, which then has no mixing parameters) and returns
        ``(y, cache, v_first)`` (module docstring); False: a plain mixer.
      num_layers: layers L of the stack, for the depth-dependent init
        (``layer_ratio = l / (L - 1)``); None: ``1 - layer_ratio`` stands for
        the reference's ``1 - l / L``.
    """

    IMPLEMENTATIONS: ClassVar[tuple[str, ...]] = ("recurrent", "chunked")
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"head_size": 8, "decay_lora": 8, "iclr_lora": 8, "gate_lora": 8, "chunk_size": 8},
    }

    iclr_lora: int = 64
    gate_lora: int = 128
    value_lora: int = 32
    value_residual: bool = False
    num_layers: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.iclr_lora < 1 or self.gate_lora < 1 or self.value_lora < 1:
            raise ValueError(f"RWKV7Config: iclr_lora={self.iclr_lora}, gate_lora={self.gate_lora}, "
                             f"value_lora={self.value_lora}; expected >= 1.")
        if self.num_layers is not None and (not isinstance(self.num_layers, int) or self.num_layers < 1):
            raise ValueError(f"RWKV7Config: num_layers={self.num_layers!r}; expected None or a positive int.")

    @property
    def depth_ratios(self) -> tuple[float, float]:
        """The reference init's ``(l / (L - 1), 1 - l / L)`` of this layer."""
        if self.num_layers is None:
            return self.layer_ratio, 1.0 - self.layer_ratio
        index = round(self.layer_ratio * (self.num_layers - 1))
        return self.layer_ratio, 1.0 - index / self.num_layers


class RWKVCache(NamedTuple):
    """Decode cache of an RWKV time-mixing layer.

    Attributes:
      shift: ``[B,D]`` the previous token's input (token shift).
      state: ``[B,H,K,V]`` float32 recurrent state ``S``.
    """

    shift: jax.Array
    state: jax.Array


def token_shift(x: jax.Array, last: jax.Array | None, segment_ids=None) -> jax.Array:
    """The previous token of every step: ``prev[:, t] = x[:, t-1]``.

    Args:
      x: ``[B,T,D]`` inputs.
      last: ``[B,D]`` the token before ``x`` (a decode cache), or None for zeros.
      segment_ids: optional ``[B,T]``; a segment start sees zeros, not the
        previous segment's last token.

    Returns:
      ``[B,T,D]`` in ``x.dtype``.
    """
    b, t, _ = x.shape
    first = jnp.zeros_like(x[:, :1]) if last is None else last[:, None].astype(x.dtype)
    prev = jnp.concatenate([first, x[:, :-1]], axis=1)
    return jnp.where(segment_starts(segment_ids, b, t)[..., None], 0.0, prev).astype(x.dtype)


def rwkv6_wkv(
    r: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_w: jax.Array,
    u: jax.Array,
    *,
    state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int = 64,
    implementation: str = "auto",
) -> tuple[jax.Array, jax.Array | None]:
    """RWKV-6's WKV: ``o_t = S_{t-1}^T r_t + (r_t . (u ⊙ k_t)) v_t``, ``S_t = diag(w_t) S_{t-1} + k_t v_t^T``.

    Args:
      r: receptance ``[B,T,H,K]``.
      k: keys ``[B,T,H,K]``.
      v: values ``[B,T,H,V]``.
      log_w: ``[B,T,H,K]`` log decays (``-exp(.)``, ``<= 0``).
      u: ``[H,K]`` bonus of the current token.
      state: ``[B,H,K,V]`` float32 state before step 0, or None for zeros.
      segment_ids: optional ``[B,T]`` int ids of packed sequences.
      chunk_size, implementation: passed to ``ops.linear_attention``.

    Returns:
      ``o [B,T,H,V]`` in ``v.dtype``, and the state after the last step
      (``[B,H,K,V]`` float32; None when ``state`` was None).
    """
    b, t = r.shape[:2]
    # The op's step s receives k, v, log w of step s-1, so its state at step s
    # is S_{s-1}. To return S_T, one extra step (zero query) folds in the last token.
    steps = t if state is None else t + 1
    delayed = lambda x: jnp.concatenate([jnp.zeros_like(x[:, :1]), x], axis=1)[:, :steps]
    k_prev, v_prev, log_w_prev = delayed(k), delayed(v), delayed(log_w.astype(jnp.float32))
    q = jnp.concatenate([r, jnp.zeros_like(r[:, :1])], axis=1)[:, :steps]
    if segment_ids is not None:
        segment_ids = jnp.concatenate([segment_ids, segment_ids[:, -1:]], axis=1)[:, :steps]
        # The op restarts from zero at a segment start, where the delayed key is
        # the previous segment's last token: it must not enter.
        start = segment_starts(segment_ids, b, steps)[..., None, None]
        k_prev = jnp.where(start, 0.0, k_prev).astype(k.dtype)
    o, final = ops.linear_attention(
        q, k_prev, v_prev, log_w_prev, scale=1.0, initial_state=state,
        return_final_state=state is not None, segment_ids=segment_ids,
        chunk_size=chunk_size, implementation=implementation,
    )
    bonus = jnp.einsum("bthk,hk,bthk->bth", r.astype(jnp.float32), u.astype(jnp.float32),
                       k.astype(jnp.float32))  # [B,T,H]
    o = o[:, :t].astype(jnp.float32) + bonus[..., None] * v.astype(jnp.float32)
    return o.astype(v.dtype), final


def rwkv7_wkv(
    r: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_w: jax.Array,
    removal_key: jax.Array,
    iclr: jax.Array,
    *,
    state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int = 64,
    implementation: str = "auto",
) -> tuple[jax.Array, jax.Array | None]:
    """RWKV-7's WKV: ``S_t = diag(w_t) S_{t-1} - (a_t ⊙ kappa_t) (kappa_t^T S_{t-1}) + k_t v_t^T``, ``o_t = S_t^T r_t``.

    This is the ``wkv7`` kernel of BlinkDL/RWKV-LM (its state is our ``S^T``).

    Args:
      r: receptance ``[B,T,H,K]``.
      k: the (iclr-modulated) keys written with ``v``, ``[B,T,H,K]``.
      v: values ``[B,T,H,V]``.
      log_w: ``[B,T,H,K]`` log decays, ``<= 0``.
      removal_key: ``[B,T,H,K]`` the L2-normalised key ``kappa`` whose old value is removed.
      iclr: ``[B,T,H,K]`` in-context learning rate ``a`` in (0, 1).
      state: ``[B,H,K,V]`` float32 state before step 0, or None for zeros.
      segment_ids: optional ``[B,T]`` int ids of packed sequences.
      chunk_size, implementation: passed to ``ops.generalized_delta_rule``.

    Returns:
      ``o [B,T,H,V]`` in ``v.dtype`` and the final state (None when ``state`` was None).
    """
    return ops.generalized_delta_rule(
        r, k, v, -removal_key * iclr, removal_key, log_w, scale=1.0, initial_state=state,
        return_final_state=state is not None, segment_ids=segment_ids,
        chunk_size=chunk_size, implementation=implementation,
    )


def _ramp(d: int) -> jax.Array:
    """``n / (D-1)`` for channels ``n = 0..D-1`` (0 to 1), as in RWKV's init."""
    return jnp.arange(d, dtype=jnp.float32) / max(d - 1, 1)


def _constant(value):
    """Initialiser returning ``value`` (computed at init, cast to the param dtype)."""
    return lambda key, shape, dtype=jnp.float32: jnp.broadcast_to(value, shape).astype(dtype)


class _RWKVTimeMix(Mixer):
    """Pieces shared by RWKV-6 and RWKV-7 time mixing."""

    def _shift(self, x, cache, segment_ids):
        """``(x, x_prev - x)`` with ``x`` in the compute dtype."""
        x = x.astype(self.config.dtype)
        prev = token_shift(x, None if cache is None else cache.shift, segment_ids)
        return x, prev - x

    def _output(self, o, gate, x, state, cache):
        """The output projection of the gated heads ``o [B,T,H,V]``, and the new cache."""
        y = self.proj(self.config.d_model, "output")(merge_heads(o).astype(self.config.dtype) * gate)
        if cache is None:
            return y, None
        return y, RWKVCache(shift=x[:, -1].astype(cache.shift.dtype), state=state)

    def _group_norm(self, o, scale: float = 1.0):
        cfg = self.config
        return HeadNorm(kind="layer", eps=GROUP_NORM_EPS, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                        scale_init=scale, use_bias=True, name="ln_x")(o)  # RWKV's GroupNorm has a bias

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> RWKVCache:
        """An empty cache; its size does not depend on ``max_len``."""
        cfg = self.config
        return RWKVCache(
            shift=jnp.zeros((batch_size, cfg.d_model), dtype),
            state=jnp.zeros((batch_size, cfg.num_heads, cfg.head_size, cfg.head_size), jnp.float32),
        )


@register("rwkv6", RWKV6Config)
class RWKV6(_RWKVTimeMix):
    """RWKV-6 (Finch) time mixing: ``x [B,T,D] -> y [B,T,D]``.

    Data-dependent token shift (ddlerp: a LoRA on the shifted input modulates
    five interpolations), data-dependent per-channel decay ``exp(-exp(.))``,
    bonus ``u``, per-head GroupNorm, SiLU gate.
    """

    config: RWKV6Config

    @nn.compact
    def __call__(self, x, cache: RWKVCache | None = None, *, segment_ids=None):
        cfg = self.config
        check_decode_inputs(self.registry_name, x, cache, segment_ids, cfg.d_model)
        d, heads = cfg.d_model, cfg.num_heads
        r0, r1 = cfg.layer_ratio, 1.0 - cfg.layer_ratio
        depth = jnp.arange(d, dtype=jnp.float32) / d
        x, xx = self._shift(x, cache, segment_ids)

        # ddlerp (Finch): one LoRA of the mu_x-shifted input gives five offsets.
        mu_x = self.param("maa_x", _constant(1.0 - depth**r1), (d,), cfg.param_dtype)
        mu_init = jnp.stack([1.0 - depth**r1, 1.0 - depth**r1, 1.0 - (depth**r1 + 0.3 * r0),
                             1.0 - depth ** (0.5 * r1), 1.0 - depth ** (0.5 * r1)])  # w, k, v, r, g
        mu = self.param("maa", _constant(mu_init), (len(RWKV6_MIXES), d), cfg.param_dtype)
        lora_in = x + xx * mu_x.astype(cfg.dtype)
        hidden = jnp.tanh(self.proj(len(RWKV6_MIXES) * cfg.mix_lora, "maa_lora_a",
                                    kernel_init=nn.initializers.zeros)(lora_in))
        hidden = jnp.split(hidden, len(RWKV6_MIXES), axis=-1)
        lora_up = nn.initializers.uniform(2 * LORA_INIT_SCALE)
        mixed = {}
        for i, name in enumerate(RWKV6_MIXES):
            offset = self.proj(d, f"maa_lora_b_{name}", kernel_init=_shifted(lora_up, LORA_INIT_SCALE))(hidden[i])
            mixed[name] = x + xx * (mu[i].astype(cfg.dtype) + offset)

        r = split_heads(self.proj(d, "receptance")(mixed["r"]), heads)
        k = split_heads(self.proj(d, "key")(mixed["k"]), heads)
        v = split_heads(self.proj(d, "value")(mixed["v"]), heads)
        gate = jax.nn.silu(self.proj(d, "gate")(mixed["g"]))

        # Data-dependent decay (Finch): w = exp(-exp(d_t)), d_t = d + LoRA(x_w).
        decay_init = -6.0 + 5.0 * _ramp(d) ** (0.7 + 1.3 * r0)
        decay = self.param("time_decay", _constant(decay_init), (d,), cfg.param_dtype)
        decay_lora = self.proj(d, "decay_lora_b", kernel_init=_shifted(lora_up, LORA_INIT_SCALE))(
            jnp.tanh(self.proj(cfg.decay_lora, "decay_lora_a", kernel_init=nn.initializers.zeros)(mixed["w"])))
        log_w = -jnp.exp(decay.astype(jnp.float32) + decay_lora.astype(jnp.float32))  # [B,T,D]
        n = jnp.arange(d)
        u_init = (r0 * (1.0 - _ramp(d)) + ((n + 1) % 3 - 1) * 0.1).reshape(heads, cfg.head_size)
        u = self.param("time_faaaa", _constant(u_init), (heads, cfg.head_size), cfg.param_dtype)

        o, state = rwkv6_wkv(
            r, k, v, split_heads(log_w, heads), u, state=None if cache is None else cache.state,
            segment_ids=segment_ids, chunk_size=cfg.chunk_size, implementation=cfg.implementation,
        )
        return self._output(self._group_norm(o), gate, x, state, cache)


@register("rwkv7", RWKV7Config)
class RWKV7(_RWKVTimeMix):
    """RWKV-7 (Goose) time mixing: ``x [B,T,D] -> y [B,T,D]``.

    Static token-shift interpolations; LoRAs give the decay, the in-context
    learning rate ``a`` and the output gate; the generalised delta rule; the
    per-head GroupNorm; the bonus ``(r . (k ⊙ r_k)) v``; the value residual across
    layers with ``config.value_residual`` (module docstring).
    """

    config: RWKV7Config

    @nn.compact
    def __call__(self, x, cache: RWKVCache | None = None, *, segment_ids=None, value_residual=None):
        """``x [B,T,D] -> (y, cache)``; with ``config.value_residual`` also ``value_residual``
        ``(v_first [B,T,D] | None,)`` in and ``(y, cache, v_first)`` out."""
        cfg = self.config
        check_decode_inputs(self.registry_name, x, cache, segment_ids, cfg.d_model)
        if cfg.value_residual != (value_residual is not None):
            raise ValueError(
                f"rwkv7: value_residual={cfg.value_residual} in the config and value_residual="
                f"{'given' if value_residual is not None else None} in the call; a value-residual layer takes "
                "(v_first,) from the LM ((None,) in the first such layer), a plain one takes nothing."
            )
        d, heads = cfg.d_model, cfg.num_heads
        r0, r1 = cfg.depth_ratios
        n = jnp.arange(d, dtype=jnp.float32)
        depth = n / d
        linear = n / max(d - 1, 1) - 0.5
        half = max((cfg.head_size - 1) / 2, 0.5)
        zigzag = ((n % cfg.head_size) - (cfg.head_size - 1) / 2) / half
        zigzag = zigzag * jnp.abs(zigzag)
        x, xx = self._shift(x, cache, segment_ids)

        powers = jnp.array([0.2, 0.9, 0.7, 0.7, 0.9, 0.2])[:, None]  # r, w, k, v, a, g
        mu = self.param("x_mix", _constant(1.0 - depth[None] ** (powers * r1)), (len(RWKV7_MIXES), d),
                        cfg.param_dtype)
        mixed = {name: x + xx * mu[i].astype(cfg.dtype) for i, name in enumerate(RWKV7_MIXES)}

        def lora(name, rank, inputs, activation=lambda h: h):
            hidden = activation(self.proj(rank, f"{name}_lora_a", kernel_init=nn.initializers.zeros)(inputs))
            return self.proj(d, f"{name}_lora_b", kernel_init=nn.initializers.orthogonal(0.1))(hidden)

        r = split_heads(self.proj(d, "receptance", kernel_init=nn.initializers.orthogonal())(mixed["r"]), heads)
        k = self.proj(d, "key", kernel_init=nn.initializers.orthogonal(0.1))(mixed["k"])
        v = self.proj(d, "value", kernel_init=nn.initializers.orthogonal())(mixed["v"])  # [B,T,D]
        v_first = None
        if value_residual is not None:
            (given,) = value_residual
            if given is None:  # the stack's first RWKV-7 layer: its values are v_first (no mixing parameters)
                v_first = v
            else:
                if tuple(given.shape) != tuple(v.shape):
                    raise ValueError(f"rwkv7: v_first has shape {tuple(given.shape)}; expected {tuple(v.shape)}.")
                v0 = self.param("v0", _constant(0.73 - 0.4 * linear), (d,), cfg.param_dtype)
                mix = jax.nn.sigmoid(v0.astype(jnp.float32)
                                     + lora("value", cfg.value_lora, mixed["v"]).astype(jnp.float32))
                v32 = v.astype(jnp.float32)
                v = (v32 + (given.astype(jnp.float32) - v32) * mix).astype(v.dtype)  # lerp(v, v_first, mix)
                v_first = given
        v = split_heads(v, heads)

        decay_init = -6.0 + 6.0 * (n / max(d - 1, 1)) ** (1.0 + r0**0.3) + 0.5 + 2.5 * zigzag
        w0 = self.param("w0", _constant(decay_init), (d,), cfg.param_dtype)
        w_pre = w0.astype(jnp.float32) + lora("decay", cfg.decay_lora, mixed["w"], jnp.tanh).astype(jnp.float32)
        log_w = -RWKV7_MAX_LOG_DECAY * jax.nn.sigmoid(w_pre)  # [B,T,D], in (-e^{-1/2}, 0)

        a0 = self.param("a0", _constant(-0.19 + 0.3 * zigzag + 0.4 * linear), (d,), cfg.param_dtype)
        iclr = jax.nn.sigmoid(a0.astype(jnp.float32) + lora("iclr", cfg.iclr_lora, mixed["a"]).astype(jnp.float32))
        gate = lora("gate", cfg.gate_lora, mixed["g"], jax.nn.sigmoid)

        k_k = self.param("k_k", _constant(0.71 - 0.1 * linear), (d,), cfg.param_dtype)
        k_a = self.param("k_a", nn.initializers.constant(1.02), (d,), cfg.param_dtype)
        kk = split_heads(k.astype(jnp.float32) * k_k.astype(jnp.float32), heads)
        kk = kk / jnp.maximum(jnp.linalg.norm(kk, axis=-1, keepdims=True), L2_EPS)
        k = k.astype(jnp.float32) * (1.0 + (iclr - 1.0) * k_a.astype(jnp.float32))
        k = split_heads(k.astype(cfg.dtype), heads)
        iclr = split_heads(iclr, heads)

        o, state = rwkv7_wkv(
            r, k, v, split_heads(log_w, heads), kk, iclr, state=None if cache is None else cache.state,
            segment_ids=segment_ids, chunk_size=cfg.chunk_size, implementation=cfg.implementation,
        )
        r_k = self.param("r_k", nn.initializers.constant(-0.04), (heads, cfg.head_size), cfg.param_dtype)
        bonus = jnp.einsum("bthk,bthk,hk->bth", r.astype(jnp.float32), k.astype(jnp.float32),
                           r_k.astype(jnp.float32))  # [B,T,H]
        norm_scale = ((round(r0 * ((cfg.num_layers or 2) - 1)) + 1) / (cfg.num_layers or 2)) ** 0.7
        o = self._group_norm(o, scale=norm_scale).astype(jnp.float32) + bonus[..., None] * v.astype(jnp.float32)
        # The reference zero-initialises the output projection; we keep the default so that a
        # fresh layer's output (and every test of it) is not identically zero.
        y, cache = self._output(o, gate, x, state, cache)
        return (y, cache) if value_residual is None else (y, cache, v_first)


def _shifted(init, offset: float):
    """``init`` shifted down by ``offset`` (uniform(0, 2s) -> uniform(-s, s))."""
    return lambda key, shape, dtype=jnp.float32: init(key, shape, dtype) - offset
