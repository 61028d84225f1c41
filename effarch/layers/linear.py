"""Projections: a dense layer, or BitLinear (BitNet b1.58) behind one switch.

Every projection in effarch goes through :func:`projection`, so
``projection="bitlinear"`` in any mixer or model config turns every linear map
into a ternary-weight, 8-bit-activation BitLinear (Ma et al., 2024, "The Era of
1-bit LLMs").
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

PROJECTIONS = ("dense", "bitlinear")
# BitNet b1.58: activations to signed 8-bit by absmax per token.
ACTIVATION_LEVELS = 127.0
# Guards the absmean / absmax scales against all-zero rows.
QUANT_EPS = 1e-5


def _ste(x, quantized):
    """Straight-through estimator: forward ``quantized``, gradient of identity."""
    return x + jax.lax.stop_gradient(quantized - x)


def ternary_weights(w: jax.Array) -> jax.Array:
    """Weights to {-1, 0, +1} * mean(|w|) (absmean), with the STE."""
    scale = jnp.mean(jnp.abs(w)) + QUANT_EPS
    return _ste(w, jnp.clip(jnp.round(w / scale), -1, 1) * scale)


def int8_activations(x: jax.Array) -> jax.Array:
    """Activations to 8-bit levels per token (absmax over the last axis), with the STE."""
    scale = ACTIVATION_LEVELS / (jnp.max(jnp.abs(x), axis=-1, keepdims=True) + QUANT_EPS)
    q = jnp.clip(jnp.round(x * scale), -ACTIVATION_LEVELS, ACTIVATION_LEVELS) / scale
    return _ste(x, q)


class BitLinear(nn.Module):
    """BitNet b1.58 linear layer: ternary weights, 8-bit activations, STE gradients.

    Full-precision latent weights are trained; the forward pass uses their
    quantised values. An RMS normalisation of the input precedes quantisation
    as in the paper (SubLN is left to the caller's norms).

    Attributes:
      features: output width.
      use_bias: add a bias after the quantised matmul.
      dtype: compute dtype.
      param_dtype: latent weight dtype.
      kernel_init: initialiser of the latent weights.
    """

    features: int
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + QUANT_EPS)
        x = int8_activations(x).astype(self.dtype)
        y = x @ ternary_weights(w.astype(jnp.float32)).astype(self.dtype)
        if self.use_bias:
            b = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + b.astype(self.dtype)
        return y


def projection(
    features: int,
    *,
    kind: str = "dense",
    use_bias: bool = False,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    kernel_init: Any = nn.initializers.lecun_normal(),
    name: str | None = None,
) -> nn.Module:
    """A linear map ``[..., in] -> [..., features]`` of the configured kind.

    Args:
      features: output width.
      kind: ``"dense"`` or ``"bitlinear"``.
      use_bias, dtype, param_dtype, kernel_init: as in ``flax.linen.Dense``.
      name: submodule name.
    """
    if kind == "dense":
        return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                        kernel_init=kernel_init, name=name)
    if kind == "bitlinear":
        return BitLinear(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                         kernel_init=kernel_init, name=name)
    raise ValueError(f"projection kind={kind!r}; expected one of {PROJECTIONS}.")
