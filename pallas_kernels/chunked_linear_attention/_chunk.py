"""The math of one chunk, forward and backward, shared by the GPU and TPU kernels.

Four functions make both kernels: :func:`next_state` / :func:`previous_dstate`
carry the state (gradient) across one chunk, :func:`forward_chunk` /
:func:`backward_chunk` write one chunk's outputs (gradients) given the state
entering it (and the gradient of the one leaving it). The TPU kernel runs
them together on a sequential grid axis over chunks; the GPU kernels first
run the light state recurrence in a ``fori_loop`` and then the heavy per-chunk
work with a grid over chunks. ``Chunk`` says where the current chunk lies in
the refs a program sees.

Notation for one chunk of ``C`` steps (rows ``t``, columns ``s``):

* ``g [C,Kg]``: log decay summed from the chunk start up to and including each
  step (``Kg = 1`` scalar decay, ``Kg = K`` per key channel), computed in XLA.
* ``seg_in[t]``: step t still sees the state entering the chunk (no reset in
  between); ``seg_out[s]``: step s still reaches the state leaving the chunk.
* ``tot [Kg,1]``: log factor carrying the entering state to the chunk end
  (``g_last`` or ``-inf`` if the chunk holds a reset), a column.

Every ``exp`` takes a masked exponent ``<= 0`` (``exp(where(mask, diff, -inf))``).
Per-key-channel decay inside a chunk is split into sub-chunks of ``c`` steps:
a diagonal sub-block uses the full ``[c,c,K]`` decay tensor; an off-diagonal
pair (rows block ``i`` > columns block ``j``) factors the decay through a
reference row of ``g`` on the boundary between the two blocks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from effarch.op_contract import MASKED_LOG  # exp(MASKED_LOG) == 0: masks go in exponents


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Where the current chunk lies in the refs one program sees.

    Attributes:
      start: first row of the chunk in time-major refs (``[T,X]`` on GPU,
        ``[C,X]`` blocks on TPU, where it is 0).
      index: chunk number in chunk-major refs (``[N,C]`` rows, ``[N*X,Y]``
        stacked blocks on GPU; 0 on TPU).
      size: the chunk length ``C``.
    """

    start: Any
    index: Any
    size: int

    def rows(self, ref, i: int, n: int):
        """Rows ``i .. i+n`` of the chunk in a time-major ref: ``[n, X]``."""
        return ref[pl.ds(self.start + i, n), :]

    def store(self, ref, i: int, value) -> None:
        ref[pl.ds(self.start + i, value.shape[0]), :] = value.astype(ref.dtype)

    def row_form(self, ref, i: int, n: int):
        """Entries ``i .. i+n`` of the chunk from a chunk-major ``[N, C]`` ref: ``[1, n]``."""
        return ref[pl.ds(self.index, 1), pl.ds(i, n)]

    def block(self, ref, n: int):
        """The chunk's ``[n, Y]`` block of a ref stacking one block per chunk."""
        return ref[pl.ds(self.index * n, n), :]

    def store_block(self, ref, value) -> None:
        n = value.shape[0]
        ref[pl.ds(self.index * n, n), :] = value.astype(ref.dtype)


@dataclasses.dataclass(frozen=True)
class Refs:
    """Input refs of one program; ``None`` where a feature is off.

    Attributes:
      q, k: ``[T,K]`` time-major; v: ``[T,BV]``; do: ``[T,BV]`` (backward only).
      g: ``[T,Kg]`` in-chunk cumulative log decay, or None (no decay).
      g_row: ``[N,C]`` the same in row form (scalar decay only).
      tot: ``[N*Kg,1]`` log carry factor per chunk (None: no decay, no segments).
      r, r_row: segment starts since the chunk start ``[T,1]`` and ``[N,C]``
        (segments only): two steps of a chunk share a segment iff they agree.
      seg_in, seg_out: ``[T,1]`` int32 flags (segments only).
    """

    q: Any
    k: Any
    v: Any
    do: Any = None
    g: Any = None
    g_row: Any = None
    tot: Any = None
    r: Any = None
    r_row: Any = None
    seg_in: Any = None
    seg_out: Any = None

    @property
    def per_channel(self) -> bool:
        return self.g is not None and self.g_row is None


