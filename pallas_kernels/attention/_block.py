"""The math of one (query block, key block) pair, shared by the GPU and TPU kernels.

FlashAttention-2 (Dao 2023, arXiv:2307.08691): the forward walks the key
blocks a query block can see with a running max ``m``, denominator ``l`` and
float32 accumulator (Alg. 1) and saves ``lse = m + log l``; the backward
recomputes each block's probabilities ``P = exp(z - lse)`` (Alg. 2) with
``Delta_t = do_t . o_t`` precomputed in XLA::

    dV = P^T dO,   dP = dO V^T,   dZ = P * (dP - Delta) [* (1 - (z / c)^2) under a soft cap c]
    dQ = scale * dZ K,   dK = scale * dZ^T Q

Every function takes loaded arrays (not refs): the GPU kernels feed them from
``fori_loop``s over ``pl.ds`` tiles, the TPU kernels from grid steps. Per-row
vectors are columns ``[C, 1]`` (Mosaic lowers no 1D vectors well), key-side
vectors rows ``[1, C]``, so no in-kernel transpose is needed.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

# Logit written over masked-out entries before the running max and the exp.
# Finite, so that a block with no visible key never computes inf - inf; masked
# probabilities are then set to exactly 0 with a `where`, and a query that sees
# no key outputs 0. effarch.ops.attention's XLA forms use the same constant.
MASKED_LOGIT = -1e30


def dot(a, b, contract, dtype):
    """2D matmul with ``dtype`` operands accumulating in float32; ``contract`` = (a dim, b dim)."""
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
    return lax.dot_general(a.astype(dtype), b.astype(dtype),
                           (((contract[0],), (contract[1],)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)


def _ceil_div(a, n: int):
    """``ceil(max(a, 0) / n)`` of a traced int32 (``lax.div`` truncates; ``//`` would
    lower a ``sign`` that Mosaic cannot lower without a TPU attached)."""
    return lax.div(jnp.maximum(a, 0) + (n - 1), n)


def _floor_div(a, n: int):
    """``floor(max(a, 0) / n)`` of a traced int32."""
    return lax.div(jnp.maximum(a, 0), n)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Band:
    """Which keys each query sees, by block: the static mask of one call.

    Attributes:
      causal, window: as ``ops.attention``'s (keys ``t' - w < s <= t'``, ``t' = t + S - T``).
      q_len, kv_len: the unpadded ``T`` and ``S``; keys ``>= kv_len`` are padding.
      block_q, block_k: rows of one query block, columns of one key block.
    """

    causal: bool
    window: int | None
    q_len: int
    kv_len: int
    block_q: int
    block_k: int

    @property
    def offset(self) -> int:
        """Key position of query 0: ``S - T`` (query and key ends aligned)."""
        return self.kv_len - self.q_len

    @property
    def num_k_blocks(self) -> int:
        return -(-self.kv_len // self.block_k)

    def key_blocks(self, i):
        """``(lo, hi)``: the key blocks query block ``i`` may see (the rest are all masked)."""
        first = i * self.block_q + self.offset  # key position of the block's first query
        lo, hi = 0, self.num_k_blocks
        if self.causal:
            last = first + self.block_q - 1
            hi = jnp.minimum(hi, _ceil_div(last + 1, self.block_k))
        if self.window is not None:
            lo = _floor_div(first - self.window + 1, self.block_k)
        return lo, hi

    def query_blocks(self, j, num_q_blocks: int):
        """``(lo, hi)``: the query blocks that may see key block ``j``."""
        first = j * self.block_k - self.offset  # query index at the block's first key position
        lo, hi = 0, num_q_blocks
        if self.causal:
            lo = _floor_div(first, self.block_q)
        if self.window is not None:
            last = first + self.block_k - 1 + self.window - 1  # last query that sees the block
            hi = jnp.minimum(hi, _ceil_div(last + 1, self.block_q))
        return lo, hi

    def visible(self, i, j, q_seg=None, kv_seg=None):
        """``[Cq, Ck]`` bool mask of query block ``i`` against key block ``j``.

        Args:
          q_seg: ``[Cq, 1]`` query segment ids, kv_seg: ``[1, Ck]`` key ones, or both None.
        """
        shape = (self.block_q, self.block_k)
        q_pos = i * self.block_q + lax.broadcasted_iota(jnp.int32, shape, 0) + self.offset
        k_pos = j * self.block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
        vis = k_pos < self.kv_len
        if self.causal:
            vis &= k_pos <= q_pos
        if self.window is not None:
            vis &= k_pos > q_pos - self.window
        if q_seg is not None:
            vis &= q_seg == kv_seg
        return vis


def logits(q, k, *, scale: float, softcap: float | None, dtype):
    """``[Cq, Ck]`` float32 ``scale * q k^T``, soft-capped; q ``[Cq, K]``, k ``[Ck, K]``."""
    z = dot(q, k, (1, 1), dtype) * scale
    if softcap is not None:
        z = softcap * jnp.tanh(z / softcap)
    return z


def init_carry(block_q: int, dv: int):
    """``(m, l, acc)`` before the first key block: ``[Cq,1]``, ``[Cq,1]``, ``[Cq,V]`` float32."""
    f32 = jnp.float32
    return (jnp.full((block_q, 1), MASKED_LOGIT, f32), jnp.zeros((block_q, 1), f32),
            jnp.zeros((block_q, dv), f32))


def forward_step(carry, q, k, v, vis, *, scale: float, softcap: float | None):
    """One key block of the online softmax (FlashAttention-2 Alg. 1, lines 8-10)."""
    m, l, acc = carry
    z = jnp.where(vis, logits(q, k, scale=scale, softcap=softcap, dtype=q.dtype), MASKED_LOGIT)
    m_new = jnp.maximum(m, jnp.max(z, axis=1, keepdims=True))
    p = jnp.where(vis, jnp.exp(z - m_new), 0.0)  # [Cq, Ck]
    correction = jnp.exp(m - m_new)
    l = l * correction + jnp.sum(p, axis=1, keepdims=True)
    acc = acc * correction + dot(p, v, (1, 0), v.dtype)
    return m_new, l, acc


def finish(carry):
    """``(o [Cq,V] float32, lse [Cq,1])``; a query with no visible key gets o = 0."""
    m, l, acc = carry
    seen = l > 0
    l = jnp.where(seen, l, 1.0)
    return acc / l, m + jnp.log(l)


def grad_logits(q, k, v, do, lse, delta, vis, *, scale: float, softcap: float | None):
    """``(P [Cq,Ck], dZ [Cq,Ck])`` of one block: probabilities and d/d(scale q.k), float32.

    ``dZ`` includes the soft cap's derivative and ``scale``: ``dq = dZ k``,
    ``dk = dZ^T q``.
    """
    z = logits(q, k, scale=scale, softcap=softcap, dtype=q.dtype)
    p = jnp.exp(jnp.where(vis, z - lse, MASKED_LOGIT))  # exactly 0 where masked
    dp = dot(do, v, (1, 1), do.dtype)  # [Cq, Ck]
    dz = p * (dp - delta)
    if softcap is not None:
        dz = dz * (1.0 - jnp.square(z / softcap))
    return p, dz * scale
