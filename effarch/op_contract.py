"""What an op and its Pallas kernel agree on about their inputs.

``effarch.ops`` (the XLA forms) and ``pallas_kernels`` (the kernels) both
import this module, and it imports neither: imports run one way, ops ->
kernels -> this contract (docs/design.md §2). It holds, written once:

* input checks: the shapes each op with a kernel accepts
  (:func:`check_linear_attention_inputs`, :func:`check_selective_scan_inputs`,
  :func:`check_linear_scan_inputs`, :func:`check_attention_inputs`) and the
  pieces every op's checks use;
  errors name the arrays, their shapes and the expected form;
* segments: ``segment_ids [B,T]`` as reset flags (:func:`segment_starts`,
  :func:`reset_index`) and, for chunked forms, per chunk
  (:func:`chunk_segments`);
* padding: :func:`pad_to_multiple`;
* masking: :data:`MASKED_LOG`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Log-space exponent used for masked-out entries: exp(MASKED_LOG) == 0 exactly,
# and its gradient is 0, unlike masking after the exp (0 * inf = nan).
MASKED_LOG = -jnp.inf


# --------------------------------------------------------------------------
# Input checks.
# --------------------------------------------------------------------------


def describe(name: str, x) -> str:
    """``"q: shape (2, 8, 4, 16) float32"``, for error messages."""
    return f"{name}: shape {tuple(x.shape)} {jnp.dtype(x.dtype).name}"


def check_rank(name: str, x, rank: int, form: str) -> None:
    """Raises ValueError unless ``x.ndim == rank``; ``form`` is e.g. ``"[B,T,H,K]"``."""
    if x.ndim != rank:
        raise ValueError(f"{describe(name, x)}; expected rank {rank}, {name} {form}.")


def check_dims(op: str, expected: dict[str, int], **arrays_and_dims) -> None:
    """Checks named axis sizes agree across arrays.

    ``arrays_and_dims`` maps an array name to ``(array, form)`` where ``form``
    is the axis letters, e.g. ``"BTHK"``. ``expected`` is filled with the first
    size seen for each letter; a later mismatch raises a ValueError naming every
    array involved.
    """
    for name, (x, form) in arrays_and_dims.items():
        if x is None:
            continue
        check_rank(name, x, len(form), "[" + ",".join(form) + "]")
        for letter, size in zip(form, x.shape):
            if letter == "_":
                continue
            if expected.setdefault(letter, size) != size:
                shapes = ", ".join(
                    f"{n} {tuple(a.shape)} as [{','.join(f)}]"
                    for n, (a, f) in arrays_and_dims.items()
                    if a is not None
                )
                raise ValueError(
                    f"{op}: axis {letter} of {name} is {size} but an earlier input "
                    f"has {letter}={expected[letter]}; got {shapes}."
                )


def check_segment_ids(segment_ids, batch: int, time: int) -> None:
    """segment_ids must be an integer ``[B,T]`` array matching the inputs."""
    if segment_ids is None:
        return
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(
            f"{describe('segment_ids', segment_ids)}; expected an integer array "
            f"[B,T] = [{batch},{time}]."
        )
    if tuple(segment_ids.shape) != (batch, time):
        raise ValueError(
            f"{describe('segment_ids', segment_ids)}; expected [B,T] = [{batch},{time}]."
        )


def check_linear_attention_inputs(q, k, v, log_decay, initial_state, segment_ids, chunk_size):
    """Checks ``linear_attention``'s inputs; returns the log decay, normalised.

    The log decay comes back as None, ``[B,T,H]`` or ``[B,T,H,K]`` float32: a
    ``[H]`` decay (one per head) is broadcast to ``[B,T,H]``.

    Raises:
      ValueError: naming the arrays, their shapes and the expected form.
    """
    op = "linear_attention"
    dims: dict[str, int] = {}
    check_dims(op, dims, q=(q, "BTGK"), k=(k, "BTGK"), v=(v, "BTHV"),
               initial_state=(initial_state, "BHKV"))
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{op}: {describe(name, x)}; expected a floating dtype.")
    b, t, g, kd = q.shape
    h = v.shape[2]
    if h % g:
        raise ValueError(f"{op}: q and k have {g} heads, v has {h}; the query/key heads (groups) must divide "
                         f"the value heads (q {tuple(q.shape)}, v {tuple(v.shape)}).")
    check_segment_ids(segment_ids, b, t)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size={chunk_size!r}; expected a positive int.")
    if log_decay is None:
        return None
    forms = {(h,): "[H]", (b, t, h): "[B,T,H]", (b, t, h, kd): "[B,T,H,K]"}
    if tuple(log_decay.shape) not in forms:
        raise ValueError(
            f"{op}: {describe('log_decay', log_decay)} fits no decay form; "
            f"expected None, [H]=({h},), [B,T,H]=({b}, {t}, {h}) or "
            f"[B,T,H,K]=({b}, {t}, {h}, {kd}) for q {tuple(q.shape)} and v {tuple(v.shape)}.")
    log_decay = log_decay.astype(jnp.float32)
    if log_decay.ndim == 1:
        log_decay = jnp.broadcast_to(log_decay, (b, t, h))
    return log_decay


def check_selective_scan_inputs(x, dt, A, B, C, D, z, dt_bias, initial_state,
                                segment_ids) -> dict[str, int]:
    """Checks ``selective_scan``'s inputs; returns the axis sizes (B, T, D, N, G).

    Raises:
      ValueError: naming the arrays, their shapes and the expected form.
    """
    op = "selective_scan"
    dims: dict[str, int] = {}
    check_dims(
        op,
        dims,
        x=(x, "BTD"),
        dt=(dt, "BTD"),
        A=(A, "DN"),
        B=(B, "BTGN"),
        C=(C, "BTGN"),
        D=(D, "D"),
        z=(z, "BTD"),
        dt_bias=(dt_bias, "D"),
        initial_state=(initial_state, "BDN"),
    )
    if dims["D"] % dims["G"]:
        raise ValueError(
            f"{op}: the number of groups G={dims['G']} (axis 2 of B {tuple(B.shape)} and "
            f"C {tuple(C.shape)}) must divide the channels D={dims['D']} of x "
            f"{tuple(x.shape)}."
        )
    check_segment_ids(segment_ids, dims["B"], dims["T"])
    return dims


def check_linear_scan_inputs(x, a, initial_state, segment_ids) -> dict[str, int]:
    """Checks ``linear_scan``'s inputs; returns the axis sizes (B, T, D).

    Raises:
      ValueError: naming the arrays, their shapes and the expected form.
    """
    dims: dict[str, int] = {}
    check_dims("linear_scan", dims, x=(x, "BTD"), a=(a, "BTD"),
               initial_state=(initial_state, "BD"))
    check_segment_ids(segment_ids, dims["B"], dims["T"])
    return dims


def check_attention_inputs(op: str, q, k, v, *, causal: bool, window, segment_ids, softcap):
    """Checks softmax attention's inputs (the XLA forms and the kernel); returns ``(q_seg, kv_seg, kind)``.

    ``kind`` is None (no segments), ``"runs"`` (one ``[B,T]`` array, T == S:
    its runs of equal ids, as :func:`reset_index` numbers them, for queries
    and keys alike) or ``"pair"`` (``(q_ids [B,T], kv_ids [B,S])``, as given).

    Raises:
      ValueError: naming the argument, its value or shape and the expected form.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_rank(name, x, 4, "[B,T,H,K]" if name == "q" else f"[B,S,Hkv,{name.upper()}]")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{op}: {describe(name, x)}; expected a floating dtype.")
    # Letters: T query time, S key time, H query heads, G key/value heads.
    check_dims(op, {}, q=(q, "BTHK"), k=(k, "BSGK"), v=(v, "BSG_"))
    (b, t, h, _), (_, s, hkv, _) = q.shape, k.shape
    if t == 0 or s == 0:
        raise ValueError(f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} need T >= 1 "
                         "queries and S >= 1 keys.")
    if h % hkv:
        raise ValueError(
            f"{op}: the {hkv} key/value heads (Hkv={hkv}) of k {tuple(k.shape)} must divide the "
            f"{h} query heads of q {tuple(q.shape)}; expected q [B,T,H,K], k [B,S,Hkv,K] with H % Hkv == 0."
        )
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"{op}: window={window!r}; expected None or an int >= 1.")
        if not causal:
            raise ValueError(f"{op}: window={window} is a causal sliding window (keys t - w < s <= t); "
                             "pass causal=True with it.")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{op}: softcap={softcap!r}; expected None or a float > 0.")
    if segment_ids is None:
        return None, None, None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError(f"{op}: segment_ids is a sequence of {len(segment_ids)} items; expected one "
                             "[B,T] array or a pair (q_segment_ids [B,T], kv_segment_ids [B,S]).")
        q_seg, kv_seg = segment_ids
        for name, ids, length in (("q_segment_ids", q_seg, t), ("kv_segment_ids", kv_seg, s)):
            try:
                check_segment_ids(ids, b, length)
            except ValueError as err:
                raise ValueError(f"{op}: {name} (item of the segment_ids pair): {err}") from None
        return q_seg, kv_seg, "pair"
    if t != s:
        raise ValueError(f"{op}: {describe('segment_ids', segment_ids)} is one array but q has T={t} and "
                         f"k has S={s}; with T != S pass a pair (q_segment_ids [B,T], kv_segment_ids [B,S]).")
    check_segment_ids(segment_ids, b, t)
    runs = reset_index(segment_ids, b, t)  # [B, T]: one id per run of equal ids
    return runs, runs, "runs"


