"""Pieces shared by the mixers built on ``ops.linear_attention``.

A mixer computes ``q, k, v, log_decay`` from ``x`` and hands them to
:func:`run_linear_attention`, which continues from a cached state when there is
one. :func:`short_convs` runs one causal short convolution per stream and
carries their decode states.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from effarch import ops
from effarch.layers.conv import ShortConv, init_conv_state
from effarch.ops.linear_attention import IMPLEMENTATIONS as _LINEAR_ATTENTION_IMPLEMENTATIONS

# Every concrete implementation of ops.linear_attention (what "auto" resolves between).
LINEAR_ATTENTION_IMPLEMENTATIONS = tuple(i for i in _LINEAR_ATTENTION_IMPLEMENTATIONS if i != "auto")


class RecurrentCache(NamedTuple):
    """Decode cache of a linear-attention mixer.

    Attributes:
      state: ``[B,H,K,V]`` float32 recurrent state.
      conv: one ``[B,W-1,D_i]`` short-convolution state per convolved stream
        (an empty tuple without short convolutions).
      position: ``[]`` int32, tokens seen so far (rotary positions).
    """

    state: jax.Array
    conv: tuple[jax.Array, ...]
    position: jax.Array


def empty_cache(batch_size: int, num_heads: int, key_dim: int, value_dim: int,
                conv_widths: tuple[int, ...] = (), kernel_size: int = 1,
                dtype: Any = jnp.float32) -> RecurrentCache:
    """A zero state, zero conv windows (in ``dtype``) and position 0."""
    return RecurrentCache(
        state=jnp.zeros((batch_size, num_heads, key_dim, value_dim), jnp.float32),
        conv=tuple(init_conv_state(batch_size, kernel_size, w, dtype) for w in conv_widths),
        position=jnp.zeros((), jnp.int32),
    )


def short_convs(streams: dict[str, jax.Array], *, kernel_size: int, cache: RecurrentCache | None,
                segment_ids, dtype, param_dtype, activation: str = "silu"):
    """One :class:`ShortConv` per named stream (submodules ``conv_<name>``).

    Must be called inside a Flax ``compact`` method. Returns the convolved
    streams (same names) and the tuple of new conv states (None without cache).
    """
    outs, states = {}, []
    for i, (name, x) in enumerate(streams.items()):
        conv = ShortConv(kernel_size=kernel_size, activation=activation, use_bias=False,
                         dtype=dtype, param_dtype=param_dtype, name=f"conv_{name}")
        outs[name], state = conv(x, None if cache is None else cache.conv[i], segment_ids=segment_ids)
        states.append(state)
    return outs, (tuple(states) if cache is not None else None)


def run_linear_attention(q, k, v, log_decay, *, cache: RecurrentCache | None, conv_states=None,
                         segment_ids=None, scale=None, chunk_size: int, implementation: str):
    """``ops.linear_attention`` from the cached state (or from zero when ``cache`` is None).

    Returns ``o [B,T,H,V]`` and the updated cache (None without cache).
    """
    o, state = ops.linear_attention(
        q, k, v, log_decay, scale=scale,
        initial_state=None if cache is None else cache.state,
        return_final_state=cache is not None, segment_ids=segment_ids,
        chunk_size=chunk_size, implementation=implementation)
    if cache is None:
        return o, None
    return o, RecurrentCache(state=state, conv=conv_states if conv_states is not None else cache.conv,
                             position=cache.position + q.shape[1])


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """``[B,T,H*K] -> [B,T,H,K]``."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
    """``[B,T,H,K] -> [B,T,H*K]``."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
