"""Softmax attention with Pallas kernels: the public function.

``attention`` is what ``effarch.ops.attention(..., implementation="pallas")``
calls. It checks and pads the inputs (T and S to whole blocks, head dims to
what the kernels tile), and runs, by ``pallas_kernels._platform.resolve_target``:

* GPU: our FlashAttention-2 kernels (``gpu.py``, Pallas Triton), forward and
  backward under a ``jax.custom_vjp`` that saves ``lse`` from the forward;
* TPU: JAX's splash attention through ``tpu.splash_attention`` where it covers
  the call (``tpu.splash_unsupported`` says why not), else our kernels'
  Mosaic form (``tpu.forward`` / ``tpu.backward``) under the same ``custom_vjp``.

GQA/MQA never repeats K/V: query head ``h`` reads key/value head ``h // G``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from effarch.op_contract import check_attention_inputs, pad_to_multiple
from pallas_kernels import _platform
from pallas_kernels._tpu import LANES
from pallas_kernels.attention import gpu, tpu

OP = "pallas_kernels.attention"


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tiling of the kernels.

    Attributes:
      block_q: query rows per program (GPU: a power of two >= 16; TPU: a
        multiple of 128). None: 64 on GPU (fewer for short T), 128 on TPU.
      block_k: key rows per loop step (same rules). None: as ``block_q``'s default.
    """

    block_q: int | None = None
    block_k: int | None = None

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"BlockSizes.{name}={value!r}; expected a positive int or None.")

    def for_target(self, target: _platform.KernelTarget, *, q_len: int,
                   kv_len: int) -> BlockSizes:
        """The sizes the target's kernels tile with: every None filled in, each checked.

        Raises:
          ValueError: a size the target's kernels cannot tile, naming the rule.
        """
        if target.backend == "gpu":
            ok, rule = (lambda n: n >= 16 and n & (n - 1) == 0), "a power of two >= 16 on GPU"
            default = lambda length: min(64, _padded_dim(length, "gpu"))  # noqa: E731
        else:
            ok, rule = (lambda n: n % LANES == 0), f"a multiple of {LANES} on TPU"
            default = lambda length: LANES  # noqa: E731
        sizes = {"block_q": self.block_q or default(q_len),
                 "block_k": self.block_k or default(kv_len)}
        for name, size in sizes.items():
            if not ok(size):
                raise ValueError(f"BlockSizes.{name}={size} must be {rule}.")
        return BlockSizes(**sizes)


