"""The truth the kernels are tested against: the float32 recurrence.

One definition serves the whole project: ``effarch.ops.linear_attention``'s
recurrent form (a ``lax.scan`` over time of ``S_t = exp(log_decay_t) S_{t-1} +
k_t v_t^T``, ``o_t = scale S_t^T q_t``, state reset where ``segment_ids``
changes). This module gives it the kernel's signature.
"""

from __future__ import annotations

import jax.numpy as jnp

from effarch.ops.linear_attention import recurrent


def chunked_linear_attention_reference(q, k, v, log_decay, *, scale: float, initial_state,
                                       return_final_state: bool, segment_ids, **unused):
    """Float32 recurrent reference with the arguments of ``ops.chunked_linear_attention``.

    Args and returns as ``ops.chunked_linear_attention``; block-size and backend
    arguments are accepted and ignored. The output is float32.
    """
    del unused
    o, state = recurrent(
        q, k, v, log_decay, scale=scale, initial_state=initial_state, segment_ids=segment_ids)
    return o.astype(jnp.float32), (state if return_final_state else None)
