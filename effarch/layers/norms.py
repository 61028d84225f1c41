"""Normalisation layers: RMSNorm, gated RMSNorm (Mamba-2), per-head norm, LayerNorm.

Every norm computes its statistics in float32 and returns ``dtype``; scales are
stored in ``param_dtype``. The pure functions :func:`rms_normalize` and
:func:`layer_normalize` are the math; the modules own the learned scales.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

DEFAULT_EPS = 1e-6
HEAD_NORM_KINDS = ("rms", "layer")


def rms_normalize(x: jax.Array, eps: float = DEFAULT_EPS) -> jax.Array:
    """``x / sqrt(mean(x^2) + eps)`` over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def layer_normalize(x: jax.Array, eps: float = DEFAULT_EPS) -> jax.Array:
    """``(x - mean) / sqrt(var + eps)`` over the last axis, in float32."""
    x = x.astype(jnp.float32)
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich, 2019) over the last axis: ``x / rms(x) * scale``.

    With ``zero_centered`` the parameter is stored as the scale's offset from
    one, ``x / rms(x) * (1 + scale)``, initialised to 0 (Gemma, RecurrentGemma,
    Qwen3-Next): the same function, another parameterisation (weight decay
    pulls the scale towards 1, not 0).

    Attributes:
      eps: added to the mean square.
      use_scale: learn a per-channel scale (initialised to 1).
      zero_centered: store the scale as ``scale - 1``.
      dtype: output dtype.
      param_dtype: dtype of the scale.
    """

    eps: float = DEFAULT_EPS
    use_scale: bool = True
    zero_centered: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [..., D] -> [..., D]``."""
        y = rms_normalize(x, self.eps)
        if self.use_scale:
            init = nn.initializers.zeros if self.zero_centered else nn.initializers.ones
            scale = self.param("scale", init, (x.shape[-1],), self.param_dtype).astype(jnp.float32)
            y = y * (1.0 + scale if self.zero_centered else scale)
        return y.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm (Ba et al., 2016) over the last axis, statistics in float32.

    Attributes:
      eps: added to the variance.
      use_scale: learn a per-channel scale (initialised to 1).
      use_bias: learn a per-channel bias (initialised to 0).
      dtype: output dtype.
      param_dtype: dtype of scale and bias.
    """

    eps: float = DEFAULT_EPS
    use_scale: bool = True
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [..., D] -> [..., D]``."""
        d = x.shape[-1]
        y = layer_normalize(x, self.eps)
        if self.use_scale:
            y = y * self.param("scale", nn.initializers.ones, (d,), self.param_dtype).astype(jnp.float32)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (d,), self.param_dtype).astype(jnp.float32)
        return y.astype(self.dtype)


class GatedRMSNorm(nn.Module):
    """Mamba-2's gated norm: ``rmsnorm(y * silu(z)) * scale``, per group of channels.

    With ``group_size`` set, the mean square is taken over each contiguous group
    of ``group_size`` channels (Mamba-2 with ``ngroups > 1``, so the norm does
    not couple tensor-parallel shards); None normalises over all of D.

    Attributes:
      group_size: channels per normalisation group; must divide D. None: all.
      eps: added to the mean square.
      dtype: output dtype.
      param_dtype: dtype of the scale.
    """

    group_size: int | None = None
    eps: float = DEFAULT_EPS
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
        """``y, z [..., D] -> [..., D]``."""
        if y.shape != z.shape:
            raise ValueError(f"GatedRMSNorm: y {tuple(y.shape)} and gate z {tuple(z.shape)} must have one shape.")
        d = y.shape[-1]
        group = d if self.group_size is None else self.group_size
        if d % group:
            raise ValueError(f"GatedRMSNorm: group_size={group} must divide the channel dim D={d}.")
        gated = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        grouped = gated.reshape(*gated.shape[:-1], d // group, group)  # [..., G, D/G]
        out = rms_normalize(grouped, self.eps).reshape(gated.shape)
        scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        return (out * scale.astype(jnp.float32)).astype(self.dtype)


class HeadNorm(nn.Module):
    """Group norm with one group per head (RetNet, GLA, HGRN-2 output norms).

    Normalises ``[..., H, V]`` over V for each head independently (RMS or
    LayerNorm statistics), then applies a learned ``[H, V]`` scale, so heads
    with very different state magnitudes (RetNet's multi-scale decays) are put
    on one scale before the output projection.

    Attributes:
      kind: ``"rms"`` or ``"layer"`` statistics.
      eps: added to the variance.
      use_scale: learn a per-(head, channel) scale.
      scale_init: the scale's initial value (1; RWKV-7 sets it by depth).
      use_bias: add a learned per-(head, channel) bias after the scale
        (initialised to 0), as RWKV's GroupNorm does.
      dtype: output dtype.
      param_dtype: dtype of the scale.
    """

    kind: str = "rms"
    eps: float = DEFAULT_EPS
    use_scale: bool = True
    scale_init: float = 1.0
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [..., H, V] -> [..., H, V]``."""
        if self.kind not in HEAD_NORM_KINDS:
            raise ValueError(f"HeadNorm: kind={self.kind!r}; expected one of {HEAD_NORM_KINDS}.")
        if x.ndim < 2:
            raise ValueError(f"HeadNorm: x has shape {tuple(x.shape)}; expected [..., H, V].")
        y = rms_normalize(x, self.eps) if self.kind == "rms" else layer_normalize(x, self.eps)
        if self.use_scale:
            init = nn.initializers.constant(self.scale_init)
            y = y * self.param("scale", init, x.shape[-2:], self.param_dtype).astype(jnp.float32)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, x.shape[-2:], self.param_dtype).astype(jnp.float32)
        return y.astype(self.dtype)