def _gate(log, mask):
    """``exp(where(mask, log, -inf))`` with ``log = 0`` when None; None means 1."""
    if mask is not None:
        log = jnp.where(mask, 0.0 if log is None else log, MASKED_LOG)
    return None if log is None else jnp.exp(log)


def _mul(x, factor):
    return x if factor is None else x * factor


def _dot(a, b, contract, dtype):
    """2D matmul in ``dtype`` accumulating in float32; ``contract`` = (a dim, b dim)."""
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
    return lax.dot_general(
        a.astype(dtype), b.astype(dtype), (((contract[0],), (contract[1],)), ((), ())),
        precision=precision, preferred_element_type=jnp.float32)


def mm(a, b, dtype):
    """``a @ b``."""
    return _dot(a, b, (1, 0), dtype)


def mm_nt(a, b, dtype):
    """``a @ b.T``."""
    return _dot(a, b, (1, 1), dtype)


def mm_tn(a, b, dtype):
    """``a.T @ b``."""
    return _dot(a, b, (0, 0), dtype)


def _iota(shape, axis):
    return lax.broadcasted_iota(jnp.int32, shape, axis)


class _SubChunks:
    """The sub-chunks of a chunk as a sequence of :class:`_Block`, each loaded where used.

    Indexing loads the block anew instead of keeping every sub-chunk's tensors
    live across the unrolled pair loops: on GPU those live tensors were what
    spilled registers.
    """

    def __init__(self, x: Refs, ch: Chunk, sub_chunk: int):
        self.x, self.ch, self.size = x, ch, sub_chunk

    def __len__(self):
        return self.ch.size // self.size

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index):
        if isinstance(index, slice):  # lazily: each block loads when the loop reaches it
            return (self[i] for i in range(len(self))[index])
        if not 0 <= index < len(self):
            raise IndexError(index)
        return _Block(self.x, self.ch, index * self.size, self.size)


class _Block:
    """Loaded quantities of rows ``i .. i+n`` of a chunk (a sub-chunk or the whole)."""

    def __init__(self, x: Refs, ch: Chunk, i: int, n: int):
        self.i, self.n = i, n
        rows = lambda ref: None if ref is None else ch.rows(ref, i, n)
        self.q, self.k, self.v, self.do = rows(x.q), rows(x.k), rows(x.v), rows(x.do)
        self.g = None if x.g is None else rows(x.g).astype(jnp.float32)  # [n, Kg]
        self.r = rows(x.r)  # [n, 1]
        self.seg_in = None if x.seg_in is None else rows(x.seg_in) != 0
        self.seg_out = None if x.seg_out is None else rows(x.seg_out) != 0
        g_last = None if x.g is None else ch.rows(x.g, ch.size - 1, 1)  # [1, Kg]
        self.f_in = _gate(self.g, self.seg_in)  # [n, Kg] state-in -> t
        self.f_out = _gate(None if g_last is None else g_last - self.g, self.seg_out)

    def same(self, x: Refs, ch: Chunk, j: int, m: int):
        """``[n, m]`` mask: rows of this block and steps ``j .. j+m`` share a segment."""
        if x.r is None:
            return None
        return self.r == ch.row_form(x.r_row, j, m)


def _and(a, b):
    return b if a is None else (a if b is None else a & b)


def _causal(n, strict=False):
    t, s = _iota((n, n), 0), _iota((n, n), 1)
    return t > s if strict else t >= s


