"""Hyena operator (Poli et al., 2023, "Hyena Hierarchy: Towards Larger
Convolutional Language Models").

Order-``N`` Hyena (paper sec. 3, Alg. 1-3; ``N = 2`` by default)::

    x_0, ..., x_{N-1}, v = split(short_conv(in_proj(u)))     # N + 1 streams of width D
    for i = N-1, ..., 1:   v = h_i * (x_i . v) + beta_i . (x_i . v)   # long causal conv
    y = out_proj(x_0 . v)

Each long filter ``h_i [L, D]`` is implicit: an MLP with sine activations of a
positional encoding ``[t, cos(2 pi f t'), sin(2 pi f t')]``, times an
exponential decay window ``exp(-alpha_d t)`` whose rates spread over channels
(paper sec. 3.3, "Hyena filters"). ``beta`` is a learned per-channel skip.

Forms of the long convolution:
- full sequence: FFT, O(T log T) (:func:`effarch.layers.conv.fft_causal_conv`);
- packed ``segment_ids``: direct O(T^2 D) (an FFT cannot restart at a segment
  boundary);
- decoding: the cache keeps every past input of each long convolution
  (``[B, max_len, D]`` per filter: O(max_len) memory, unlike the recurrent
  mixers) and a one-token step computes its output directly,
  ``sum_s h[t - s] w_s`` in O(max_len D); a multi-token call (prefill) runs the
  FFT over the whole buffer.

Filters are defined for lags ``< max_len`` (a config option, as in the paper's
``l_max``); a sequence may not be longer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from effarch.layers.conv import ShortConv, direct_causal_conv, fft_causal_conv, init_conv_state
from effarch.mixers.base import Mixer, MixerConfig, check_decode_inputs, register

# Lowest positional-encoding frequency (paper code: linspace(1e-4, bands - 1)).
MIN_FREQUENCY = 1e-4


@dataclasses.dataclass(frozen=True, kw_only=True)
class HyenaConfig(MixerConfig):
    """Hyena operator options (defaults: the paper's language-model setup).

    Attributes:
      order: N, the number of gated long convolutions plus one (>= 2).
      max_len: longest sequence (filter length ``l_max``).
      filter_order: width of the implicit filter MLP.
      emb_dim: positional-encoding width (odd, >= 3): ``t`` plus ``(emb_dim-1)/2`` bands.
      short_filter_order: taps of the short convolution on the projections.
      sin_freq: initial frequency of the MLP's sine activations.
      fast_decay_pct, slow_decay_pct, decay_target: the decay window reaches
        ``decay_target`` after that fraction of ``max_len``, fastest to slowest channel.
    """

    # No effarch.ops op: the long convolution's forms (FFT, direct) are checked
    # against each other in tests/mixers/test_hyena.py.
    IMPLEMENTATIONS: ClassVar[tuple[str, ...]] = ()
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"order": 2, "max_len": 2048, "filter_order": 8},
        "paper": {"order": 2, "max_len": 2048, "filter_order": 64},
    }

    order: int = 2
    max_len: int = 2048
    filter_order: int = 64
    emb_dim: int = 3
    short_filter_order: int = 3
    sin_freq: float = 1.0
    fast_decay_pct: float = 0.3
    slow_decay_pct: float = 1.5
    decay_target: float = 1e-2

    def __post_init__(self):
        super().__post_init__()
        if self.implementation != "auto":
            raise ValueError(f"hyena: implementation={self.implementation!r}; Hyena calls no effarch.ops "
                             "op, expected 'auto'.")
        if self.order < 2:
            raise ValueError(f"hyena: order={self.order}; expected >= 2.")
        if self.emb_dim < 3 or self.emb_dim % 2 == 0:
            raise ValueError(f"hyena: emb_dim={self.emb_dim}; expected an odd number >= 3.")
        for field in ("max_len", "filter_order", "short_filter_order"):
            if getattr(self, field) < 1:
                raise ValueError(f"hyena: {field}={getattr(self, field)}; expected >= 1.")
        if not 0 < self.fast_decay_pct <= self.slow_decay_pct or not 0 < self.decay_target < 1:
            raise ValueError(f"hyena: fast_decay_pct={self.fast_decay_pct}, slow_decay_pct={self.slow_decay_pct}, "
                             f"decay_target={self.decay_target}; expected 0 < fast <= slow and 0 < target < 1.")


class HyenaCache(NamedTuple):
    """Decode cache of Hyena.

    Attributes:
      conv: ``[B,W-1,(N+1)D]`` last inputs of the short convolution.
      inputs: ``[B,L,N-1,D]`` every past input of each long convolution
        (``L = max_len``), at its absolute position.
      position: ``[]`` int32, tokens seen so far.
    """

    conv: jax.Array
    inputs: jax.Array
    position: jax.Array


def positional_encoding(max_len: int, emb_dim: int) -> jax.Array:
    """``[t, cos(2 pi f t'/L), -sin(2 pi f t'/L)]`` with ``t`` in [0, 1], ``t' = 0..L-1``: ``[L, emb_dim]``."""
    bands = (emb_dim - 1) // 2
    t = jnp.linspace(0.0, 1.0, max_len)[:, None]  # [L,1]
    angle = 2 * math.pi * jnp.arange(max_len, dtype=jnp.float32)[:, None] / max_len  # [L,1]
    f = jnp.linspace(MIN_FREQUENCY, bands - 1, bands)[None, :]  # [1,bands]
    return jnp.concatenate([t, jnp.cos(f * angle), -jnp.sin(f * angle)], axis=-1)


class ImplicitFilter(nn.Module):
    """Hyena's implicit long filters ``[L, (N-1) D]`` from a positional encoding (paper sec. 3.3)."""

    config: HyenaConfig

    @nn.compact
    def __call__(self) -> jax.Array:
        cfg = self.config
        channels = (cfg.order - 1) * cfg.d_model
        h = positional_encoding(cfg.max_len, cfg.emb_dim)  # [L, emb_dim]
        for i in range(3):
            h = nn.Dense(cfg.filter_order, param_dtype=cfg.param_dtype, name=f"dense_{i}")(h)
            freq = self.param(f"sin_freq_{i}", nn.initializers.constant(cfg.sin_freq), (cfg.filter_order,),
                              cfg.param_dtype)
            h = jnp.sin(freq * h)
        h = nn.Dense(channels, use_bias=False, param_dtype=cfg.param_dtype, name="dense_out")(h)  # [L,(N-1)D]
        t = jnp.linspace(0.0, 1.0, cfg.max_len)[:, None]
        fastest = math.log(cfg.decay_target) / cfg.fast_decay_pct
        slowest = math.log(cfg.decay_target) / cfg.slow_decay_pct
        rates = jnp.tile(jnp.linspace(slowest, fastest, cfg.d_model), cfg.order - 1)  # [(N-1)D], negative
        return h * jnp.exp(t * rates)  # decay window exp(-|rate| t)


@register("hyena", HyenaConfig)
class Hyena(Mixer):
    """Hyena operator; see the module docstring."""

    config: HyenaConfig

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> HyenaCache:
        cfg = self.config
        if max_len > cfg.max_len:
            raise ValueError(f"hyena: init_cache max_len={max_len} exceeds the filter length "
                             f"config.max_len={cfg.max_len}.")
        d = cfg.d_model
        return HyenaCache(
            conv=init_conv_state(batch_size, cfg.short_filter_order, (cfg.order + 1) * d, dtype),
            inputs=jnp.zeros((batch_size, max_len, cfg.order - 1, d), jnp.float32),
            position=jnp.zeros((), jnp.int32))

    @nn.compact
    def __call__(self, x, cache=None, *, segment_ids=None):
        cfg = self.config
        check_decode_inputs(self.registry_name, x, cache, segment_ids, cfg.d_model)
        b, t, d = x.shape
        if cache is None and t > cfg.max_len:
            raise ValueError(f"hyena: x has T={t} steps, more than config.max_len={cfg.max_len}.")
        x = x.astype(cfg.dtype)
        streams, conv_state = ShortConv(kernel_size=cfg.short_filter_order, dtype=cfg.dtype,
                                        param_dtype=cfg.param_dtype, name="short_conv")(
            self.proj((cfg.order + 1) * d, "in_proj", use_bias=True)(x),
            None if cache is None else cache.conv, segment_ids=segment_ids)
        gates = [streams[..., i * d : (i + 1) * d].astype(jnp.float32) for i in range(cfg.order)]
        v = streams[..., cfg.order * d :].astype(jnp.float32)  # [B,T,D]
        filters = ImplicitFilter(cfg, name="filter")().reshape(cfg.max_len, cfg.order - 1, d)
        skip = self.param("filter_bias", nn.initializers.normal(1.0), (cfg.order - 1, d), cfg.param_dtype)
        new_inputs = []
        for stage, i in enumerate(range(cfg.order - 1, 0, -1)):
            w = gates[i] * v  # [B,T,D]
            kernel = filters[:, stage]  # [L,D]
            if cache is None:
                conv = (fft_causal_conv(w, kernel[:t]) if segment_ids is None
                        else direct_causal_conv(w, kernel[:t], segment_ids=segment_ids))
            else:
                buffer = jax.lax.dynamic_update_slice(cache.inputs[:, :, stage], w, (0, cache.position, 0))
                new_inputs.append(buffer)
                conv = _conv_from_buffer(buffer, kernel[: buffer.shape[1]], cache.position, t)
            v = conv + skip[stage].astype(jnp.float32) * w
        y = (gates[0] * v).astype(cfg.dtype)
        if cache is not None:
            cache = HyenaCache(conv=conv_state, inputs=jnp.stack(new_inputs, axis=2), position=cache.position + t)
        return self.proj(d, "out_proj", use_bias=True)(y), cache


def _conv_from_buffer(buffer: jax.Array, kernel: jax.Array, position: jax.Array, t: int) -> jax.Array:
    """Outputs at positions ``position .. position + t - 1`` of the long conv over ``buffer [B,L,D]``.

    One step (``t == 1``) is a direct dot product with the flipped filter,
    O(L D); several steps run the FFT over the whole buffer (zeros beyond the
    newest input do not reach earlier outputs).
    """
    length = buffer.shape[1]
    if t == 1:
        lags = position - jnp.arange(length)  # [L]
        taps = jnp.where((lags >= 0)[:, None], kernel[jnp.clip(lags, 0, length - 1)], 0.0)  # [L,D]
        return jnp.einsum("bsd,sd->bd", buffer, taps)[:, None]
    full = fft_causal_conv(buffer, kernel)  # [B,L,D]
    return jax.lax.dynamic_slice_in_dim(full, position, t, axis=1)
