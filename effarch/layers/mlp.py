"""The SwiGLU feed-forward block (Shazeer, 2020, "GLU Variants Improve Transformer").

    mlp(x) = W_down (silu(W_gate x) * (W_up x))

``swiglu_reference`` is the plain-array math; :class:`SwiGLU` owns the three
projections, annotated with the logical axis names ``("embed", "mlp")`` and
``("mlp", "embed")`` so sharding rules can place them (docs/models.md).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effarch.layers.linear import projection

# Logical axis names of the MLP weights (docs/models.md lists every name).
IN_AXES = ("embed", "mlp")
OUT_AXES = ("mlp", "embed")


def default_width(d_model: int, multiple_of: int = 32) -> int:
    """``8/3 * d_model`` rounded up to ``multiple_of``: a SwiGLU with the
    parameter count of a ``4 * d_model`` two-matrix MLP (LLaMA's choice)."""
    width = (8 * d_model + 2) // 3
    return -(-width // multiple_of) * multiple_of


def swiglu_reference(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """``x [..., D]``, ``w_gate, w_up [D, F]``, ``w_down [F, D]`` -> ``[..., D]``."""
    return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


class SwiGLU(nn.Module):
    """SwiGLU MLP ``[..., D] -> [..., D]`` with hidden width ``d_ff``.

    Attributes:
      d_ff: hidden width F.
      projection: ``"dense"`` or ``"bitlinear"`` (effarch.layers.linear).
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    d_ff: int
    projection: str = "dense"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        init_in = nn.with_logical_partitioning(nn.initializers.lecun_normal(), IN_AXES)
        init_out = nn.with_logical_partitioning(nn.initializers.lecun_normal(), OUT_AXES)

        def proj(features, init, name):
            return projection(features, kind=self.projection, dtype=self.dtype,
                              param_dtype=self.param_dtype, kernel_init=init, name=name)

        gate = proj(self.d_ff, init_in, "gate")(x)  # [..., F]
        up = proj(self.d_ff, init_in, "up")(x)  # [..., F]
        hidden = jax.nn.silu(gate) * up
        return proj(d, init_out, "down")(hidden)  # [..., D]
