"""The truth the selective-scan kernels are tested against, and example inputs.

Mamba-1's selective scan (Gu & Dao 2023, Algorithm 2) one time step at a time
in float32, whatever the dtype of the inputs: the plainest form of the
recurrence, written on its own (it shares no code with the kernels or with
``effarch.ops``)::

    delta_t = softplus(dt_t + dt_bias)                      # [B,T,D]
    h_t     = exp(delta_t A) * h_{t-1} + delta_t B_t x_t    # [B,D,N]
    y_t     = (C_t . h_t + D x_t) * silu(z_t)

Channel d reads the B and C rows of group ``d // (D // G)``; the state
restarts from zero where ``segment_ids`` changes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effarch.op_contract import segment_starts


def selective_scan_reference(
    x, dt, A, B, C, D=None, z=None, *, dt_bias=None, dt_softplus=True,
    initial_state=None, segment_ids=None,
):
    """Float32 Mamba-1 selective scan.

    Args:
      x, dt: ``[B,T,D]``; A: ``[D,N]``; B, C: ``[B,T,G,N]``, G divides D.
      D: optional ``[D]`` skip; z: optional ``[B,T,D]`` gate.
      dt_bias: optional ``[D]``; dt_softplus: apply softplus to ``dt + dt_bias``.
      initial_state: optional ``[B,D,N]`` (feeds only the first segment).
      segment_ids: optional ``[B,T]`` int.

    Returns:
      ``(y [B,T,D], h_final [B,D,N])``, both float32.
    """
    f32 = jnp.float32
    batch, time, channels = x.shape
    groups, state = B.shape[2], A.shape[1]
    x = x.astype(f32)
    delta = dt.astype(f32) if dt_bias is None else dt.astype(f32) + dt_bias.astype(f32)
    delta = jax.nn.softplus(delta) if dt_softplus else delta  # [B,T,D]
    by_channel = lambda rows: jnp.repeat(rows.astype(f32), channels // groups, axis=2)  # noqa: E731
    keep = ~segment_starts(segment_ids, batch, time)  # [B,T]: False where the state restarts
    h = (jnp.zeros((batch, channels, state), f32) if initial_state is None
         else initial_state.astype(f32))

    def step(h, inputs):  # h [B,D,N]
        x_t, delta_t, B_t, C_t, keep_t = inputs  # [B,D], [B,D], [B,D,N], [B,D,N], [B]
        decay = jnp.exp(delta_t[..., None] * A.astype(f32))  # [B,D,N]
        h = jnp.where(keep_t[:, None, None], decay * h, 0.0) + (delta_t * x_t)[..., None] * B_t
        return h, jnp.sum(C_t * h, axis=-1)  # [B,D]

    time_major = [jnp.swapaxes(v, 0, 1) for v in (x, delta, by_channel(B), by_channel(C), keep)]
    h_final, y = jax.lax.scan(step, h, time_major)
    y = jnp.swapaxes(y, 0, 1)  # [B,T,D]
    if D is not None:
        y = y + D.astype(f32) * x
    if z is not None:
        y = y * jax.nn.silu(z.astype(f32))
    return y, h_final


def random_inputs(
    key, *, batch: int, time: int, channels: int, state: int, groups: int = 1,
    dtype=jnp.float32, dt_shift: float = 0.0,
) -> dict[str, jax.Array]:
    """Random Mamba-1 style inputs, keyed by the argument names of selective_scan.

    ``dt_shift`` moves dt before softplus: +4 gives large steps (strong decay),
    -8 tiny ones (almost no decay). A is negative (``-exp(normal)``); the
    initial state is included. Every array is in ``dtype`` except A (float32).
    """
    k = jax.random.split(key, 9)
    btd = (batch, time, channels)
    btgn = (batch, time, groups, state)
    inputs = dict(
        x=jax.random.normal(k[0], btd),
        dt=jax.random.normal(k[1], btd) * 0.5 + dt_shift,
        A=-jnp.exp(jax.random.normal(k[2], (channels, state)) * 0.5),
        B=jax.random.normal(k[3], btgn),
        C=jax.random.normal(k[4], btgn),
        D=jax.random.normal(k[5], (channels,)),
        z=jax.random.normal(k[6], btd),
        dt_bias=jax.random.normal(k[7], (channels,)) * 0.1,
        initial_state=jax.random.normal(k[8], (batch, channels, state)),
    )
    return {n: v if n == "A" else v.astype(dtype) for n, v in inputs.items()}
