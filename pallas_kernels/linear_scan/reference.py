"""The truth the linear-scan kernels are tested against, and example inputs.

The reference is the float32 recurrent form of ``effarch.ops.linear_scan``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effarch.ops.linear_scan import linear_scan_recurrent


def linear_scan_reference(x, a, *, initial_state=None, segment_ids=None):
    """Float32 ``h_t = a_t * h_{t-1} + x_t``; returns ``(h [B,T,D] float32, h_final [B,D])``."""
    h0 = None if initial_state is None else initial_state.astype(jnp.float32)
    return linear_scan_recurrent(
        x.astype(jnp.float32), a.astype(jnp.float32), initial_state=h0,
        segment_ids=segment_ids,
    )


def random_inputs(
    key, *, batch: int, time: int, channels: int, dtype=jnp.float32,
    decay_shift: float = 2.0,
) -> dict[str, jax.Array]:
    """Random RG-LRU style inputs, keyed by the argument names of linear_scan.

    ``a = sigmoid(normal + decay_shift)``: a large shift (+6) gives weak decay
    (a near 1), a negative one (-3) strong decay.
    """
    k = jax.random.split(key, 3)
    btd = (batch, time, channels)
    inputs = dict(
        x=jax.random.normal(k[0], btd),
        a=jax.nn.sigmoid(jax.random.normal(k[1], btd) + decay_shift),
        initial_state=jax.random.normal(k[2], (batch, channels)),
    )
    return {n: v.astype(dtype) for n, v in inputs.items()}
