"""The truth the linear-scan kernels are tested against, and example inputs.

``h_t = a_t * h_{t-1} + x_t`` per channel, one time step at a time in float32,
the state restarting from zero where ``segment_ids`` changes: the plainest
form of the recurrence, written on its own (it shares no code with the
kernels or with ``effarch.ops``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effarch.op_contract import segment_starts


def linear_scan_reference(x, a, *, initial_state=None, segment_ids=None):
    """Float32 ``h_t = a_t * h_{t-1} + x_t``.

    Args:
      x, a: ``[B,T,D]``.
      initial_state: optional ``[B,D]`` state before step 0 (feeds only the
        first segment).
      segment_ids: optional ``[B,T]`` int; the state restarts from zero where
        the id changes.

    Returns:
      ``(h [B,T,D], h_final [B,D])``, both float32.
    """
    f32 = jnp.float32
    batch, time, channels = x.shape
    h = jnp.zeros((batch, channels), f32) if initial_state is None else initial_state.astype(f32)
    keep = ~segment_starts(segment_ids, batch, time)  # [B,T]: False where the state restarts

    def step(h, inputs):  # h [B,D]
        x_t, a_t, keep_t = inputs  # [B,D], [B,D], [B]
        h = jnp.where(keep_t[:, None], a_t * h, 0.0) + x_t
        return h, h

    time_major = [jnp.swapaxes(v, 0, 1) for v in (x.astype(f32), a.astype(f32), keep)]
    h_final, h = jax.lax.scan(step, h, time_major)
    return jnp.swapaxes(h, 0, 1), h_final


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