def _padded_dim(dim: int, backend: str) -> int:
    """A head dim as the kernels tile it: a power of two >= 16 (GPU), a multiple of 128 (TPU)."""
    if backend == "gpu":
        return max(16, 1 << (dim - 1).bit_length())
    return -(-dim // LANES) * LANES


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Config(_platform.KernelConfig):
    """Static choices of one call: target, block sizes, the mask and the logit transform.

    Attributes:
      causal, window, scale, softcap: as :func:`attention`'s.
      q_len, kv_len: the unpadded ``T`` and ``S``.
    """

    BACKENDS = {"gpu": gpu, "tpu": tpu}

    causal: bool
    window: int | None
    scale: float
    softcap: float | None
    q_len: int
    kv_len: int

    def pad(self, x, block: int):
        """Pads time (axis 1) to whole blocks and the head dim (axis 3) as the kernels tile it."""
        x = pad_to_multiple(x, block, axis=1)
        return pad_to_multiple(x, _padded_dim(x.shape[3], self.target.backend), axis=3)


def attention(q, k, v, *, causal: bool = True, window: int | None = None, segment_ids=None,
              scale: float | None = None, softcap: float | None = None,
              backend: str | None = None, interpret: bool | None = None,
              block_sizes: BlockSizes | None = None):
    """Multi-head softmax attention by Pallas kernels, forward and backward.

    ``o[b,t,h] = sum_s softmax_s(z[b,h,t,s]) v[b,s,h // G]``, ``z = scale q.k``
    (``softcap * tanh(z / softcap)`` when given) over the keys query ``t``
    sees; query ``t`` sits at key position ``t + S - T``. Softmax statistics
    and accumulators are float32.

    Args:
      q: ``[B,T,H,K]``; k: ``[B,S,Hkv,K]``; v: ``[B,S,Hkv,V]``; ``Hkv`` divides ``H``.
      causal: keys ``s <= t + S - T`` only.
      window: None or ``w >= 1`` (needs ``causal``): keys ``t + S - T - w < s``.
      segment_ids: None; one ``[B,T]`` int array when ``T == S`` (a segment
        starts wherever the id changes); or a pair ``(q_ids [B,T], kv_ids
        [B,S])``: query ``t`` sees key ``s`` only where the ids are equal. A
        query that sees no key outputs zeros.
      scale: logit scale (default ``K ** -0.5``); softcap: None or ``c > 0``.
      backend, interpret: see ``pallas_kernels._platform.resolve_target``.
      block_sizes: tiling; defaults per backend.

    Returns:
      ``[B,T,H,V]`` in ``q.dtype``.

    Raises:
      ValueError: inconsistent shapes or options, or block sizes the chosen
        kernel cannot tile; the message names the values.
    """
    q_seg, kv_seg, segments = _check_inputs(q, k, v, causal, window, segment_ids, softcap)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    target = _platform.resolve_target(backend, interpret)
    blocks = (block_sizes or BlockSizes()).for_target(target, q_len=q.shape[1],
                                                      kv_len=k.shape[1])
    cfg = _Config(target=target, block_sizes=blocks, causal=causal, window=window, scale=scale,
                  softcap=None if softcap is None else float(softcap), q_len=q.shape[1],
                  kv_len=k.shape[1])
    if target.backend == "tpu" and tpu.splash_unsupported(cfg, segments) is None:
        return tpu.splash_attention(cfg, q, k, v, q_seg)
    return _attention(cfg, q, k, v, q_seg, kv_seg)


def _check_inputs(q, k, v, causal, window, segment_ids, softcap):
    """Validates the call (:func:`effarch.op_contract.check_attention_inputs`); returns ``(q_seg, kv_seg, kind)``."""
    q_seg, kv_seg, kind = check_attention_inputs(OP, q, k, v, causal=causal, window=window,
                                                 segment_ids=segment_ids, softcap=softcap)
    if kind == "pair":
        q_seg, kv_seg = q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)
    return q_seg, kv_seg, kind


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _Config, q, k, v, q_seg, kv_seg):
    return _forward(cfg, q, k, v, q_seg, kv_seg)[0]


def _padded(cfg: _Config, q, k, v, q_seg, kv_seg):
    bq, bk = cfg.block_sizes.block_q, cfg.block_sizes.block_k
    return (cfg.pad(q, bq), cfg.pad(k, bk), cfg.pad(v, bk), pad_to_multiple(q_seg, bq, axis=1),
            pad_to_multiple(kv_seg, bk, axis=1))


def _forward(cfg: _Config, q, k, v, q_seg, kv_seg):
    o, lse = cfg.kernels.forward(*_padded(cfg, q, k, v, q_seg, kv_seg), **cfg.static)
    return o[:, :q.shape[1], :, :v.shape[3]], (q, k, v, q_seg, kv_seg, o, lse)


def _backward(cfg: _Config, residuals, do):
    q, k, v, q_seg, kv_seg, o, lse = residuals
    do = cfg.pad(do, cfg.block_sizes.block_q)
    delta = jnp.einsum("bthv,bthv->bht", do.astype(jnp.float32), o.astype(jnp.float32))
    dq, dk, dv = cfg.kernels.backward(*_padded(cfg, q, k, v, q_seg, kv_seg), do.astype(q.dtype),
                                      lse, delta[..., None], **cfg.static)
    t, s = q.shape[1], k.shape[1]
    seg_grads = tuple(None if x is None else jnp.zeros(x.shape, jax.dtypes.float0)
                      for x in (q_seg, kv_seg))
    return (dq[:, :t, :, :q.shape[3]].astype(q.dtype), dk[:, :s, :, :k.shape[3]].astype(k.dtype),
            dv[:, :s, :, :v.shape[3]].astype(v.dtype), *seg_grads)


_attention.defvjp(_forward, _backward)
