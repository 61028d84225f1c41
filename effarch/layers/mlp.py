"""Gated feed-forward blocks (Shazeer, 2020, "GLU Variants Improve Transformer").

    mlp(x) = W_down (act(W_gate x) * (W_up x))

with ``act = silu`` (SwiGLU, the default) or the tanh-approximated GELU
(GeGLU, as in Gemma and RecurrentGemma). ``gated_mlp_reference`` is the
plain-array math; :class:`GatedMLP` owns the three projections (optionally with
biases), annotated with the logical axis names ``("embed", "mlp")`` and
``("mlp", "embed")`` so sharding rules can place them (docs/models.md).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effarch.layers.linear import projection

# Logical axis names of the MLP weights (docs/models.md lists every name).
IN_AXES = ("embed", "mlp")
OUT_AXES = ("mlp", "embed")
# The gate activations by name: SwiGLU's and GeGLU's (transformers' "gelu_pytorch_tanh").
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


def default_width(d_model: int, multiple_of: int = 32) -> int:
    """``8/3 * d_model`` rounded up to ``multiple_of``: a SwiGLU with the
    parameter count of a ``4 * d_model`` two-matrix MLP (LLaMA's choice)."""
    width = (8 * d_model + 2) // 3
    return -(-width // multiple_of) * multiple_of


def gated_mlp_reference(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
                        activation: str = "silu") -> jax.Array:
    """``x [..., D]``, ``w_gate, w_up [D, F]``, ``w_down [F, D]`` -> ``[..., D]``."""
    return (ACTIVATIONS[activation](x @ w_gate) * (x @ w_up)) @ w_down


def swiglu_reference(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """:func:`gated_mlp_reference` with SiLU."""
    return gated_mlp_reference(x, w_gate, w_up, w_down, "silu")


class GatedMLP(nn.Module):
    """Gated MLP ``[..., D] -> [..., D]`` with hidden width ``d_ff``: SwiGLU or GeGLU.

    Attributes:
      d_ff: hidden width F.
      activation: the gate's activation, a key of ``ACTIVATIONS`` (``"silu"``:
        SwiGLU; ``"gelu_tanh"``: GeGLU).
      use_bias: biases on the three projections (RecurrentGemma's MLP has them).
      projection: ``"dense"`` or ``"bitlinear"`` (effarch.layers.linear).
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    d_ff: int
    activation: str = "silu"
    use_bias: bool = False
    projection: str = "dense"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GatedMLP: activation={self.activation!r}; expected one of {sorted(ACTIVATIONS)}.")
        d = x.shape[-1]
        init_in = nn.with_logical_partitioning(nn.initializers.lecun_normal(), IN_AXES)
        init_out = nn.with_logical_partitioning(nn.initializers.lecun_normal(), OUT_AXES)

        def proj(features, init, name):
            return projection(features, kind=self.projection, use_bias=self.use_bias, dtype=self.dtype,
                              param_dtype=self.param_dtype, kernel_init=init, name=name)

        gate = proj(self.d_ff, init_in, "gate")(x)  # [..., F]
        up = proj(self.d_ff, init_in, "up")(x)  # [..., F]
        hidden = ACTIVATIONS[self.activation](gate) * up
        return proj(d, init_out, "down")(hidden)  # [..., D]


# The default GatedMLP is SwiGLU; the name the rest of the library and its users know.
SwiGLU = GatedMLP
