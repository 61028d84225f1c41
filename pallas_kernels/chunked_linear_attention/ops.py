"""Chunked linear attention (SSD / GLA) with Pallas kernels: the public function.

``chunked_linear_attention`` is what ``effarch.ops.linear_attention(...,
implementation="pallas")`` calls. It pads the inputs, precomputes in XLA what
kernels should not compute (in-chunk cumulative log decay, segment flags),
runs the GPU (Pallas Triton) or TPU (Mosaic) kernel chosen by
``pallas_kernels._platform.resolve_target``, and defines the backward pass
with ``jax.custom_vjp``: a second kernel walks the chunks in reverse, carrying
the state gradient, and reads the chunk-boundary states the forward stored.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from effarch.op_contract import (
    MASKED_LOG,
    check_linear_attention_inputs,
    chunk_segments,
    pad_to_multiple,
)
from pallas_kernels import _platform
from pallas_kernels.chunked_linear_attention import gpu, tpu


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tiling of the kernels.

    Attributes:
      chunk: chunk length ``C``; None takes ``chunk_size``. GPU: a power of two
        >= 16; TPU: a multiple of 8.
      sub_chunk: sub-chunk length ``c`` for per-key-channel decay (divides
        ``chunk``; GPU: a power of two >= 16, TPU: a multiple of 8); None:
        ``min(16, chunk)``.
      block_v: columns of V per program; None: 64 on GPU, 128 on TPU (capped
        at the padded V).
    """

    chunk: int | None = None
    sub_chunk: int | None = None
    block_v: int | None = None

    def __post_init__(self):
        for name in ("chunk", "sub_chunk", "block_v"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"BlockSizes.{name}={value!r}; expected a positive int or None.")

    def for_target(self, target: _platform.KernelTarget, *, chunk_size: int,
                   value_dim: int) -> BlockSizes:
        """The sizes the target's kernels tile with: every None filled in, each checked.

        ``chunk_size`` is the op's tuning hint (the numbers do not depend on
        it): it is rounded up to a chunk the kernel can tile. ``chunk`` is an
        explicit request and must already be one.

        Raises:
          ValueError: a size the target's kernels cannot tile, naming the rule.
        """
        on_gpu = target.backend == "gpu"
        if on_gpu:
            ok = lambda n: n >= 16 and n & (n - 1) == 0  # noqa: E731
            rule = "a power of two >= 16 on GPU"
        else:
            ok = lambda n: n % 8 == 0  # noqa: E731
            rule = "a multiple of 8 on TPU"
        chunk = self.chunk or (_padded_dim(chunk_size, "gpu") if on_gpu
                               else -(-chunk_size // 8) * 8)
        if not ok(chunk):
            raise ValueError(f"BlockSizes.chunk={chunk} must be {rule}.")
        sub_chunk = self.sub_chunk or min(16, chunk)
        if not ok(sub_chunk) or chunk % sub_chunk:
            raise ValueError(f"BlockSizes.sub_chunk={sub_chunk} must be {rule} and divide "
                             f"the chunk size {chunk}.")
        v_pad = _padded_dim(value_dim, target.backend)
        block_v = min(self.block_v or (64 if on_gpu else 128), v_pad)
        if v_pad % block_v or not ok(block_v) or (not on_gpu and block_v % 128):
            raise ValueError(f"BlockSizes.block_v={block_v} must divide the padded V={v_pad} and "
                             f"be {'a power of two >= 16' if on_gpu else 'a multiple of 128'}.")
        return BlockSizes(chunk=chunk, sub_chunk=sub_chunk, block_v=block_v)


def _padded_dim(dim: int, backend: str) -> int:
    """K or V as the kernels tile it: a power of two >= 16 (GPU), a multiple of 128 (TPU)."""
    if backend == "gpu":
        return max(16, 1 << (dim - 1).bit_length())
    return -(-dim // 128) * 128


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Config(_platform.KernelConfig):
    """Static choices of one call: the target, its block sizes, and the output scale."""

    BACKENDS = {"gpu": gpu, "tpu": tpu}

    scale: float

    def pad(self, x, *, time: bool = True, lanes: tuple[int, ...] = (3,)):
        """Pads T (axis 1) to whole chunks and each axis in ``lanes`` as the kernels tile it."""
        if time:
            x = pad_to_multiple(x, self.block_sizes.chunk, axis=1)
        for axis in lanes:
            x = pad_to_multiple(x, _padded_dim(x.shape[axis], self.target.backend), axis=axis)
        return x


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Padded kernel inputs (``Tp`` = T padded to chunks, ``M = Tp / C``).

    Attributes:
      q, k: ``[B,Tp,H,Kp]``; v: ``[B,Tp,H,Vp]``.
      g: ``[B,H,Tp,Kg]`` float32 log decay summed from the chunk start (inclusive),
        ``Kg`` 1 (scalar) or ``Kp`` (per key channel); None without decay.
      g_row: ``[B,H,M,C]`` the same, chunk-major (scalar decay only).
      tot: ``[B,H,M,Kg]`` log factor carrying a chunk's entering state to its
        end (``-inf`` where the chunk holds a segment start); None when 1.
      r: ``[B,Tp]`` segment starts since the chunk start, up to each step
        (segments only, else None): two steps of a chunk share a segment iff
        their ``r`` agree.
      seg_in, seg_out: ``[B,Tp]`` int32 flags: the step sees the state entering
        its chunk / reaches the state leaving it (segments only).
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    g: jax.Array | None
    g_row: jax.Array | None
    tot: jax.Array | None
    r: jax.Array | None
    seg_in: jax.Array | None
    seg_out: jax.Array | None


def chunked_linear_attention(q, k, v, log_decay, *, scale: float, initial_state,
                             return_final_state: bool, segment_ids, chunk_size: int,
                             backend: str | None = None, interpret: bool | None = None,
                             block_sizes: BlockSizes | None = None):
    """Gated linear attention by Pallas kernels, forward and backward.

    ``S_t = exp(log_decay_t) S_{t-1} + k_t v_t^T``, ``o_t = scale S_t^T q_t``
    per head, state reset to zero where ``segment_ids`` changes. Inputs are
    checked as ``effarch.ops.linear_attention`` checks them.

    Args:
      q, k: ``[B,T,H,K]``; v: ``[B,T,H,V]``.
      log_decay: None, ``[H]``, ``[B,T,H]`` or ``[B,T,H,K]`` (values <= 0).
      scale: output scale.
      initial_state: None or ``[B,H,K,V]`` float32 (feeds the first segment).
      return_final_state: return the state after the last step.
      segment_ids: None or ``[B,T]`` int.
      chunk_size: chunk length ``C``, rounded up to what the kernel tiles (a
        power of two >= 16 on GPU, a multiple of 8 on TPU);
        ``block_sizes.chunk`` overrides it and is not rounded.
      backend, interpret: see ``pallas_kernels._platform.resolve_target``.
      block_sizes: tiling; defaults per backend.

    Returns:
      ``(o [B,T,H,V] in v.dtype, S [B,H,K,V] float32 or None)``.

    Raises:
      ValueError: shapes that fit no form, or block sizes the chosen kernel
        cannot tile.
    """
    log_decay = check_linear_attention_inputs(q, k, v, log_decay, initial_state, segment_ids,
                                              chunk_size)
    target = _platform.resolve_target(backend, interpret)
    blocks = (block_sizes or BlockSizes()).for_target(target, chunk_size=chunk_size,
                                                      value_dim=v.shape[-1])
    cfg = _Config(target=target, block_sizes=blocks, scale=float(scale))
    o, final = _linear_attention(cfg, q, k, v, log_decay, initial_state, segment_ids)
    return o, (final if return_final_state else None)


def _pad_state(s, cfg: _Config):
    """``[B,H,K,V]`` -> float32 ``[B,H,Kp,Vp]`` (None passes through)."""
    if s is None:
        return None
    return cfg.pad(s.astype(jnp.float32), time=False, lanes=(2, 3))


def _prepare(cfg: _Config, q, k, v, log_decay, segment_ids) -> Prepared:
    """Pads to whole chunks and lane/tile sizes; precomputes decays and segment flags."""
    b, t, h, _ = q.shape
    c = cfg.block_sizes.chunk
    q, k, v = (cfg.pad(x) for x in (q, k, v))
    tp = q.shape[1]
    n = tp // c
    g = g_row = tot = r = seg_in = seg_out = None
    if log_decay is not None:
        ld = log_decay if log_decay.ndim == 4 else log_decay[..., None]  # [B,T,H,Kg]
        ld = cfg.pad(ld.astype(jnp.float32), lanes=(3,) if ld.shape[-1] > 1 else ())
        kg = ld.shape[-1]
        ld = jnp.transpose(ld, (0, 2, 1, 3)).reshape(b, h, n, c, kg)
        g5 = jnp.cumsum(ld, axis=3)  # [B,H,M,C,Kg]
        g = g5.reshape(b, h, tp, kg)
        if kg == 1:
            g_row = g5[..., 0]
        tot = g5[:, :, :, -1, :]  # [B,H,M,Kg]
    if segment_ids is not None:
        segments = chunk_segments(segment_ids, b, t, c)  # [B,M,C] flags
        r = segments.resets.reshape(b, tp)
        seg_in = segments.sees_entry.reshape(b, tp).astype(jnp.int32)
        seg_out = segments.reaches_exit.reshape(b, tp).astype(jnp.int32)
        carries = segments.carries[:, None, :, None]  # [B,1,M,1]
        tot = jnp.where(carries, 0.0 if tot is None else tot, MASKED_LOG)
        tot = jnp.broadcast_to(tot, (b, h, n, tot.shape[-1]))
    return Prepared(q=q, k=k, v=v, g=g, g_row=g_row, tot=tot, r=r, seg_in=seg_in,
                    seg_out=seg_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _linear_attention(cfg: _Config, q, k, v, log_decay, initial_state, segment_ids):
    out, _ = _forward(cfg, q, k, v, log_decay, initial_state, segment_ids)
    return out


def _forward(cfg: _Config, q, k, v, log_decay, initial_state, segment_ids):
    b, t, h, kd = q.shape
    vd = v.shape[-1]
    p = _prepare(cfg, q, k, v, log_decay, segment_ids)
    o, states, final = cfg.kernels.forward(p, _pad_state(initial_state, cfg), **cfg.static)
    out = (o[:, :t, :, :vd], final[:, :, :kd, :vd])
    return out, (q, k, v, log_decay, initial_state, segment_ids, states, final)


def _backward(cfg: _Config, residuals, cotangents):
    q, k, v, log_decay, initial_state, segment_ids, states, final = residuals
    do, dfinal = cotangents
    b, t, h, kd = q.shape
    vd = v.shape[-1]
    p = _prepare(cfg, q, k, v, log_decay, segment_ids)
    do = cfg.pad(do).astype(v.dtype)
    grads = cfg.kernels.backward(p, do, states, _pad_state(dfinal, cfg), **cfg.static)
    dq = grads["dq"][:, :t, :, :kd].astype(q.dtype)
    dk = grads["dk"][:, :t, :, :kd].astype(k.dtype)
    dv = grads["dv"][:, :t, :, :vd].astype(v.dtype)
    d_init = None if initial_state is None else grads["ds0"][:, :, :kd, :vd]
    d_decay = None
    if log_decay is not None:
        d_decay = _log_decay_grad(grads["dga"], grads["dgb"], cfg.block_sizes.chunk)[:, :t]
        d_decay = d_decay[..., :kd] if log_decay.ndim == 4 else d_decay[..., 0]
    d_seg = None if segment_ids is None else jnp.zeros(segment_ids.shape, jax.dtypes.float0)
    return dq, dk, dv, d_decay, d_init, d_seg


def _log_decay_grad(dga, dgb, chunk: int):
    """Gradient of the per-step log decay from the kernel's two partial sums.

    The kernel writes, per step ``t`` of a chunk, ``dga[t]`` (gradient of the
    in-chunk cumulative log decay ``g_t`` from its own query, its pairs with
    earlier keys, and on the chunk's last row the carried state) and
    ``dgb[s] = k_s * dk_s`` of the state leaving the chunk. Step ``r``'s log
    decay enters ``g_t`` for every ``t >= r``, and the factor ``exp(g_last -
    g_s)`` for every ``s < r``: a reverse cumsum of ``dga`` plus an exclusive
    cumsum of ``dgb``, both within the chunk.

    Args:
      dga, dgb: ``[B,H,Tp,Kg]`` float32.
    Returns:
      ``[B,Tp,H,Kg]`` float32.
    """
    b, h, tp, kg = dga.shape
    dga = dga.reshape(b, h, tp // chunk, chunk, kg)
    dgb = dgb.reshape(b, h, tp // chunk, chunk, kg)
    after = jnp.flip(jnp.cumsum(jnp.flip(dga, 3), 3), 3)
    shifted = jnp.concatenate([jnp.zeros_like(dgb[:, :, :, :1]), dgb[:, :, :, :-1]], 3)
    before = jnp.cumsum(shifted, 3)  # exclusive: no large term added and taken away
    grad = (after + before).reshape(b, h, tp, kg)
    return jnp.transpose(grad, (0, 2, 1, 3))


_linear_attention.defvjp(_forward, _backward)