def _diag_terms(x: Refs, blk: _Block, da_strict=None):
    """In-sub-chunk terms of per-channel decay, one key column ``s`` at a time.

    ``a[t, s] = sum_k q[t,k] k[s,k] exp(g[t,k] - g[s,k])`` for ``s <= t`` in one
    segment, and with ``da_strict [c, c]`` (zero unless ``s < t``) the matching
    ``dq [c, K]`` and ``dk [c, K]``. A ``lax.fori_loop`` over the ``c`` columns
    keeps every live tensor ``[c, K]``: the same sums as one ``[c, c, K]``
    tensor, which spilled kilobytes of registers per thread on sm_90
    (``benchmarks/kernel_compile.py``). Rows and columns are picked with iota
    masks, not slices, which neither Triton nor Mosaic lowers from a value.

    Returns:
      ``a`` alone, or ``(a, dq, dk)`` when ``da_strict`` is given; float32.
    """
    f32 = jnp.float32
    n = blk.n
    q, k, g = blk.q.astype(f32), blk.k.astype(f32), blk.g
    row = _iota((n, 1), 0)
    col = _iota((1, n), 1)
    key_row = _iota(k.shape, 0)

    def body(j, carry):
        pick = lambda m: jnp.sum(jnp.where(key_row == j, m, 0.0), 0, keepdims=True)  # noqa: E731
        k_j, g_j = pick(k), pick(g)  # [1, K]
        mask = row >= j
        if x.r is not None:
            r_j = jnp.sum(jnp.where(row == j, blk.r, 0), 0, keepdims=True)
            mask = mask & (blk.r == r_j)
        e = jnp.exp(jnp.where(mask, g - g_j, MASKED_LOG))  # [n, K] decay from s = j to t
        qe = q * e
        a = carry[0] + jnp.where(col == j, jnp.sum(qe * k_j, 1, keepdims=True), 0.0)
        if da_strict is None:
            return (a,)
        da_j = jnp.sum(jnp.where(col == j, da_strict, 0.0), 1, keepdims=True)  # [n, 1]
        dq = carry[1] + da_j * e * k_j
        dk = carry[2] + jnp.where(key_row == j, jnp.sum(da_j * qe, 0, keepdims=True), 0.0)
        return a, dq, dk

    carry = (jnp.zeros((n, n), f32),)
    if da_strict is not None:
        carry += (jnp.zeros(k.shape, f32), jnp.zeros(k.shape, f32))
    carry = lax.fori_loop(0, n, body, carry)
    return carry[0] if da_strict is None else carry


def _pair_factors(x: Refs, ch: Chunk, rows: _Block, cols: _Block, ref_row: int):
    """Factored decay of rows block > cols block through row ``ref_row`` of ``g``.

    Returns ``(fq [n,K], fk [m,K])`` with ``exp(g_t - g_s) = fq[t] * fk[s]``; the
    reference lies between the two blocks, so both exponents are ``<= 0``.
    """
    ref = ch.rows(x.g, ref_row, 1)  # [1, K]
    return jnp.exp(rows.g - ref), jnp.exp(ref - cols.g)


def _tot(x: Refs, ch: Chunk):
    """``[Kg, 1]`` log carry factor of the chunk, or None (factor 1)."""
    if x.tot is None:
        return None
    return ch.block(x.tot, 1 if x.g is None else x.g.shape[-1])


def next_state(x: Refs, ch: Chunk, state):
    """``[K, BV]`` float32 state leaving the chunk, from the ``state`` entering it."""
    whole = _Block(x, ch, 0, ch.size)
    tot = _tot(x, ch)
    carried = _mul(state, None if tot is None else jnp.exp(tot))
    return carried + mm_tn(_mul(whole.k, whole.f_out), whole.v, x.q.dtype)


def previous_dstate(x: Refs, ch: Chunk, dstate, *, scale: float):
    """``[K, BV]`` gradient of the state entering the chunk (given the leaving one's)."""
    whole = _Block(x, ch, 0, ch.size)
    tot = _tot(x, ch)
    carried = _mul(dstate, None if tot is None else jnp.exp(tot))
    return carried + scale * mm_tn(_mul(whole.q, whole.f_in), whole.do, x.q.dtype)


