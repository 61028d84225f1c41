"""The delta rule and its generalisations: DeltaNet, Gated DeltaNet, RWKV-7.

Per head, with state ``S_t`` of shape ``[K, V]`` (float32):

delta rule (DeltaNet, Schlag et al. 2021; Gated DeltaNet, Yang et al. 2024)::

    S_t = exp(log_decay_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t

generalized delta rule (diagonal plus rank one, RWKV-7 "Goose", Peng et al. 2025)::

    S_t = diag(exp(log_decay_t)) S_{t-1} + a_t (b_t^T S_{t-1}) + k_t v_t^T
    o_t = scale * S_t^T q_t

The transition is not diagonal, so the chunked forms are not the masked dual
of ``linear_attention``: the delta rule uses the WY / UT transform (Yang et al.
2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence
Length", section 3) with the gate of "Gated Delta Networks" (Yang, Kautz,
Hatamizadeh 2024, section 3.3); the generalized rule solves for what each step
reads from the state with the same kind of triangular system, per-channel
decays included. ``segment_ids`` restart the state from zero where the id
changes (``initial_state`` feeds only the first segment), as in every op.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from effarch.op_contract import (
    MASKED_LOG,
    ChunkSegments,
    check_dims,
    check_segment_ids,
    chunk_segments,
    describe,
    pad_to_multiple,
    segment_starts,
)
from effarch.ops import _common
from effarch.ops._common import resolve_forms, run_forms, segsum
from effarch.typing import Float, Keys, Queries, SegmentIds, State, Values, Array

DELTA_IMPLEMENTATIONS = ("auto", "recurrent", "chunked")
GENERALIZED_IMPLEMENTATIONS = ("auto", "recurrent", "chunked")
CPU_CHUNK_SIZE = _common.CPU_CHUNK_SIZE  # "auto"'s chunk cap on CPU, under jax.grad (the forward is recurrent)

Beta = Float[Array, "B T H"]
ScalarLogDecay = Float[Array, "B T H"]
ChannelLogDecay = Float[Array, "B T H K"]
# One step of a recurrence: (state [B,H,K,V], inputs at step t) -> new state.
Update = Callable[[jax.Array, tuple[jax.Array, ...]], jax.Array]


def _forward_substitution(tri: jax.Array, rhs: jax.Array) -> jax.Array:
    """``x_i = rhs_i - sum_{j<i} tri[i, j] x_j``: one row per ``fori_loop`` step."""
    c = tri.shape[-1]
    columns = jnp.arange(c)

    def row(i, x):  # rows < i of x are solved, the rest are still zero
        lower_i = jnp.where(columns < i, jax.lax.dynamic_index_in_dim(tri, i, -2, False), 0.0)
        rhs_i = jax.lax.dynamic_index_in_dim(rhs, i, -2, False)
        x_i = rhs_i - jnp.einsum("...j,...jf->...f", lower_i, x)
        return jax.lax.dynamic_update_index_in_dim(x, x_i, i, -2)

    return jax.lax.fori_loop(0, c, row, jnp.zeros_like(rhs))


# Diagonal blocks of the triangular inverse are solved by forward substitution
# in blocks of at most this many rows; the blocks below them are matmuls.
INVERSE_BLOCK = 16


def unit_lower_inverse(tri: jax.Array) -> jax.Array:
    """``(I + N)^{-1}`` for ``N`` the strictly lower triangle of ``tri``.

    Blocked, as fla's ``solve_tril``: the diagonal blocks (at most
    :data:`INVERSE_BLOCK` rows, all at once) by forward substitution on the
    identity, then block row ``i`` below them as
    ``-D_i^{-1} N[i, :i] (I + N)^{-1}[:i, :i]``, one matmul chain per block
    row. So ``C / 16 + 16`` sequential steps instead of ``C``, and the solve's
    backward needs no sequential step at all.

    Args:
      tri: ``[..., C, C]``; its diagonal and upper triangle are ignored.
    Returns:
      ``[..., C, C]``, unit lower triangular.
    """
    c = tri.shape[-1]
    block = max(d for d in range(1, min(c, INVERSE_BLOCK) + 1) if c % d == 0)
    n_blocks, lead = c // block, tri.shape[:-2]
    lower = jnp.where(jnp.tril(jnp.ones((c, c), bool), -1), tri, 0.0)
    blocks = lower.reshape(*lead, n_blocks, block, n_blocks, block)
    on_diagonal = jnp.arange(n_blocks)
    diagonal = jnp.moveaxis(blocks[..., on_diagonal, :, on_diagonal, :], 0, -3)  # [..., n, b, b]
    eye = jnp.eye(block, dtype=tri.dtype)
    diagonal_inv = _forward_substitution(diagonal, jnp.broadcast_to(eye, diagonal.shape))
    inverse = diagonal_inv[..., 0, :, :]  # the leading i·b rows and columns, solved so far
    for i in range(1, n_blocks):
        rows = lower[..., i * block:(i + 1) * block, :i * block]  # N[i, :i]: [..., b, i·b]
        below = -jnp.einsum("...ij,...jk,...kl->...il", diagonal_inv[..., i, :, :], rows, inverse)
        inverse = jnp.concatenate([
            jnp.concatenate([inverse, jnp.zeros((*lead, i * block, block), tri.dtype)], -1),
            jnp.concatenate([below, diagonal_inv[..., i, :, :]], -1),
        ], -2)
    return inverse


@jax.custom_vjp
def unit_lower_solve(tri: jax.Array, rhs: jax.Array) -> jax.Array:
    """Solves ``tri @ x = rhs`` for unit lower-triangular ``tri``, as ``unit_lower_inverse(tri) @ rhs``.

    Plain XLA ops, no LAPACK custom call (the CPU ``triangular_solve`` custom
    call was seen to stall the XLA CPU runtime). The diagonal of ``tri`` is
    taken as 1 and its upper triangle is ignored. The backward pass reuses the
    inverse: ``d rhs = L^{-T} g`` and ``d tri = -(d rhs) x^T`` (strictly lower).

    Args:
      tri: ``[..., C, C]``.
      rhs: ``[..., C, F]``.
    Returns:
      ``x [..., C, F]``.
    """
    return unit_lower_inverse(tri) @ rhs


def _unit_lower_solve_fwd(tri, rhs):
    inverse = unit_lower_inverse(tri)
    x = inverse @ rhs
    return x, (inverse, x)


def _unit_lower_solve_bwd(residuals, g):
    inverse, x = residuals
    c = inverse.shape[-1]
    g_rhs = jnp.swapaxes(inverse, -1, -2) @ g
    strictly_lower = jnp.tril(jnp.ones((c, c), bool), -1)
    g_tri = jnp.where(strictly_lower, -jnp.einsum("...if,...jf->...ij", g_rhs, x), 0.0)
    return g_tri.astype(inverse.dtype), g_rhs.astype(x.dtype)


unit_lower_solve.defvjp(_unit_lower_solve_fwd, _unit_lower_solve_bwd)


def delta_rule(
    q: Queries,
    k: Keys,
    v: Values,
    beta: Beta,
    log_decay: ScalarLogDecay | None = None,
    *,
    scale: float | None = None,
    initial_state: State | None = None,
    return_final_state: bool = False,
    segment_ids: SegmentIds | None = None,
    chunk_size: int = 64,
    implementation: str = "auto",
) -> tuple[Values, State | None]:
    """DeltaNet / Gated DeltaNet: ``S_t = g_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``.

    ``g_t = exp(log_decay_t)`` (1 when ``log_decay`` is None) and
    ``o_t = scale * S_t^T q_t``. Callers L2-normalise ``k`` (the op does not);
    with ``|k_t| = 1`` and ``0 <= beta_t <= 2`` the transition is a contraction.

    Args:
      q: queries ``[B,T,H,K]``.
      k: keys ``[B,T,H,K]``.
      v: values ``[B,T,H,V]``.
      beta: writing strengths ``[B,T,H]``.
      log_decay: None (DeltaNet) or ``[B,T,H]`` (Gated DeltaNet), ``<= 0``.
      scale: multiplies the readout; default ``K ** -0.5``.
      initial_state: ``[B,H,K,V]`` float32, the state before step 0; zeros if None.
      return_final_state: also return the state after the last step.
      segment_ids: ``[B,T]`` int; the state restarts from zero where the id changes.
      chunk_size: tokens per chunk of the chunked form (T is padded internally).
      implementation: ``"recurrent"`` (``lax.scan`` over steps, the reference),
        ``"chunked"`` (WY / UT transform inside chunks, scan across chunks) or
        ``"auto"`` (docs/design.md §3: on CPU recurrent when no gradient is
        taken, chunked in chunks of at most ``CPU_CHUNK_SIZE`` under
        ``jax.grad``; chunked on GPU/TPU).

    Returns:
      ``(o, S)``: ``o [B,T,H,V]`` in ``v.dtype``; ``S [B,H,K,V]`` float32 or None.
    """
    op = "delta_rule"
    dims: dict[str, int] = {}
    check_dims(
        op, dims, q=(q, "BTHK"), k=(k, "BTHK"), v=(v, "BTHV"), beta=(beta, "BTH"),
        initial_state=(initial_state, "BHKV"),
    )
    if log_decay is not None:
        if log_decay.ndim != 3:
            raise ValueError(
                f"{op}: {describe('log_decay', log_decay)}; expected None or "
                f"[B,T,H] = [{dims['B']},{dims['T']},{dims['H']}] (one gate per "
                "step and head; per-channel decay needs generalized_delta_rule)."
            )
        check_dims(op, dims, log_decay=(log_decay, "BTH"))
    _check_common(op, q, segment_ids, chunk_size)
    choice = resolve_forms(op, implementation, DELTA_IMPLEMENTATIONS)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    chunk_size = _common.auto_chunk_size(implementation, chunk_size)
    if log_decay is None:
        log_decay = jnp.zeros(beta.shape, jnp.float32)

    def form(name):  # a function of the arrays, scale and chunk_size bound
        if name == "recurrent":
            return lambda *arrays: _delta_rule_recurrent(*arrays, scale=scale)
        return lambda *arrays: _delta_rule_chunked(*arrays, scale=scale, chunk_size=chunk_size)

    o, state = run_forms(choice, form, q, k, v, beta, log_decay, initial_state, segment_ids)
    return o, state if return_final_state else None


def generalized_delta_rule(
    q: Queries,
    k: Keys,
    v: Values,
    a: Keys,
    b: Keys,
    log_decay: ChannelLogDecay,
    *,
    scale: float | None = None,
    initial_state: State | None = None,
    return_final_state: bool = False,
    segment_ids: SegmentIds | None = None,
    chunk_size: int = 16,
    implementation: str = "auto",
) -> tuple[Values, State | None]:
    """Diagonal-plus-rank-one transition: ``S_t = (diag(w_t) + a_t b_t^T) S_{t-1} + k_t v_t^T``.

    ``w_t = exp(log_decay_t)`` per key channel and ``o_t = scale * S_t^T q_t``.
    The rank-one term acts on the undecayed ``S_{t-1}``.

    RWKV-7 (Peng et al. 2025, the ``wkv7`` kernel of BlinkDL/RWKV-LM, whose
    state is our ``S^T``) maps as: ``q = r``; ``k`` the modified key
    ``k * (1 + (iclr - 1) * k_a)``; ``v = v``; ``a = -kappa_hat * iclr`` and
    ``b = kappa_hat`` (``kappa_hat`` the L2-normalised removal key ``kk``,
    ``iclr`` the in-context learning rate ``sigmoid(a0 + ...)``);
    ``log_decay = -exp(-0.5) * sigmoid(w0 + w)`` (the log of RWKV-7's ``w``).
    RWKV-7 reads out unscaled: its mixer passes ``scale=1.0`` explicitly; the
    bonus ``(r . (k * r_k)) v`` is the mixer's, not this op's.

    The delta rule is the case ``a = -exp(log_decay) * beta * k``, ``b = k``,
    keys ``beta * k`` and ``log_decay`` broadcast over K.

    Args:
      q: queries ``[B,T,H,K]``.
      k: keys ``[B,T,H,K]`` (written with ``v``).
      v: values ``[B,T,H,V]``.
      a: ``[B,T,H,K]``, the column of the rank-one term.
      b: ``[B,T,H,K]``, the row of the rank-one term (what is read from S).
      log_decay: ``[B,T,H,K]``, per key channel, ``<= 0``.
      scale: multiplies the readout; default ``K ** -0.5`` like every op
        (RWKV-7 passes 1.0).
      initial_state: ``[B,H,K,V]`` float32, the state before step 0; zeros if None.
      return_final_state: also return the state after the last step.
      segment_ids: ``[B,T]`` int; the state restarts from zero where the id changes.
      chunk_size: tokens per chunk of the chunked form (T is padded
        internally). Exact per-channel decay sums are held only inside
        sub-chunks of at most 16 steps, so memory grows as ``O(T (16 + C/16) K)``
        per head, not ``O(T C K)``: at B=1, T=1024, H=16, K=64 the forward and
        backward's temporaries are 0.60 GiB at C=16 and 0.68 GiB at C=64 (they
        were 2.08 GiB at C=64 with pairwise sums over the whole chunk).
      implementation: ``"recurrent"`` (``lax.scan`` over steps, the reference),
        ``"chunked"`` (triangular solve inside chunks, scan across chunks) or
        ``"auto"`` (as for :func:`delta_rule`, docs/design.md §3).

    Returns:
      ``(o, S)``: ``o [B,T,H,V]`` in ``v.dtype``; ``S [B,H,K,V]`` float32 or None.
    """
    op = "generalized_delta_rule"
    if log_decay is None:
        raise ValueError(
            f"{op}: log_decay is None; expected [B,T,H,K] (zeros for no decay)."
        )
    check_dims(
        op, {}, q=(q, "BTHK"), k=(k, "BTHK"), v=(v, "BTHV"), a=(a, "BTHK"),
        b=(b, "BTHK"), log_decay=(log_decay, "BTHK"),
        initial_state=(initial_state, "BHKV"),
    )
    _check_common(op, q, segment_ids, chunk_size)
    choice = resolve_forms(op, implementation, GENERALIZED_IMPLEMENTATIONS)
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def form(name):  # a function of the arrays, scale and chunk_size bound
        if name == "recurrent":
            return lambda *arrays: _generalized_recurrent(*arrays, scale=scale)
        return lambda *arrays: _generalized_chunked(*arrays, scale=scale, chunk_size=chunk_size)

    o, state = run_forms(choice, form, q, k, v, a, b, log_decay, initial_state, segment_ids)
    return o, state if return_final_state else None


def _check_common(op: str, q, segment_ids, chunk_size) -> None:
    """Checks shared by both ops: segment ids and chunk size."""
    batch, time = q.shape[:2]
    check_segment_ids(segment_ids, batch, time)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size={chunk_size!r}; expected a positive int.")


# --------------------------------------------------------------------------
# Recurrent forms: one step at a time, float32 state. The reference truth.
# --------------------------------------------------------------------------


def _delta_update(state, step):
    """``S <- g (S - beta k (k^T S)) + beta k v^T`` for one step, all heads."""
    k, v, beta, log_decay = step  # [B,H,K], [B,H,V], [B,H], [B,H]
    k_state = jnp.einsum("bhk,bhkv->bhv", k, state)  # [B,H,V]
    beta = beta[..., None, None]
    state = state - beta * k[..., :, None] * k_state[..., None, :]
    state = jnp.exp(log_decay)[..., None, None] * state
    return state + beta * k[..., :, None] * v[..., None, :]


def _generalized_update(state, step):
    """``S <- diag(w) S + a (b^T S) + k v^T`` for one step, all heads."""
    k, v, a, b, log_decay = step  # [B,H,K] except v [B,H,V]
    b_state = jnp.einsum("bhk,bhkv->bhv", b, state)  # [B,H,V]
    state = jnp.exp(log_decay)[..., None] * state
    state = state + a[..., :, None] * b_state[..., None, :]
    return state + k[..., :, None] * v[..., None, :]


def _recurrent(
    update: Update, inputs, q, scale, initial_state, segment_ids, value_dim, out_dtype
):
    """Runs ``update`` step by step over time and reads out ``scale * S_t^T q_t``.

    Args:
      update: one step of the recurrence, ``(S [B,H,K,V], inputs_t) -> S``.
      inputs: tuple of ``[B,T,H,...]`` arrays, sliced at each step for ``update``.
      q: queries ``[B,T,H,K]``.
      value_dim: V.
      out_dtype: dtype of ``o``.
    Returns:
      ``o [B,T,H,V]`` in ``out_dtype`` and the final state ``[B,H,K,V]`` float32.
    """
    batch, time, heads, key_dim = q.shape
    if initial_state is None:
        initial_state = jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)
    starts = segment_starts(segment_ids, batch, time)  # [B,T]

    def time_major(x):
        return jnp.moveaxis(x.astype(jnp.float32), 1, 0)

    def step(state, xs):
        start, q_t, inputs_t = xs
        state = jnp.where(start[:, None, None, None], 0.0, state)
        state = update(state, inputs_t)
        o_t = scale * jnp.einsum("bhk,bhkv->bhv", q_t, state)  # [B,H,V]
        return state, o_t

    xs = (jnp.moveaxis(starts, 1, 0), time_major(q), tuple(map(time_major, inputs)))
    final_state, o = jax.lax.scan(step, initial_state.astype(jnp.float32), xs)
    return jnp.moveaxis(o, 0, 1).astype(out_dtype), final_state


def _delta_rule_recurrent(q, k, v, beta, log_decay, initial_state, segment_ids, *, scale):
    return _recurrent(
        _delta_update, (k, v, beta, log_decay), q, scale, initial_state,
        segment_ids, v.shape[-1], v.dtype,
    )


def _generalized_recurrent(q, k, v, a, b, log_decay, initial_state, segment_ids, *, scale):
    return _recurrent(
        _generalized_update, (k, v, a, b, log_decay), q, scale, initial_state,
        segment_ids, v.shape[-1], v.dtype,
    )


# --------------------------------------------------------------------------
# Chunked form of the delta rule: WY / UT transform inside each chunk.
# --------------------------------------------------------------------------


def _to_chunks(arrays, segment_ids, chunk: int) -> tuple[tuple[jax.Array, ...], ChunkSegments]:
    """Pads time to a multiple of ``chunk`` and splits it into chunks.

    Args:
      arrays: ``[B,T,H,...]`` arrays, padded with zeros (a step with zero key,
        value, rank-one term and log decay leaves the state untouched).
      segment_ids: ``[B,T]`` or None.
      chunk: C.
    Returns:
      The arrays as float32 ``[B,M,H,C,...]``, and the chunks' segment flags.
    """
    batch, time = arrays[0].shape[:2]
    n_chunks = -(-time // chunk)

    def split(x):
        x = pad_to_multiple(x.astype(jnp.float32), chunk, axis=1)
        return jnp.swapaxes(x.reshape(batch, n_chunks, chunk, *x.shape[2:]), 2, 3)

    return tuple(map(split, arrays)), chunk_segments(segment_ids, batch, time, chunk)


def _from_chunks(o, time: int, out_dtype):
    """``[B,M,H,C,V]`` -> ``[B,T,H,V]`` in ``out_dtype``, padding dropped."""
    batch, n_chunks, heads, chunk, value_dim = o.shape
    o = jnp.swapaxes(o, 2, 3).reshape(batch, n_chunks * chunk, heads, value_dim)
    return o[:, :time].astype(out_dtype)


def _delta_rule_chunked(
    q, k, v, beta, log_decay, initial_state, segment_ids, *, scale, chunk_size
):
    """The chunked delta rule, exact up to float rounding.

    Within a chunk (positions i, j; ``G_i`` the cumulative log decay from the
    chunk start; ``S_0`` the state entering the chunk) the state is

        S_i = exp(G_i) S_0 + sum_{j<=i} exp(G_i - G_j) k_j u~_j^T,

    with pseudo-values ``u~ = U - W S_0`` solving the unit lower triangular system

        (I + A) [U | W] = diag(beta) [V | exp(G) K],
        A[i, j] = beta_i (k_i . k_j) exp(G_i - G_j)   (j < i).

    Then ``O = scale (exp(G) Q S_0 + (Q K^T o L) u~)`` with ``L[i, j] =
    exp(G_i - G_j)`` for ``j <= i``, and the state leaving the chunk is
    ``exp(G_C) S_0 + (exp(G_C - G) K)^T u~``. Every decay is an ``exp`` of a
    masked log (``MASKED_LOG`` outside the causal, same-segment pairs), so
    strong gates underflow to 0 instead of producing ``0 * inf``.
    """
    batch, time, heads, key_dim = q.shape
    value_dim, out_dtype = v.shape[-1], v.dtype
    chunk = min(chunk_size, time)
    f32 = jnp.float32
    (q, k, v, beta, log_decay), segments = _to_chunks(
        (q, k, v, beta, log_decay), segment_ids, chunk
    )  # [B,M,H,C,K], [B,M,H,C,K], [B,M,H,C,V], [B,M,H,C], [B,M,H,C]
    same_segment = segments.same_segment[:, :, None]  # [B,M,1,C,C]
    sees_entry = segments.sees_entry[:, :, None]  # [B,M,1,C]: no reset since chunk start

    # Pair decays as sums of the log decays between the two steps, not as
    # differences G_i - G_j of one cumsum: the differences' gradients reach
    # ld_r through cancelling O(1) terms and lose the tiny true gradient of
    # strongly gated steps in rounding error.
    pair_log = jnp.where(same_segment, segsum(log_decay), MASKED_LOG)  # [B,M,H,C,C]
    pair_decay = jnp.exp(pair_log)  # L: exp(G_i - G_j), 0 unless j <= i, same segment
    cum_log = jnp.cumsum(log_decay, axis=-1)  # G [B,M,H,C]
    entry_decay = jnp.exp(jnp.where(sees_entry, cum_log, MASKED_LOG))  # exp(G_i) [B,M,H,C]
    exit_decay = pair_decay[..., -1, :]  # [B,M,H,C]: exp(G_C - G_j)
    carry_decay = entry_decay[..., -1]  # [B,M,H]: exp(G_C)

    strictly_lower = jnp.tril(jnp.ones((chunk, chunk), bool), -1)
    kk = jnp.einsum("bmhik,bmhjk->bmhij", k, k)  # [B,M,H,C,C]
    tri = jnp.where(strictly_lower, beta[..., :, None] * kk * pair_decay, 0.0)
    tri = tri + jnp.eye(chunk, dtype=f32)  # I + A
    rhs = beta[..., None] * jnp.concatenate(
        [v, entry_decay[..., None] * k], axis=-1
    )  # [B,M,H,C,V+K]
    solved = unit_lower_solve(tri, rhs)
    u, w = solved[..., :value_dim], solved[..., value_dim:]  # [B,M,H,C,V], [B,M,H,C,K]
    exit_keys = exit_decay[..., None] * k  # [B,M,H,C,K]

    def across_chunks(state, xs):
        u_n, w_n, exit_keys_n, carry_n = xs
        pseudo_v = u_n - jnp.einsum("bhck,bhkv->bhcv", w_n, state)  # u~ [B,H,C,V]
        new_state = carry_n[..., None, None] * state + jnp.einsum(
            "bhck,bhcv->bhkv", exit_keys_n, pseudo_v
        )
        return new_state, (state, pseudo_v)

    if initial_state is None:
        initial_state = jnp.zeros((batch, heads, key_dim, value_dim), f32)
    chunk_major = (jnp.moveaxis(x, 1, 0) for x in (u, w, exit_keys, carry_decay))
    final_state, (entry_states, pseudo_v) = jax.lax.scan(
        across_chunks, initial_state.astype(f32), tuple(chunk_major)
    )
    entry_states = jnp.moveaxis(entry_states, 0, 1)  # [B,M,H,K,V]
    pseudo_v = jnp.moveaxis(pseudo_v, 0, 1)  # [B,M,H,C,V]

    scores = jnp.einsum("bmhik,bmhjk->bmhij", q, k) * pair_decay  # [B,M,H,C,C]
    o = jnp.einsum("bmhck,bmhkv->bmhcv", entry_decay[..., None] * q, entry_states)
    o = scale * (o + jnp.einsum("bmhij,bmhjv->bmhiv", scores, pseudo_v))
    return _from_chunks(o, time, out_dtype), final_state


# --------------------------------------------------------------------------
# Chunked form of the generalized rule: diagonal plus rank one (DPLR).
# --------------------------------------------------------------------------


SUB_CHUNK = 16


def _sub_chunk(chunk: int) -> int:
    """The largest divisor of ``chunk`` up to :data:`SUB_CHUNK`: the span of exact pairwise log sums."""
    return max(d for d in range(1, min(chunk, SUB_CHUNK) + 1) if chunk % d == 0)


def _reverse_exclusive_cumsum(x: jax.Array) -> jax.Array:
    """``out[..., j, :] = sum x[..., j+1:, :]`` along axis -2, as direct sums (no differences)."""
    from_here = jnp.flip(jnp.cumsum(jnp.flip(x, -2), axis=-2), -2)  # sum x[j:]
    return jnp.pad(from_here[..., 1:, :], [(0, 0)] * (x.ndim - 2) + [(0, 1), (0, 0)])


def _decayed_pairs(x, y, log_decay, *, inclusive: bool, sub: int) -> jax.Array:
    """``M[i, j] = sum_c x_ic y_jc exp(D_c(i, j))`` for one chunk's steps, 0 where ``j`` comes later.

    ``D = G_i - G_j`` for ``j <= i`` (``inclusive``) or ``G_{i-1} - G_j`` for ``j < i``,
    with ``G`` the cumulative log decay. Inside each sub-chunk of ``sub`` steps the
    exact pairwise sums are used (``[K, sub, sub]`` per sub-chunk); for ``j`` in an
    earlier sub-chunk ``q`` than ``i``'s ``p`` (starting at ``s``) the decay factors as
    ``exp(G_i - G_{s-1}) exp(G_{s-1} - G_j)``, the second the decay from ``j`` to the
    end of ``q`` times the whole sub-chunks strictly between ``q`` and ``p``.

    Args:
      x, y: ``[..., C, K]``.
      log_decay: ``[..., C, K]`` per-step log decays (<= 0).

    Returns:
      ``[..., C, C]`` float32 (segments not masked).
    """
    *lead, chunk, key_dim = x.shape
    m = chunk // sub
    x, y, log_decay = (t.reshape(*lead, m, sub, key_dim) for t in (x, y, log_decay))
    within = segsum(jnp.swapaxes(log_decay, -1, -2))  # G_i - G_j, j <= i: [..., m, K, sub, sub]
    if not inclusive:  # G_{i-1} - G_j: the row above, nothing in the first row
        within = jnp.pad(within[..., :-1, :], [(0, 0)] * (within.ndim - 2) + [(1, 0), (0, 0)],
                         constant_values=MASKED_LOG)
    diagonal = jnp.einsum("...pic,...pjc,...pcij->...pij", x, y, jnp.exp(within))  # [..., m, sub, sub]
    if m == 1:
        return diagonal.reshape(*lead, chunk, chunk)
    head = jnp.cumsum(log_decay, axis=-2)  # G_i - G_{s-1}, inclusive
    if not inclusive:
        head = jnp.pad(head[..., :-1, :], [(0, 0)] * (head.ndim - 2) + [(1, 0), (0, 0)])  # G_{i-1} - G_{s-1}
    tail = _reverse_exclusive_cumsum(log_decay)  # G_{e_q} - G_j: to the end of j's sub-chunk
    totals = jnp.sum(log_decay, axis=-2)  # [..., m, K]
    spans = segsum(jnp.swapaxes(totals, -1, -2))  # sum of totals q+1..p: [..., K, m, m]
    between = jnp.pad(spans[..., :-1, :], [(0, 0)] * (spans.ndim - 2) + [(1, 0), (0, 0)],
                      constant_values=MASKED_LOG)  # q+1..p-1, only for q < p
    across = jnp.einsum("...pic,...qjc,...cpq->...piqj", x * jnp.exp(head), y * jnp.exp(tail),
                        jnp.exp(between))  # [..., m, sub, m, sub]
    blocks = jnp.eye(m, dtype=bool)[:, None, :, None]  # [m, 1, m, 1]
    diagonal_full = jnp.einsum("...pij,pq->...piqj", diagonal, jnp.eye(m, dtype=diagonal.dtype))
    return jnp.where(blocks, diagonal_full, across).reshape(*lead, chunk, chunk)


def _generalized_chunked(
    q, k, v, a, b, log_decay, initial_state, segment_ids, *, scale, chunk_size
):
    """The chunked generalized delta rule, exact up to float rounding.

    Within a chunk (``G_i [K]`` the cumulative log decay from the chunk start,
    ``S_0`` the entering state, ``x_i = S_{i-1}^T b_i [V]`` what step i reads)

        S_i = diag(exp(G_i)) S_0 + sum_{j<=i} diag(exp(G_i - G_j)) (a_j x_j^T + k_j v_j^T),

    so the reads solve the unit lower triangular system

        (I - M_ba) X = B~ S_0 + M_bk V,   B~_i = b_i * exp(G_{i-1}),
        M_xy[i, j] = sum_c x_ic y_jc exp(G_{i-1,c} - G_{j,c})   (j < i),

    i.e. ``X = W S_0 + U``. The output is ``O = scale ((Q * exp(G)) S_0 +
    M_qa X + M_qk V)`` with ``M_qy`` using ``exp(G_i - G_j)`` for ``j <= i``.
    Decays are per channel, so a pair ``(i, j)`` needs a ``[K]`` vector of log
    sums. Held for every pair that is ``O(T C K)`` memory per head; instead
    :func:`_decayed_pairs` holds exact sums only inside sub-chunks of
    ``_sub_chunk(C)`` (at most 16) steps and factors the decay across them
    (both factors are decays, at most 1, so nothing overflows): ``O(T (c + C/c) K)``.
    """
    batch, time, heads, key_dim = q.shape
    value_dim, out_dtype = v.shape[-1], v.dtype
    chunk = min(chunk_size, time)
    f32 = jnp.float32
    (q, k, v, a, b, log_decay), segments = _to_chunks(
        (q, k, v, a, b, log_decay), segment_ids, chunk
    )  # [B,M,H,C,K] each but v [B,M,H,C,V]
    same_segment = segments.same_segment[:, :, None, None]  # [B,M,1,1,C,C]: over H and K
    sees_entry = segments.sees_entry[:, :, None, :, None]  # [B,M,1,C,1]

    cum_log = jnp.cumsum(log_decay, axis=-2)  # G_i [B,M,H,C,K]
    cum_log_before = jnp.pad(cum_log[..., :-1, :], [(0, 0)] * 3 + [(1, 0), (0, 0)])
    entry_decay = jnp.exp(jnp.where(sees_entry, cum_log, MASKED_LOG))  # exp(G_i)
    read_decay = jnp.exp(jnp.where(sees_entry, cum_log_before, MASKED_LOG))  # exp(G_{i-1})
    # exp(G_C - G_j): the decay from step j to the chunk end, as a direct (reverse) sum.
    to_end = _reverse_exclusive_cumsum(log_decay)  # [B,M,H,C,K]
    reaches_end = segments.same_segment[:, :, None, -1, :, None]  # [B,M,1,C,1]: j in the last step's segment
    exit_decay = jnp.exp(jnp.where(reaches_end, to_end, MASKED_LOG))
    carry_decay = entry_decay[..., -1, :]  # exp(G_C) [B,M,H,K]
    sub = _sub_chunk(chunk)

    def pairs(x, y, inclusive):  # M_xy [B,M,H,C,C]
        m_xy = _decayed_pairs(x, y, log_decay, inclusive=inclusive, sub=sub)
        return jnp.where(same_segment[..., 0, :, :], m_xy, 0.0)

    tri = jnp.eye(chunk, dtype=f32) - pairs(b, a, inclusive=False)  # I - M_ba
    rhs = jnp.concatenate(
        [b * read_decay, jnp.einsum("bmhij,bmhjv->bmhiv", pairs(b, k, inclusive=False), v)], axis=-1
    )  # [B~ | M_bk V]: [B,M,H,C,K+V]
    solved = unit_lower_solve(tri, rhs)
    w, u = solved[..., :key_dim], solved[..., key_dim:]  # [B,M,H,C,K], [B,M,H,C,V]

    def across_chunks(state, xs):
        w_n, u_n, exit_a, exit_k, v_n, carry_n = xs
        reads = u_n + jnp.einsum("bhck,bhkv->bhcv", w_n, state)  # X [B,H,C,V]
        new_state = (
            carry_n[..., None] * state
            + jnp.einsum("bhck,bhcv->bhkv", exit_a, reads)
            + jnp.einsum("bhck,bhcv->bhkv", exit_k, v_n)
        )
        return new_state, (state, reads)

    if initial_state is None:
        initial_state = jnp.zeros((batch, heads, key_dim, value_dim), f32)
    chunk_major = tuple(
        jnp.moveaxis(x, 1, 0)
        for x in (w, u, exit_decay * a, exit_decay * k, v, carry_decay)
    )
    final_state, (entry_states, reads) = jax.lax.scan(
        across_chunks, initial_state.astype(f32), chunk_major
    )
    entry_states = jnp.moveaxis(entry_states, 0, 1)  # [B,M,H,K,V]
    reads = jnp.moveaxis(reads, 0, 1)  # [B,M,H,C,V]

    o = jnp.einsum("bmhck,bmhkv->bmhcv", entry_decay * q, entry_states)
    o = o + jnp.einsum("bmhij,bmhjv->bmhiv", pairs(q, a, inclusive=True), reads)
    o = scale * (o + jnp.einsum("bmhij,bmhjv->bmhiv", pairs(q, k, inclusive=True), v))
    return _from_chunks(o, time, out_dtype), final_state
