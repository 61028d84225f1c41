"""The truth the kernels are tested against: the float32 recurrence.

Per batch row and head, with a ``[K, V]`` state, one time step at a time::

    S_t = diag(exp(log_decay_t)) S_{t-1} + k_t v_t^T,    o_t = scale S_t^T q_t

the state restarting from zero where ``segment_ids`` changes: the plainest
form of gated linear attention, written on its own (it shares no code with the
kernels or with ``effarch.ops``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effarch.op_contract import segment_starts


def chunked_linear_attention_reference(q, k, v, log_decay=None, *, scale: float,
                                       initial_state=None, return_final_state: bool = False,
                                       segment_ids=None):
    """Float32 recurrence with the arguments of ``ops.chunked_linear_attention``.

    Args:
      q, k: ``[B,T,H,K]``; v: ``[B,T,H,V]``.
      log_decay: None (no decay), ``[B,T,H]`` (one per head) or ``[B,T,H,K]``
        (one per key channel).
      scale: output scale.
      initial_state: None or ``[B,H,K,V]`` (feeds the first segment).
      return_final_state: also return the state after the last step.
      segment_ids: None or ``[B,T]`` int.

    Returns:
      ``(o [B,T,H,V] float32, S [B,H,K,V] float32 or None)``.
    """
    f32 = jnp.float32
    b, t, h, kd = q.shape
    vd = v.shape[-1]
    if log_decay is None:
        decay = jnp.ones((b, t, h, kd), f32)
    else:
        log_decay = log_decay.astype(f32)
        decay = jnp.exp(log_decay if log_decay.ndim == 4 else log_decay[..., None])  # [B,T,H,K|1]
        decay = jnp.broadcast_to(decay, (b, t, h, kd))
    keep = ~segment_starts(segment_ids, b, t)  # [B,T]: False where the state restarts
    state = jnp.zeros((b, h, kd, vd), f32) if initial_state is None else initial_state.astype(f32)

    def step(state, inputs):  # state [B,H,K,V]
        q_t, k_t, v_t, a_t, keep_t = inputs  # [B,H,K], [B,H,K], [B,H,V], [B,H,K], [B]
        decayed = jnp.where(keep_t[:, None, None, None], a_t[..., None] * state, 0.0)
        state = decayed + jnp.einsum("bhk,bhv->bhkv", k_t, v_t)
        return state, scale * jnp.einsum("bhk,bhkv->bhv", q_t, state)

    time_major = [jnp.moveaxis(x, 1, 0) for x in (q.astype(f32), k.astype(f32), v.astype(f32),
                                                  decay, keep)]
    state, o = jax.lax.scan(step, state, time_major)
    return jnp.moveaxis(o, 0, 1), (state if return_final_state else None)
