"""The diagonal first-order linear scan ``h_t = a_t * h_{t-1} + x_t``, in pure JAX.

The core of RG-LRU (Griffin), LRU and HGRN: one independent scalar recurrence
per channel. Forms (the same numbers within tolerance):
  "recurrent": ``lax.scan`` over time, float32 state; the reference truth.
  "chunked": ``lax.associative_scan`` over time (Blelloch 1990): the pairs
      ``(a, x)`` compose as ``(a_r a_l, a_r x_l + x_r)``; its working set is the
      ``[B,T,D]`` output itself.
  "pallas": the kernels of ``pallas_kernels.linear_scan``.
  "auto": the measured policy of docs/design.md §3 (``effarch.ops._common.auto_policy``):
          on CPU "recurrent"; on GPU/TPU "chunked" until the kernel is verified
          there (``effarch.ops._common.VERIFIED_KERNELS``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effarch.op_contract import check_linear_scan_inputs, segment_starts
from effarch.ops import _common
from pallas_kernels import linear_scan as kernel

OP = "linear_scan"
IMPLEMENTATIONS = ("auto", "recurrent", "chunked", "pallas")


def resolve(implementation: str) -> _common.Choice:
    """Validates ``implementation``; ``"auto"`` becomes this platform's (forward, training) forms."""
    return _common.resolve_forms(OP, implementation, IMPLEMENTATIONS)


def linear_scan(
    x,
    a,
    *,
    initial_state=None,
    return_final_state: bool = False,
    segment_ids=None,
    implementation: str = "auto",
):
    """Diagonal linear recurrence ``h_t = a_t * h_{t-1} + x_t``.

    Args:
      x: ``[B,T,D]`` inputs.
      a: ``[B,T,D]`` decays (any real values; ``|a| <= 1`` for stability).
      initial_state: optional ``[B,D]`` state before step 0 (feeds only the
        first segment).
      return_final_state: also return the ``[B,D]`` float32 state after step T-1.
      segment_ids: optional ``[B,T]`` int; the state resets to zero where the id
        changes from the previous step (packed sequences).
      implementation: "auto", "recurrent", "chunked" or "pallas".

    Returns:
      ``(h, h_final)``: h ``[B,T,D]`` in x's dtype; h_final ``[B,D]`` float32 or None.

    Raises:
      ValueError: bad shapes, non-integer segment_ids or an unknown implementation.
    """
    check_linear_scan_inputs(x, a, initial_state, segment_ids)
    h, h_final = _common.run_forms(resolve(implementation), _form, x, a, initial_state, segment_ids)
    return h, (h_final if return_final_state else None)


def _form(name: str):
    """The form ``name`` as a function of ``(x, a, initial_state, segment_ids)``."""
    fn = {"pallas": kernel.linear_scan, "recurrent": linear_scan_recurrent,
          "chunked": linear_scan_chunked}[name]
    return lambda x, a, initial_state, segment_ids: fn(
        x, a, initial_state=initial_state, segment_ids=segment_ids)


def _prepare(x, a, initial_state, segment_ids):
    """Float32 inputs with the decay zeroed where a segment starts."""
    batch, time, channels = x.shape
    reset = segment_starts(segment_ids, batch, time)  # [B,T]
    a = jnp.where(reset[..., None], 0.0, a.astype(jnp.float32))
    if initial_state is None:
        h0 = jnp.zeros((batch, channels), jnp.float32)
    else:
        h0 = initial_state.astype(jnp.float32)
    return x.astype(jnp.float32), a, h0


def linear_scan_recurrent(x, a, *, initial_state=None, segment_ids=None):
    """The reference: one ``lax.scan`` step per time step. Returns ``(h, h_final)``."""
    xf, af, h0 = _prepare(x, a, initial_state, segment_ids)

    def step(h, inputs):  # h [B,D]
        x_t, a_t = inputs
        h = a_t * h + x_t
        return h, h

    h_final, h = jax.lax.scan(step, h0, (jnp.swapaxes(xf, 0, 1), jnp.swapaxes(af, 0, 1)))
    return jnp.swapaxes(h, 0, 1).astype(x.dtype), h_final


def _combine(left, right):
    """Composes ``h -> a_l h + x_l`` then ``h -> a_r h + x_r`` (associative)."""
    a_l, x_l = left
    a_r, x_r = right
    return a_r * a_l, a_r * x_l + x_r


def linear_scan_chunked(x, a, *, initial_state=None, segment_ids=None):
    """Parallel form by ``lax.associative_scan``. Returns ``(h, h_final)``."""
    xf, af, h0 = _prepare(x, a, initial_state, segment_ids)
    xf = xf.at[:, 0].add(af[:, 0] * h0)
    _, h = jax.lax.associative_scan(_combine, (af, xf), axis=1)
    return h.astype(x.dtype), h[:, -1]