def forward_chunk(x: Refs, ch: Chunk, state, o_ref, *, scale: float, sub_chunk: int) -> None:
    """Writes the chunk's output rows.

    Args:
      x: input refs; ch: the chunk.
      state: ``[K, BV]`` float32 state entering the chunk.
      o_ref: ``[T, BV]`` output ref (rows of this chunk are written).
      scale: output scale; sub_chunk: ``c`` for per-channel decay.
    """
    dtype = x.q.dtype
    C = ch.size
    if x.per_channel:
        blocks = _SubChunks(x, ch, sub_chunk)
        for bi, blk in enumerate(blocks):
            o = mm(_diag_terms(x, blk), blk.v, dtype)
            for col in blocks[:bi]:
                fq, fk = _pair_factors(x, ch, blk, col, blk.i - 1)
                a = mm_nt(blk.q * fq, col.k * fk, dtype)  # [c, c]
                same = blk.same(x, ch, col.i, col.n)
                a = a if same is None else jnp.where(same, a, 0.0)
                o = o + mm(a, col.v, dtype)
            o = o + mm(_mul(blk.q, blk.f_in), state, dtype)
            ch.store(o_ref, blk.i, scale * o)
    else:
        whole = _Block(x, ch, 0, C)
        mask = _and(_causal(C), whole.same(x, ch, 0, C))
        diff = None if x.g is None else whole.g - ch.row_form(x.g_row, 0, C)  # [C, C]
        a = mm_nt(whole.q, whole.k, dtype) * _gate(diff, mask)
        o = mm(a, whole.v, dtype) + mm(_mul(whole.q, whole.f_in), state, dtype)
        ch.store(o_ref, 0, scale * o)


def backward_chunk(x: Refs, ch: Chunk, load_state, load_dstate, outs, *, scale: float,
                   sub_chunk: int) -> None:
    """Writes the chunk's gradient rows.

    The gradient of the in-chunk log decay is written in two parts whose sums
    need no cancellation of large terms (pairs ``s = t`` are kept out):
    ``dga`` (to be summed over later steps of the chunk) and ``dgb`` (to be
    summed over earlier steps); see ``ops._log_decay_grad``.

    Args:
      x: input refs (``do`` included); ch: the chunk.
      load_state: returns the ``[K, BV]`` float32 state entering the chunk (from
        the forward); load_dstate: returns the ``[K, BV]`` float32 gradient of
        the state leaving it. Loaded where each sub-chunk uses them rather than
        held across the whole chunk (registers, on GPU).
      outs: dict of output refs ``dq, dk [T,K]``, ``dv [T,BV]``, ``dga, dgb [T,Kg]``.
    """
    dtype = x.q.dtype
    C = ch.size
    if x.per_channel:
        blocks = _SubChunks(x, ch, sub_chunk)
        for bi, blk in enumerate(blocks):
            same = blk.same(x, ch, blk.i, blk.n)
            da = scale * mm_nt(blk.do, blk.v, dtype)  # [c, c]
            da_strict = jnp.where(_and(_causal(blk.n, strict=True), same), da, 0.0)
            a, dq, dk = _diag_terms(x, blk, da_strict)
            dv = mm_tn(scale * a, blk.do, dtype)
            for col in blocks[:bi]:  # columns before: dq of this block
                fq, fk = _pair_factors(x, ch, blk, col, blk.i - 1)
                da = scale * mm_nt(blk.do, col.v, dtype)
                cross = blk.same(x, ch, col.i, col.n)
                da = da if cross is None else jnp.where(cross, da, 0.0)
                dq = dq + mm(da, col.k * fk, dtype) * fq
            for row in blocks[bi + 1:]:  # rows after: dk, dv of this block
                fq, fk = _pair_factors(x, ch, row, blk, blk.i + blk.n - 1)
                cross = row.same(x, ch, blk.i, blk.n)  # [rows, cols]
                qf = row.q * fq
                a = mm_nt(qf, blk.k * fk, dtype)
                da = scale * mm_nt(row.do, blk.v, dtype)
                if cross is not None:
                    a, da = jnp.where(cross, a, 0.0), jnp.where(cross, da, 0.0)
                dk = dk + mm_tn(da, qf, dtype) * fk
                dv = dv + mm_tn(scale * a, row.do, dtype)
            _finish_block(x, ch, blk, dq, dk, dv, load_state, load_dstate,
                          last=bi == len(blocks) - 1, outs=outs, scale=scale)
    else:
        blk = _Block(x, ch, 0, C)
        same = blk.same(x, ch, 0, C)
        diff = None if x.g is None else blk.g - ch.row_form(x.g_row, 0, C)
        decay = _gate(diff, _and(_causal(C), same))  # [C, C]
        a = scale * mm_nt(blk.q, blk.k, dtype) * decay
        dp = scale * mm_nt(blk.do, blk.v, dtype) * decay
        dp = jnp.where(_causal(C, strict=True), dp, 0.0)
        dq = mm(dp, blk.k, dtype)
        dk = mm_tn(dp, blk.q, dtype)
        dv = mm_tn(a, blk.do, dtype)
        _finish_block(x, ch, blk, dq, dk, dv, load_state, load_dstate,
                      last=True, outs=outs, scale=scale)


