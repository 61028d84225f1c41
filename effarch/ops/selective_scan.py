"""The selective scan of Mamba-1 (S6), in pure JAX: recurrent and chunked forms.

Per channel d and state index n (Gu & Dao 2023, "Mamba", Algorithm 2):

    delta_t = softplus(dt_t + dt_bias)                      # [B,T,D]
    h_t     = exp(delta_t A) * h_{t-1} + delta_t B_t x_t    # [B,D,N]
    y_t     = C_t . h_t + D x_t                             # sum over N
    y_t    *= silu(z_t)                                     # when z is given

B and C are shared by groups of channels: channel d reads group d // (D // G).
Internally channels are split as ``D = G * P`` (P channels per group), so the
group broadcast is a reshape, never a copy of B or C per channel.

Forms (every one gives the same numbers within tolerance):
  "recurrent": ``lax.scan`` over time with a float32 ``[B,D,N]`` state; the
      reference truth.
  "chunked": ``lax.scan`` over chunks of ``CHUNK_SIZE`` steps and a parallel
      ``lax.associative_scan`` inside each chunk. Each chunk is rematerialised in
      the backward pass, so only chunk-boundary states are kept: memory is
      ``O(B*C*D*N + B*D*N*T/C)``, never ``[B,T,D,N]``.
  "pallas": the kernels of ``pallas_kernels.selective_scan``.
  "auto": the measured policy of docs/design.md §3 (``effarch.ops._common.auto_policy``):
          "chunked" (on CPU neither XLA form is measurably faster, and the
          chunked one never holds [B,T,D,N] for the backward pass); on
          GPU/TPU "chunked" until the kernel is verified there
          (``effarch.ops._common.VERIFIED_KERNELS``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effarch.op_contract import check_selective_scan_inputs, pad_to_multiple, segment_starts
from effarch.ops import _common
from pallas_kernels import selective_scan as kernel

OP = "selective_scan"
IMPLEMENTATIONS = ("auto", "recurrent", "chunked", "pallas")
CHUNK_SIZE = 64


# On CPU, "auto" trains with the recurrent form while the states its backward saves, B*T*D*N float32,
# stay within this (docs/design.md §3): 1.6-1.7x faster than chunked with gradients at T = 256..4096,
# but about 4.7x these bytes of temporaries (150 MiB at B=1, T=1024, D=512, N=16), 8x chunked's at T=4096.
RECURRENT_TRAINING_MAX_BYTES = 32 * 2**20


def resolve(implementation: str, state_bytes: int | None = None) -> _common.Choice:
    """Validates ``implementation``; ``"auto"`` becomes this platform's (forward, training) forms.

    ``state_bytes``: ``B*T*D*N*4`` of the call; on CPU at most
    :data:`RECURRENT_TRAINING_MAX_BYTES` makes the training form recurrent.
    """
    choice = _common.resolve_forms(OP, implementation, IMPLEMENTATIONS)
    if (implementation == "auto" and _common.platform() == "cpu" and state_bytes is not None
            and state_bytes <= RECURRENT_TRAINING_MAX_BYTES):
        choice = choice._replace(training="recurrent")
    return choice


def selective_scan(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    *,
    dt_bias=None,
    dt_softplus: bool = True,
    initial_state=None,
    return_final_state: bool = False,
    segment_ids=None,
    implementation: str = "auto",
):
    """Mamba-1 selective scan.

    Args:
      x: ``[B,T,D]`` inputs.
      dt: ``[B,T,D]`` step sizes before ``dt_bias`` and softplus.
      A: ``[D,N]`` state matrix (diagonal per channel; negative for decay).
      B: ``[B,T,G,N]`` input projections, G divides D.
      C: ``[B,T,G,N]`` output projections.
      D: optional ``[D]`` skip weights.
      z: optional ``[B,T,D]`` gate; the output is multiplied by ``silu(z)``.
      dt_bias: optional ``[D]`` added to dt.
      dt_softplus: apply softplus to ``dt + dt_bias``.
      initial_state: optional ``[B,D,N]`` state before step 0 (feeds only the
        first segment).
      return_final_state: also return the ``[B,D,N]`` float32 state after the
        last step.
      segment_ids: optional ``[B,T]`` int; the state resets to zero where the id
        changes from the previous step (packed sequences).
      implementation: "auto", "recurrent", "chunked" or "pallas".

    Returns:
      ``(y, h)``: y ``[B,T,D]`` in x's dtype; h ``[B,D,N]`` float32 or None.

    Raises:
      ValueError: bad shapes, G not dividing D, non-integer segment_ids or an
        unknown implementation.
    """
    check_selective_scan_inputs(x, dt, A, B, C, D, z, dt_bias, initial_state, segment_ids)

    def form(name):  # a function of the arrays, dt_softplus bound
        fn = {"pallas": kernel.selective_scan, "recurrent": selective_scan_recurrent,
              "chunked": selective_scan_chunked}[name]
        return lambda x, dt, A, B, C, D, z, dt_bias, initial_state, segment_ids: fn(
            x, dt, A, B, C, D, z, dt_bias=dt_bias, dt_softplus=dt_softplus,
            initial_state=initial_state, segment_ids=segment_ids)

    state_bytes = x.shape[0] * x.shape[1] * x.shape[2] * A.shape[-1] * 4  # the recurrent backward's saved states
    y, h = _common.run_forms(resolve(implementation, state_bytes), form, x, dt, A, B, C, D, z, dt_bias,
                             initial_state, segment_ids)
    return y, (h if return_final_state else None)


def step_size(dt, dt_bias, dt_softplus: bool):
    """``delta = softplus(dt + dt_bias)`` (or without softplus), float32 ``[B,T,D]``."""
    delta = dt.astype(jnp.float32)
    if dt_bias is not None:
        delta = delta + dt_bias.astype(jnp.float32)
    return jax.nn.softplus(delta) if dt_softplus else delta


def _by_group(v, groups: int):
    """``[B,T,D]`` -> ``[B,T,G,P]`` in float32 (channel d = g * P + p)."""
    return v.astype(jnp.float32).reshape(*v.shape[:2], groups, v.shape[2] // groups)


def _transition(delta, x, A, B, reset):
    """Decay and input of one or more steps, grouped channels.

    Args:
      delta, x: ``[..., G, P]``; A: ``[G, P, N]``; B: ``[..., G, N]``;
      reset: ``[...]`` bool, True where the state restarts from zero.
    Returns:
      ``(a, u)``, each ``[..., G, P, N]``: ``h_t = a_t * h_{t-1} + u_t``.
    """
    a = jnp.exp(delta[..., None] * A)
    a = jnp.where(reset[..., None, None, None], 0.0, a)
    u = (delta * x)[..., None] * B[..., :, None, :]
    return a, u


def _readout(h, C):
    """``y = C . h``: h ``[..., G, P, N]``, C ``[..., G, N]`` -> ``[..., G, P]``."""
    return jnp.sum(h * C[..., :, None, :], axis=-1)


def _prepare(x, dt, A, B, C, dt_bias, dt_softplus, initial_state, segment_ids):
    """Float32 grouped inputs shared by both XLA forms."""
    batch, time, channels = x.shape
    groups, state = B.shape[2], A.shape[1]
    delta = _by_group(step_size(dt, dt_bias, dt_softplus), groups)  # [B,T,G,P]
    xg = _by_group(x, groups)  # [B,T,G,P]
    Ag = A.astype(jnp.float32).reshape(groups, channels // groups, state)  # [G,P,N]
    Bf, Cf = B.astype(jnp.float32), C.astype(jnp.float32)  # [B,T,G,N]
    reset = segment_starts(segment_ids, batch, time)  # [B,T]
    if initial_state is None:
        h0 = jnp.zeros((batch, groups, channels // groups, state), jnp.float32)
    else:
        h0 = initial_state.astype(jnp.float32).reshape(batch, groups, -1, state)
    return delta, xg, Ag, Bf, Cf, reset, h0


def _finish(y, x, D, z, h):
    """Adds the skip, applies the gate, restores ``[B,T,D]`` and x's dtype."""
    batch, time, channels = x.shape
    y = y.reshape(batch, time, channels)
    if D is not None:
        y = y + D.astype(jnp.float32) * x.astype(jnp.float32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(x.dtype), h.reshape(batch, channels, -1)


def selective_scan_recurrent(
    x, dt, A, B, C, D=None, z=None, *, dt_bias=None, dt_softplus=True,
    initial_state=None, segment_ids=None,
):
    """The reference: one ``lax.scan`` step per time step. Returns ``(y, h_final)``."""
    delta, xg, Ag, Bf, Cf, reset, h0 = _prepare(
        x, dt, A, B, C, dt_bias, dt_softplus, initial_state, segment_ids
    )

    def step(h, inputs):  # h [B,G,P,N]
        delta_t, x_t, B_t, C_t, reset_t = inputs
        a, u = _transition(delta_t, x_t, Ag, B_t, reset_t)
        h = a * h + u
        return h, _readout(h, C_t)

    time_major = [jnp.swapaxes(v, 0, 1) for v in (delta, xg, Bf, Cf, reset)]
    h, y = jax.lax.scan(step, h0, time_major)
    return _finish(jnp.swapaxes(y, 0, 1), x, D, z, h)


def _combine(left, right):
    """Composes ``h -> a_l h + u_l`` then ``h -> a_r h + u_r`` (associative)."""
    a_l, u_l = left
    a_r, u_r = right
    return a_r * a_l, a_r * u_l + u_r


def selective_scan_chunked(
    x, dt, A, B, C, D=None, z=None, *, dt_bias=None, dt_softplus=True,
    initial_state=None, segment_ids=None, chunk_size: int = CHUNK_SIZE,
):
    """Chunked parallel form: associative scan in a chunk, recurrence across chunks.

    Padding steps get ``delta = 0`` (decay 1, input 0), so the final state is
    the state after step T-1. Returns ``(y, h_final)``.
    """
    time = x.shape[1]
    chunk = min(chunk_size, time)
    delta, xg, Ag, Bf, Cf, reset, h0 = _prepare(
        x, dt, A, B, C, dt_bias, dt_softplus, initial_state, segment_ids
    )
    padded = [pad_to_multiple(v, chunk, axis=1) for v in (delta, xg, Bf, Cf, reset)]
    n_chunks = padded[0].shape[1] // chunk

    def by_chunk(v):  # [B, nC*C, ...] -> [nC, B, C, ...]
        v = v.reshape(v.shape[0], n_chunks, chunk, *v.shape[2:])
        return jnp.swapaxes(v, 0, 1)

    @jax.checkpoint
    def chunk_step(h, inputs):  # h [B,G,P,N]
        delta_c, x_c, B_c, C_c, reset_c = inputs  # [B,C,...]
        a, u = _transition(delta_c, x_c, Ag, B_c, reset_c)  # [B,C,G,P,N]
        u = u.at[:, 0].add(a[:, 0] * h)
        _, hs = jax.lax.associative_scan(_combine, (a, u), axis=1)
        return hs[:, -1], _readout(hs, C_c)

    h, y = jax.lax.scan(chunk_step, h0, [by_chunk(v) for v in padded])
    y = jnp.swapaxes(y, 0, 1).reshape(x.shape[0], n_chunks * chunk, *y.shape[3:])
    return _finish(y[:, :time], x, D, z, h)
