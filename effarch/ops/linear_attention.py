"""The one gated linear recurrence, in every form (docs/design.md §1).

Per batch row and head, with state ``S_t`` of shape ``[K, V]`` (float32)::

    S_t = diag(a_t) S_{t-1} + k_t v_t^T        a_t = exp(log_decay_t)
    o_t = scale * S_t^T q_t

Three forms compute it, and tests hold them equal:

* ``"recurrent"``: the recurrence itself, a ``lax.scan`` over time. The truth.
* ``"quadratic"``: the dual (SSD / "structured masked attention", Dao & Gu 2024,
  eq. 5): ``O = scale * (Q K^T ∘ L) V`` with ``L[t, s] = prod_{r=s+1..t} a_r``.
* ``"chunked"``: quadratic inside chunks of ``C`` steps, the recurrence across
  chunk boundaries (Yang et al. 2023, GLA, section 3.2).

``"auto"`` follows the measured policy of docs/design.md §3
(``effarch.ops._common.auto_policy``): on CPU the recurrence when no gradient
is taken and the chunked form under ``jax.grad``; on GPU/TPU the chunked form
until the Pallas kernel is verified there.

Every ``exp`` in the parallel forms takes an argument ``<= 0`` (a sum of log
decays between two steps), and masked entries are masked in the exponent, so a
decay of ``-20`` per step over thousands of steps gives neither inf nor NaN,
forward or backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effarch.op_contract import (
    MASKED_LOG,
    check_linear_attention_inputs,
    chunk_segments,
    pad_to_multiple,
    reset_index,
    segment_starts,
)
from effarch.ops import _common
from effarch.typing import GroupedKeys, GroupedQueries, LogDecay, SegmentIds, State, Values
from pallas_kernels import chunked_linear_attention as kernel

OP = "linear_attention"
IMPLEMENTATIONS = ("auto", "recurrent", "quadratic", "chunked", "pallas")
# Sub-chunk length for per-key-channel decay inside a chunk (see _intra_per_channel).
SUBCHUNK = 16
CPU_CHUNK_SIZE = _common.CPU_CHUNK_SIZE  # "auto"'s chunk cap on CPU for a scalar (or no) decay


def linear_attention(
    q: GroupedQueries,
    k: GroupedKeys,
    v: Values,
    log_decay: LogDecay | None = None,
    *,
    scale: float | None = None,
    initial_state: State | None = None,
    return_final_state: bool = False,
    segment_ids: SegmentIds | None = None,
    chunk_size: int = 64,
    implementation: str = "auto",
) -> tuple[Values, State | None]:
    """Gated linear attention: ``S_t = exp(log_decay_t) S_{t-1} + k_t v_t^T``, ``o_t = scale S_t^T q_t``.

    Args:
      q: queries ``[B,T,H,K]``, or ``[B,T,G,K]`` with ``G`` dividing ``H``:
        each query/key head then serves ``H / G`` consecutive value heads
        (Mamba-2's ``ngroups``: B and C shared by the heads of a group; the
        chunked form computes their ``Q K^T`` once per group).
      k: keys, the shape of ``q``.
      v: values ``[B,T,H,V]``.
      log_decay: ``None`` (no decay: ``a = 1``), ``[H]`` (constant per head:
        RetNet), ``[B,T,H]`` (scalar per step: Mamba-2, mLSTM) or ``[B,T,H,K]``
        (per key channel: GLA, RWKV-6, HGRN-2). Values should be ``<= 0``.
      scale: multiplies the output; defaults to ``K ** -0.5``.
      initial_state: ``[B,H,K,V]`` state before the first step (float32); feeds
        only the first segment when ``segment_ids`` is given.
      return_final_state: also return the state after the last step.
      segment_ids: ``[B,T]`` integers for packed sequences: the state restarts
        from zero wherever the id changes from the previous step.
      chunk_size: chunk length ``C`` of the chunked form (any ``T`` works);
        ``"auto"`` on CPU caps it at ``CPU_CHUNK_SIZE`` for a scalar decay.
      implementation: ``"auto"``, ``"recurrent"``, ``"quadratic"``,
        ``"chunked"`` or ``"pallas"`` (kernels; interpreted on CPU).

    Returns:
      ``(o, S)``: ``o [B,T,H,V]`` in ``v.dtype``; ``S [B,H,K,V]`` float32 when
      ``return_final_state``, else ``None``.

    Raises:
      ValueError: shapes that fit no form, naming the arrays and their shapes.
    """
    log_decay = check_linear_attention_inputs(q, k, v, log_decay, initial_state, segment_ids,
                                              chunk_size)
    choice = _common.resolve_forms(OP, implementation, IMPLEMENTATIONS)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if log_decay is None or log_decay.ndim == 3:  # per-channel decay keeps its chunk on every platform
        chunk_size = _common.auto_chunk_size(implementation, chunk_size)

    def form(name):  # a function of the arrays, scale and chunk_size bound
        if name == "pallas":
            return lambda q, k, v, g, s0, ids: kernel.chunked_linear_attention(
                *expand_groups(q, k, v), v, g, scale=scale, initial_state=s0, return_final_state=True,
                segment_ids=ids, chunk_size=chunk_size)
        fn = {"recurrent": recurrent, "quadratic": quadratic, "chunked": chunked}[name]
        kwargs = {"chunk_size": chunk_size} if name == "chunked" else {}

        def run(q, k, v, g, s0, ids):
            if name != "chunked" or (g is not None and g.ndim == 4):  # only these take q, k by group
                q, k = expand_groups(q, k, v)
            o, state = fn(q, k, v, g, scale=scale, initial_state=s0, segment_ids=ids, **kwargs)
            return o.astype(v.dtype), state

        return run

    o, state = _common.run_forms(choice, form, q, k, v, log_decay, initial_state, segment_ids)
    return o, (state if return_final_state else None)


def expand_groups(q, k, v):
    """``q, k [B,T,G,K] -> [B,T,H,K]`` (each group repeated for its ``H / G`` value heads of ``v``)."""
    repeats = v.shape[2] // q.shape[2]
    if repeats == 1:
        return q, k
    return jnp.repeat(q, repeats, axis=2), jnp.repeat(k, repeats, axis=2)


def _f32(*xs):
    return tuple(None if x is None else x.astype(jnp.float32) for x in xs)


def _decay_state(state, a):
    """``diag(a) state`` for ``a`` of shape ``[..]`` (scalar per head) or ``[.., K]``."""
    if a.ndim == state.ndim - 2:  # [B,H] scalar decay
        return state * a[..., None, None]
    return state * a[..., None]  # [B,H,K] per key channel


def recurrent(q, k, v, log_decay, *, scale, initial_state=None, segment_ids=None):
    """The recurrence as a ``lax.scan`` over time, float32 state: the reference.

    Args and returns as :func:`linear_attention`, with ``log_decay`` already
    ``None``, ``[B,T,H]`` or ``[B,T,H,K]`` float32. The final state is always
    returned; the output is float32.
    """
    q, k, v = _f32(q, k, v)
    b, t, h, kd = q.shape
    vd = v.shape[-1]
    state = (jnp.zeros((b, h, kd, vd), jnp.float32) if initial_state is None
             else initial_state.astype(jnp.float32))
    keep = 1.0 - segment_starts(segment_ids, b, t).astype(jnp.float32)  # [B,T]
    time_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)

    def step(state, inputs):
        q_t, k_t, v_t, g_t, keep_t = inputs  # [B,H,K], [B,H,K], [B,H,V], decay, [B]
        state = state * keep_t[:, None, None, None]
        if g_t is not None:
            state = _decay_state(state, jnp.exp(g_t))
        state = state + jnp.einsum("bhk,bhv->bhkv", k_t, v_t)
        o_t = scale * jnp.einsum("bhk,bhkv->bhv", q_t, state)
        return state, o_t

    xs = (time_major(q), time_major(k), time_major(v), time_major(log_decay), time_major(keep))
    state, o = jax.lax.scan(step, state, xs)
    return jnp.moveaxis(o, 0, 1), state


def quadratic(q, k, v, log_decay, *, scale, initial_state=None, segment_ids=None):
    """The masked dual ``O = scale (Q K^T ∘ L) V`` (SSD), O(T^2) time and memory.

    Args and returns as :func:`recurrent`.
    """
    q, k, v = _f32(q, k, v)
    b, t, h, kd = q.shape
    r = reset_index(segment_ids, b, t)  # [B,T]
    visible = (r[:, :, None] == r[:, None, :]) & jnp.tril(jnp.ones((t, t), bool))  # [B,T,T]
    from_start = r == 0  # [B,T]: steps the initial state reaches
    if log_decay is None:
        scores = jnp.einsum("bthk,bshk->bhts", q, k) * visible[:, None]  # [B,H,T,T]
        decay_from_start = jnp.where(from_start[:, None, :, None], 0.0, MASKED_LOG)
        decay_to_end = jnp.where(visible[:, None, -1, :, None], 0.0, MASKED_LOG)
    elif log_decay.ndim == 3:
        g = jnp.moveaxis(log_decay, 1, 2)  # [B,H,T]
        seg = _common.segsum(g)  # [B,H,T,T]
        weights = jnp.exp(jnp.where(visible[:, None], seg, MASKED_LOG))
        scores = jnp.einsum("bthk,bshk->bhts", q, k) * weights
        cum = jnp.cumsum(g, axis=-1)  # [B,H,T] log decay from step 0 through t
        decay_from_start = jnp.where(from_start[:, None], cum, MASKED_LOG)[..., None]
        decay_to_end = jnp.where(visible[:, None, -1], seg[:, :, -1], MASKED_LOG)[..., None]
    else:
        g = jnp.moveaxis(log_decay, 1, 3)  # [B,H,K,T]
        seg = _common.segsum(g)  # [B,H,K,T,T]
        weights = jnp.exp(jnp.where(visible[:, None, None], seg, MASKED_LOG))
        scores = jnp.einsum("bthk,bshk,bhkts->bhts", q, k, weights)
        cum = jnp.cumsum(g, axis=-1)  # [B,H,K,T]
        decay_from_start = jnp.where(from_start[:, None, None], cum, MASKED_LOG)
        decay_from_start = jnp.swapaxes(decay_from_start, -1, -2)  # [B,H,T,K]
        decay_to_end = jnp.where(visible[:, None, None, -1], seg[..., -1, :], MASKED_LOG)
        decay_to_end = jnp.swapaxes(decay_to_end, -1, -2)  # [B,H,T,K]
    o = scale * jnp.einsum("bhts,bshv->bthv", scores, v)
    # decay_to_end[b,h,s(,k)]: log decay from step s to the last step, if visible.
    k_to_end = jnp.moveaxis(k, 1, 2) * jnp.exp(decay_to_end)  # [B,H,T,K]
    state = jnp.einsum("bhsk,bshv->bhkv", k_to_end, v)
    if initial_state is not None:
        s0 = initial_state.astype(jnp.float32)
        q_from_start = jnp.moveaxis(q, 1, 2) * jnp.exp(decay_from_start)  # [B,H,T,K]
        o = o + scale * jnp.einsum("bhtk,bhkv->bthv", q_from_start, s0)
        decay_all = decay_from_start[:, :, -1]  # [B,H,K] or [B,H,1]
        state = state + s0 * jnp.exp(decay_all)[..., None]
    return o, state


def chunked(q, k, v, log_decay, *, scale, initial_state=None, segment_ids=None, chunk_size=64):
    """Quadratic inside chunks of ``chunk_size`` steps, recurrent across them.

    Args and returns as :func:`recurrent`; any ``T`` (padded internally).
    With no decay or a scalar one, ``q`` and ``k`` may have ``G`` heads each
    shared by ``H / G`` value heads (:func:`linear_attention`): their scores
    are computed once per group, and the scalar decays are applied to the
    values and outputs instead, so nothing is repeated per head. A per-channel
    decay needs ``q, k`` with ``H`` heads (:func:`expand_groups`).
    Memory is ``O(B H T C)`` for the intra-chunk scores plus ``O(B H K V T / C)``
    for the states entering each chunk (kept for the backward pass).
    """
    if log_decay is not None and log_decay.ndim == 4:
        return _chunked_per_channel(q, k, v, log_decay, scale=scale, initial_state=initial_state,
                                    segment_ids=segment_ids, chunk_size=chunk_size)
    q, k, v = _f32(q, k, v)
    b, t, g, kd = q.shape
    h, vd = v.shape[2:]
    r = h // g  # value heads per group
    c, n, to_chunks, segments, same = _chunking(b, t, chunk_size, segment_ids)
    qc, kc = to_chunks(q), to_chunks(k)  # [B,M,C,G,K]
    vc = to_chunks(v).reshape(b, n, c, g, r, vd)  # [B,M,C,G,R,V]
    masked = lambda cond, x: jnp.where(cond, x, MASKED_LOG)

    scores = jnp.einsum("bmtgk,bmsgk->bmgts", qc, kc)  # [B,M,G,C,C], once per group
    if log_decay is None:
        cum = jnp.zeros((b, n, c, g, r), jnp.float32)
        weights = jnp.broadcast_to(same[:, :, None, None], (b, n, g, r, c, c)).astype(jnp.float32)
    else:
        decay = to_chunks(log_decay).reshape(b, n, c, g, r)  # [B,M,C,G,R]
        cum = jnp.cumsum(decay, axis=2)  # inclusive log decay from the chunk start
        seg = _common.segsum(jnp.moveaxis(decay, 2, -1))  # [B,M,G,R,C,C]
        weights = jnp.exp(masked(same[:, :, None, None], seg))
    o_intra = jnp.einsum("bmgrts,bmsgrv->bmtgrv", scores[:, :, :, None] * weights, vc)

    cum_end = cum[:, :, -1]  # [B,M,G,R]
    # Scalar decays commute with the contractions over K: since the chunk start on the output,
    # to the chunk end on the values.
    q_decay = jnp.exp(masked(segments.sees_entry[..., None, None], cum))  # [B,M,C,G,R]
    v_out = vc * jnp.exp(masked(segments.reaches_exit[..., None, None], cum_end[:, :, None] - cum))[..., None]
    chunk_decay = jnp.exp(masked(segments.carries[..., None, None], cum_end))  # [B,M,G,R]
    contribution = jnp.einsum("bmsgk,bmsgrv->bmgrkv", kc, v_out)  # [B,M,G,R,K,V]

    state = (jnp.zeros((b, h, kd, vd), jnp.float32) if initial_state is None
             else initial_state.astype(jnp.float32)).reshape(b, g, r, kd, vd)
    state, entering = _across_chunks(state, chunk_decay, contribution)  # entering: [B,M,G,R,K,V]
    o_inter = jnp.einsum("bmtgk,bmgrkv->bmtgrv", qc, entering) * q_decay[..., None]
    o = scale * (o_intra + o_inter).reshape(b, n * c, h, vd)[:, :t]
    return o, state.reshape(b, h, kd, vd)


def _chunked_per_channel(q, k, v, log_decay, *, scale, initial_state=None, segment_ids=None, chunk_size=64):
    """:func:`chunked` for a per-key-channel decay ``[B,T,H,K]`` (``q, k`` with ``H`` heads)."""
    q, k, v = _f32(q, k, v)
    b, t, h, kd = q.shape
    vd = v.shape[-1]
    c, n, to_chunks, segments, same = _chunking(b, t, chunk_size, segment_ids)
    qc, kc, vc = (to_chunks(x) for x in (q, k, v))  # [B,M,C,H,K|V]
    reach_q = segments.sees_entry[..., None, None]  # [B,M,C,1,1]: entering state reaches t
    reach_k = segments.reaches_exit[..., None, None]  # [B,M,C,1,1]: s reaches the chunk end
    carry = segments.carries[..., None, None]  # [B,M,1,1]: entering state reaches the end

    masked = lambda cond, x: jnp.where(cond, x, MASKED_LOG)
    g = to_chunks(log_decay)  # [B,M,C,H,K]
    cum = jnp.cumsum(g, axis=2)  # inclusive log decay from the chunk start
    scores = _intra_per_channel(qc, kc, g, cum, same)
    o_intra = jnp.einsum("bmhts,bmshv->bmthv", scores, vc)

    cum_end = cum[:, :, -1]  # [B,M,H,K]
    q_in = qc * jnp.exp(masked(reach_q, cum))  # [B,M,C,H,K]: decay since the chunk start
    k_out = kc * jnp.exp(masked(reach_k, cum_end[:, :, None] - cum))  # decay to the chunk end
    chunk_decay = jnp.exp(masked(carry, cum_end))  # [B,M,H,K]
    contribution = jnp.einsum("bmshk,bmshv->bmhkv", k_out, vc)  # [B,M,H,K,V]

    state = (jnp.zeros((b, h, kd, vd), jnp.float32) if initial_state is None
             else initial_state.astype(jnp.float32))
    state, entering = _across_chunks(state, chunk_decay, contribution)  # entering: [B,M,H,K,V]
    o_inter = jnp.einsum("bmthk,bmhkv->bmthv", q_in, entering)
    o = scale * (o_intra + o_inter).reshape(b, n * c, h, vd)[:, :t]
    return o, state


def _chunking(b: int, t: int, chunk_size: int, segment_ids):
    """The chunk length ``C``, chunk count ``M``, ``[B,T,...] -> [B,M,C,...]`` (padded), the segment flags
    of every chunk and ``same [B,M,C,C]``: step ``s`` is visible from step ``t`` inside its chunk."""
    c = min(chunk_size, t)
    n = -(-t // c)

    def to_chunks(x):
        return pad_to_multiple(x, c, axis=1).reshape(b, n, c, *x.shape[2:])

    segments = chunk_segments(segment_ids, b, t, c)
    return c, n, to_chunks, segments, segments.same_segment & jnp.tril(jnp.ones((c, c), bool))


def _across_chunks(state, chunk_decay, contribution):
    """The recurrence over chunks: ``S_m = decay_m S_{m-1} + contribution_m``.

    Args:
      state: ``[B, *heads, K, V]`` before the first chunk.
      chunk_decay: ``[B, M, *heads]`` (one decay per head) or ``[B, M, *heads, K]``.
      contribution: ``[B, M, *heads, K, V]``, each chunk's own state.
    Returns:
      ``(final state, entering [B, M, *heads, K, V])``: the state entering each chunk.
    """
    missing = (1,) * (contribution.ndim - chunk_decay.ndim)  # the K, V (or V) axes the decay broadcasts over

    def step(state, inputs):
        decay, contrib = inputs
        return state * decay.reshape(decay.shape + missing) + contrib, state

    state, entering = jax.lax.scan(
        step, state, (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(contribution, 1, 0)))
    return state, jnp.moveaxis(entering, 0, 1)


def _intra_per_channel(qc, kc, g, cum, same):
    """Intra-chunk scores for per-key-channel decay, stable in log space.

    ``scores[t, s] = sum_k q[t,k] k[s,k] exp(sum_{r=s+1..t} g[r,k])``. The chunk is
    split into sub-chunks of ``SUBCHUNK`` steps: pairs inside one sub-chunk use
    the full ``[c, c, K]`` decay tensor; a pair of sub-chunks ``i < j`` factors
    the decay at the boundary ``e`` (the end of sub-chunk ``i``), which lies
    between ``s`` and ``t``, so both factors ``exp(cum_t - cum_e)`` and
    ``exp(cum_e - cum_s)`` are ``<= 1`` (as in flash-linear-attention's GLA).

    Args:
      qc, kc: ``[B,M,C,H,K]``. g, cum: ``[B,M,C,H,K]`` log decays and their
        inclusive cumsum within each chunk. same: ``[B,M,C,C]`` visibility.
    Returns:
      ``[B,M,H,C,C]`` scores (rows t, columns s).
    """
    b, n, c, h, kd = qc.shape
    sub = SUBCHUNK if c % SUBCHUNK == 0 else c
    m = c // sub  # sub-chunks per chunk
    split = lambda x, i: x[:, :, i * sub:(i + 1) * sub]  # [B,M,c,...]
    rows = []
    for j in range(m):  # query sub-chunk
        row = []
        for i in range(m):  # key sub-chunk
            if i > j:
                row.append(jnp.zeros((b, n, h, sub, sub), qc.dtype))
            elif i == j:  # the full decay tensor inside one sub-chunk
                seg = _common.segsum(jnp.moveaxis(split(g, j), 2, -1))  # [B,M,H,K,c,c]
                weights = jnp.exp(jnp.where(jnp.tril(jnp.ones((sub, sub), bool)), seg,
                                            MASKED_LOG))
                row.append(jnp.einsum("bmthk,bmshk,bmhkts->bmhts", split(qc, j), split(kc, i),
                                      weights))
            else:  # factored at the end of sub-chunk i: both exponents <= 0
                boundary = cum[:, :, (i + 1) * sub - 1][:, :, None]  # [B,M,1,H,K]
                q_dec = split(qc, j) * jnp.exp(split(cum, j) - boundary)
                k_dec = split(kc, i) * jnp.exp(boundary - split(cum, i))
                row.append(jnp.einsum("bmthk,bmshk->bmhts", q_dec, k_dec))
        rows.append(jnp.concatenate(row, axis=-1))
    scores = jnp.concatenate(rows, axis=-2)  # [B,M,H,C,C]
    return scores * same[:, :, None]
