"""Mixture-of-Depths (Raposo et al., 2024): a router picks which tokens a block sees.

Per sequence, a linear router scores every token; the top
``k = ceil(capacity * T)`` tokens (kept in time order) go through the block,
the rest skip it on the residual path. A processed token's update is scaled by
its router weight so the router learns through the block's output (eq. 1 of
the paper)::

    x_out[t] = x[t] + sigmoid(r_t) * (block(x_sel)[t] - x[t])   if t is selected
    x_out[t] = x[t]                                              otherwise

We use ``sigmoid(r_t)`` rather than the raw score as the weight, which keeps
the update bounded at initialisation.

Causality: top-k over a sequence is non-causal (whether token t is processed
depends on later tokens), so a MoD model's full forward is not
prefix-consistent and cannot be decoded token by token to the same result.
effarch does not approximate it with a causal predictor: models with MoD
layers raise a ValueError when called with a decode cache (docs/models.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Logical axis names of the router weight (docs/models.md).
ROUTER_AXES = ("embed", None)


def selected_count(time: int, capacity: float) -> int:
    """Tokens per sequence a MoD block processes: ``ceil(capacity * T)``, at least 1."""
    return max(1, min(time, math.ceil(capacity * time)))


def select_tokens(scores: jax.Array, capacity: float) -> jax.Array:
    """Indices of the top ``ceil(capacity * T)`` scores per row, in time order.

    Args:
      scores: ``[B, T]`` router scores.
      capacity: fraction of tokens to keep, in (0, 1].

    Returns:
      ``[B, k]`` int32 time indices, ascending.
    """
    _, idx = jax.lax.top_k(scores, selected_count(scores.shape[1], capacity))
    return jnp.sort(idx, axis=-1).astype(jnp.int32)


def mixture_of_depths(
    block: Callable[[jax.Array, jax.Array | None], tuple[jax.Array, Any]],
    x: jax.Array,
    scores: jax.Array,
    capacity: float,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, Any]:
    """Runs ``block`` on the routed tokens only.

    Args:
      block: ``(x_sel [B,k,D], segment_ids_sel [B,k] | None) -> (y_sel [B,k,D], extra)``,
        a residual block (its output includes its input).
      x: ``[B, T, D]`` block input.
      scores: ``[B, T]`` router scores.
      capacity: fraction of tokens processed.
      segment_ids: optional ``[B, T]`` packing ids; the selected tokens keep
        theirs, so a recurrence inside the block still resets between segments.

    Returns:
      ``x_out [B, T, D]`` and the block's ``extra``.
    """
    idx = select_tokens(scores, capacity)  # [B, k]
    x_sel = jnp.take_along_axis(x, idx[..., None], axis=1)  # [B, k, D]
    seg_sel = None if segment_ids is None else jnp.take_along_axis(segment_ids, idx, axis=1)
    y_sel, extra = block(x_sel, seg_sel)
    weight = jax.nn.sigmoid(jnp.take_along_axis(scores, idx, axis=1))  # [B, k]
    delta = (y_sel - x_sel) * weight[..., None].astype(y_sel.dtype)  # [B, k, D]
    rows = jnp.arange(x.shape[0])[:, None]  # [B, 1]
    return x.at[rows, idx].add(delta.astype(x.dtype)), extra


def mixture_of_depths_reference(block_per_token, x, scores, capacity):
    """Reference for a per-token block (an MLP): run it everywhere, keep the routed tokens.

    ``block_per_token: [B,T,D] -> [B,T,D]`` must act on each token
    independently; then routing a subset and masking agree.
    """
    k = selected_count(x.shape[1], capacity)
    threshold = jnp.sort(scores, axis=-1)[:, -k][:, None]  # [B, 1] k-th largest score
    chosen = (scores >= threshold)[..., None]  # [B, T, 1] (no ties with random scores)
    update = jax.nn.sigmoid(scores)[..., None] * (block_per_token(x) - x)
    return jnp.where(chosen, x + update, x)


class MoDRouter(nn.Module):
    """Linear router ``[B,T,D] -> [B,T]`` float32 scores, one per token.

    Attributes:
      param_dtype: dtype of the ``[D, 1]`` weight.
    """

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ROUTER_AXES)
        w = self.param("kernel", init, (x.shape[-1], 1), self.param_dtype)
        return (x.astype(jnp.float32) @ w.astype(jnp.float32))[..., 0]