def _finish_block(x: Refs, ch: Chunk, blk: _Block, dq, dk, dv, load_state, load_dstate,
                  *, last: bool, outs, scale: float):
    """Adds the diagonal and state terms to the strict in-chunk gradients and stores.

    ``dq``, ``dk`` hold the strictly causal in-chunk terms (``s < t``), ``dv``
    the whole in-chunk term.
    """
    dtype = x.q.dtype
    q, k = blk.q.astype(jnp.float32), blk.k.astype(jnp.float32)
    diag = scale * jnp.sum(blk.do.astype(jnp.float32) * blk.v, 1, keepdims=True)  # [n, 1]
    dq_in = scale * _mul(mm_nt(blk.do, load_state(), dtype), blk.f_in)  # [n, K]
    dk_out = _mul(mm_nt(blk.v, load_dstate(), dtype), blk.f_out)  # [n, K]
    dv = dv + mm(_mul(blk.k, blk.f_out), load_dstate(), dtype)
    ch.store(outs["dq"], blk.i, dq + diag * k + dq_in)
    ch.store(outs["dk"], blk.i, dk + diag * q + dk_out)
    ch.store(outs["dv"], blk.i, dv)
    if x.g is None:
        return
    dga = q * (dq + dq_in) - k * dk  # [n, K]
    dgb = k * dk_out
    if last:  # d g_last of the carried state, kept on the chunk's last row.
        # rowsum_V(carry * S ∘ dS) as identical rows.
        tot = _tot(x, ch)
        carried_grad = _mul(load_state(), None if tot is None else jnp.exp(tot)) * load_dstate()
        ones = jnp.ones((blk.n, carried_grad.shape[1]), jnp.float32)
        d_tot = mm_nt(ones, carried_grad, jnp.float32)  # [n, K], rows identical
        dga = dga + jnp.where(_iota(dga.shape, 0) == blk.n - 1, d_tot, 0.0)
    if not x.per_channel:
        dga, dgb = jnp.sum(dga, 1, keepdims=True), jnp.sum(dgb, 1, keepdims=True)
    ch.store(outs["dga"], blk.i, dga)
    ch.store(outs["dgb"], blk.i, dgb)


def refs_of(refs: dict) -> Refs:
    """The kernel's input refs as a :class:`Refs` (missing ones None)."""
    fields = [f.name for f in dataclasses.fields(Refs)]
    return Refs(**{name: refs.get(name) for name in fields})
