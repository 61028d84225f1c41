"""Rotary position embedding (RoPE, Su et al., 2021) at explicit positions.

Pairs channel ``i`` with channel ``i + R/2`` of the rotated part (the
"rotate-half" / GPT-NeoX layout) and rotates the pair by ``position * theta_i``
with ``theta_i = base^(-2i/R)``. ``R = fraction * K`` channels are rotated (a
partial rotary keeps the rest as they are). Angles are computed in float32 so
large positions keep their precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_BASE = 10_000.0


def rotary_dim(head_dim: int, fraction: float = 1.0) -> int:
    """The even number of rotated channels, ``R = 2 * floor(fraction * K / 2)``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"rotary fraction={fraction}; expected 0 < fraction <= 1.")
    return 2 * int(fraction * head_dim // 2)


def rotary_frequencies(dim: int, base: float = DEFAULT_BASE) -> jax.Array:
    """``theta_i = base^(-2i/dim)`` for ``i < dim/2``, ``[dim/2]`` float32."""
    return base ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token within its packed segment, ``[B,T]`` int32.

    Restarts at 0 wherever the id changes from the previous step.
    """
    b, t = segment_ids.shape
    steps = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    starts = jnp.concatenate(
        [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )  # [B, T]
    start_step = jax.lax.cummax(jnp.where(starts, steps, 0), axis=1)  # [B, T]
    return steps - start_step


def token_positions(length: int, *, start=None, segment_ids=None) -> jax.Array:
    """Rotary positions of ``length`` new tokens.

    Args:
      length: tokens in this call.
      start: position of the first one when decoding from a cache (an int
        array), else None.
      segment_ids: ``[B,T]`` ids of packed sequences (positions restart in
        each); ignored when ``start`` is given.

    Returns:
      ``[T]`` (from ``start``, or from 0) or ``[B,T]`` (per segment).
    """
    if start is not None:
        return start + jnp.arange(length)
    if segment_ids is not None:
        return segment_positions(segment_ids)
    return jnp.arange(length)


def apply_rotary(
    x: jax.Array,
    positions: jax.Array,
    *,
    base: float = DEFAULT_BASE,
    fraction: float = 1.0,
) -> jax.Array:
    """Rotates ``x`` by its positions.

    Args:
      x: ``[B,T,H,K]`` queries or keys.
      positions: ``[B,T]`` or ``[T]`` integer (or float) positions.
      base: the frequency base.
      fraction: share of the K channels that are rotated (the first R).

    Returns:
      ``[B,T,H,K]`` in ``x.dtype``.
    """
    if x.ndim != 4:
        raise ValueError(f"apply_rotary: x has shape {tuple(x.shape)}; expected [B,T,H,K].")
    b, t, _, k = x.shape
    if positions.shape not in ((t,), (b, t)):
        raise ValueError(
            f"apply_rotary: positions has shape {tuple(positions.shape)}; expected [T]=[{t}] or [B,T]=[{b},{t}]."
        )
    r = rotary_dim(k, fraction)
    angles = positions.astype(jnp.float32)[..., None] * rotary_frequencies(r, base)  # [(B,)T, R/2]
    angles = jnp.broadcast_to(angles, (b, t, r // 2))[:, :, None, :]  # [B, T, 1, R/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    x1, x2, rest = xf[..., : r // 2], xf[..., r // 2 : r], xf[..., r:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return rotated.astype(x.dtype)


def apply_rotary_reference(x, positions, *, base=DEFAULT_BASE, fraction=1.0):
    """Reference: each channel pair ``(i, i + R/2)`` as a complex number times ``e^{i p theta}``."""
    b, t, _, k = x.shape
    r = rotary_dim(k, fraction)
    pos = jnp.broadcast_to(positions.astype(jnp.float32), (b, t))[:, :, None, None]  # [B, T, 1, 1]
    pairs = x[..., : r // 2].astype(jnp.float32) + 1j * x[..., r // 2 : r].astype(jnp.float32)
    turned = pairs * jnp.exp(1j * pos * rotary_frequencies(r, base))
    return jnp.concatenate([turned.real, turned.imag, x[..., r:].astype(jnp.float32)], axis=-1).astype(x.dtype)