# --------------------------------------------------------------------------
# Segments: where a recurrence restarts from zero.
# --------------------------------------------------------------------------


def segment_starts(segment_ids, batch: int, time: int) -> jax.Array:
    """``[B,T]`` bool, True where a new segment starts (never at t = 0).

    Position 0 never counts (``initial_state`` feeds the first segment); ids
    may repeat non-contiguously: a segment starts wherever the id changes.
    """
    if segment_ids is None:
        return jnp.zeros((batch, time), bool)
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]  # [B,T-1]
    return jnp.concatenate([jnp.zeros((batch, 1), bool), changed], axis=1)


def reset_index(segment_ids, batch: int, time: int) -> jax.Array:
    """Number of segment starts up to and including each step, ``[B,T]`` int32.

    Two steps t >= s see each other through the recurrence iff
    ``reset_index[t] == reset_index[s]``.
    """
    return jnp.cumsum(segment_starts(segment_ids, batch, time).astype(jnp.int32), axis=1)


class ChunkSegments(NamedTuple):
    """Segment flags of a sequence cut into ``M`` chunks of ``C`` steps.

    Attributes:
      resets: ``[B,M,C]`` int32, segment starts since the chunk start, up to
        and including each step. Steps t, s of one chunk see each other
        through the recurrence iff their ``resets`` agree.
      sees_entry: ``[B,M,C]`` bool, the state entering the chunk reaches the
        step (no segment start since the chunk start).
      reaches_exit: ``[B,M,C]`` bool, the step reaches the state leaving the
        chunk (no segment start after it in the chunk).
      carries: ``[B,M]`` bool, the state entering the chunk reaches its end
        (no segment start in the chunk).
    """

    resets: jax.Array
    sees_entry: jax.Array
    reaches_exit: jax.Array
    carries: jax.Array

    @property
    def same_segment(self) -> jax.Array:
        """``[B,M,C,C]`` bool, rows t and columns s of one chunk share a segment."""
        return self.resets[..., :, None] == self.resets[..., None, :]


def chunk_segments(segment_ids, batch: int, time: int, chunk: int) -> ChunkSegments:
    """The segment flags of every chunk of ``chunk`` steps (time padded to whole chunks).

    Padding steps start no segment. ``segment_ids`` None: one segment, no reset.
    """
    n_chunks = -(-time // chunk)
    starts = pad_to_multiple(segment_starts(segment_ids, batch, time), chunk, axis=1,
                             value=False)
    resets = jnp.cumsum(starts.reshape(batch, n_chunks, chunk).astype(jnp.int32), axis=-1)
    last = resets[..., -1:]  # [B,N,1]
    return ChunkSegments(resets=resets, sees_entry=resets == 0, reaches_exit=resets == last,
                         carries=last[..., 0] == 0)


# --------------------------------------------------------------------------
# Padding.
# --------------------------------------------------------------------------


def pad_to_multiple(x, multiple: int, *, axis: int, value=0):
    """Pads ``axis`` of ``x`` at its end up to a multiple of ``multiple`` with ``value``.

    None passes through: optional inputs pad like the others.
    """
    if x is None:
        return None
    pad = -x.shape[axis] % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)
