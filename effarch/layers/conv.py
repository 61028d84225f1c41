"""Causal depthwise short convolution, with a decode cache and packed segments.

The short convolution (kernel 2-4) that Mamba, Mamba-2, Hyena, GLA and many
linear-attention layers put on their projections (H3, Fu et al., 2023)::

    y[t, d] = b[d] + sum_{j=0..W-1} w[j, d] * x[t - (W-1) + j, d]

``w[W-1]`` weighs the current token. Inputs before the sequence come from the
cache (the last ``W-1`` inputs of the previous call; zeros when fresh), and a
tap never reaches across a packed-segment boundary.

Two entry points: :func:`causal_conv1d` (pure function) and :class:`ShortConv`
(the Flax module that owns ``w`` and ``b``). :func:`causal_conv1d_reference`
is the readable loop over time the tests compare against.

:func:`fft_causal_conv` is the long (filter as long as the sequence) causal
convolution of S4D and Hyena, by FFT in O(T log T).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effarch.op_contract import check_segment_ids, reset_index

# Activations a ShortConv may apply after the convolution.
ACTIVATIONS = {"none": lambda x: x, "silu": jax.nn.silu, "gelu": jax.nn.gelu}


def init_conv_state(batch_size: int, kernel_size: int, features: int, dtype: Any = jnp.float32) -> jax.Array:
    """An empty decode cache: the last ``kernel_size - 1`` inputs, ``[B, W-1, D]`` zeros."""
    return jnp.zeros((batch_size, kernel_size - 1, features), dtype)


def _check(x, weight, bias, state, segment_ids):
    if x.ndim != 3:
        raise ValueError(f"causal_conv1d: x has shape {tuple(x.shape)}; expected [B,T,D].")
    b, t, d = x.shape
    if weight.ndim != 2 or weight.shape[1] != d:
        raise ValueError(
            f"causal_conv1d: weight has shape {tuple(weight.shape)}; expected [W,D] with D={d}."
        )
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"causal_conv1d: bias has shape {tuple(bias.shape)}; expected [D]=[{d}].")
    w = weight.shape[0]
    if state is not None and tuple(state.shape) != (b, w - 1, d):
        raise ValueError(
            f"causal_conv1d: state has shape {tuple(state.shape)}; expected [B,W-1,D]=[{b},{w - 1},{d}]."
        )
    check_segment_ids(segment_ids, b, t)


def causal_conv1d(
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None = None,
    *,
    state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Causal depthwise convolution of ``x`` along time.

    Args:
      x: ``[B,T,D]`` inputs.
      weight: ``[W,D]`` taps; ``weight[W-1]`` weighs the current token.
      bias: optional ``[D]``.
      state: optional ``[B,W-1,D]`` inputs preceding ``x`` (a decode cache);
        zeros when None.
      segment_ids: optional ``[B,T]`` int ids of packed sequences; a tap never
        mixes tokens of different segments, and ``state`` feeds only the first.

    Returns:
      ``y [B,T,D]`` in ``x.dtype`` and the new state ``[B,W-1,D]`` (the last
      ``W-1`` inputs, in ``state``'s dtype, or ``x.dtype`` when none was given).
    """
    _check(x, weight, bias, state, segment_ids)
    b, t, d = x.shape
    w = weight.shape[0]
    state_dtype = x.dtype if state is None else state.dtype
    if state is None:
        state = jnp.zeros((b, w - 1, d), x.dtype)
    padded = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [B, W-1+T, D]
    keep = None
    if segment_ids is not None:
        reset = reset_index(segment_ids, b, t)  # [B, T]
        # Padded positions (the state) belong to segment "0 resets", like step 0.
        reset_padded = jnp.concatenate([jnp.zeros((b, w - 1), jnp.int32), reset], axis=1)
        # keep[:, t, j]: tap j (the input W-1-j steps back) is in step t's segment.
        keep = jnp.stack([reset_padded[:, j : j + t] == reset for j in range(w)], axis=-1).astype(jnp.float32)
    y = _taps(padded, weight, keep)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    new_state = padded[:, t:]  # [B, W-1, D]: the last W-1 inputs
    if segment_ids is not None:  # ... of the last segment only: decoding continues it
        in_last = (reset_padded[:, t:] == reset[:, -1:])[..., None]
        new_state = jnp.where(in_last, new_state, jnp.zeros_like(new_state))
    return y.astype(x.dtype), new_state.astype(state_dtype)


def _tap(padded, keep, j, t):
    """Tap ``j``'s input window ``padded[:, j : j + t]`` in float32, masked by ``keep``."""
    window = padded[:, j : j + t].astype(jnp.float32)
    return window if keep is None else window * keep[..., j : j + 1]


def _forward_taps(padded, weight, keep):
    t = padded.shape[1] - weight.shape[0] + 1
    wf = weight.astype(jnp.float32)
    y = _tap(padded, keep, 0, t) * wf[0]
    for j in range(1, weight.shape[0]):
        y = y + _tap(padded, keep, j, t) * wf[j]
    return y


# Rows of the batch whose tap gradients are summed at once: a block of about
# this many bytes stays in cache while its W products are reduced.
_TAP_GRAD_BLOCK_BYTES = 1 << 20


@jax.custom_vjp
def _taps(padded: jax.Array, weight: jax.Array, keep: jax.Array | None) -> jax.Array:
    """``y[:, t] = sum_j keep[:, t, j] * padded[:, t + j] * weight[j]`` in float32, ``[B,T,D]``.

    ``keep`` (``[B,T,W]`` 0/1, or None for all ones) is not differentiated. The
    backward pass sums the tap gradients block by block over the batch: XLA on
    a CPU reduces the W products of the whole batch at 3-4x the time of
    cache-sized blocks (docs/results/speed.md).
    """
    return _forward_taps(padded, weight, keep)


def _taps_fwd(padded, weight, keep):
    return _forward_taps(padded, weight, keep), (padded, weight, keep)


def _taps_bwd(res, g):
    padded, weight, keep = res
    b, tp, d = padded.shape
    w = weight.shape[0]
    t = tp - w + 1
    wf = weight.astype(jnp.float32)
    g = g.astype(jnp.float32)
    # d padded[s] = sum_j keep[s - j, j] * g[s - j] * weight[j]
    d_padded = jnp.zeros((b, tp, d), jnp.float32)
    for j in range(w):
        gj = g if keep is None else g * keep[..., j : j + 1]
        d_padded = d_padded + jnp.pad(gj * wf[j], ((0, 0), (j, w - 1 - j), (0, 0)))
    # d weight[j] = sum_{b,t} keep[b, t, j] * padded[b, t + j] * g[b, t], over blocks of rows.
    rows = max(1, min(b, _TAP_GRAD_BLOCK_BYTES // max(1, tp * d * 4)))
    while b % rows:
        rows -= 1

    def block(acc, xs):
        p, gb, kb = xs
        return acc + jnp.stack([jnp.sum(_tap(p, kb, j, t) * gb, axis=(0, 1)) for j in range(w)]), None

    blocks = (padded.reshape(b // rows, rows, tp, d), g.reshape(b // rows, rows, t, d),
              None if keep is None else keep.reshape(b // rows, rows, t, w))
    d_weight, _ = jax.lax.scan(block, jnp.zeros((w, d), jnp.float32), blocks)
    return d_padded.astype(padded.dtype), d_weight.astype(weight.dtype), None


_taps.defvjp(_taps_fwd, _taps_bwd)


def causal_conv1d_reference(x, weight, bias=None, *, state=None, segment_ids=None):
    """Readable per-step reference of :func:`causal_conv1d` (a window slid over time)."""
    b, t, d = x.shape
    w = weight.shape[0]
    window = jnp.zeros((b, w - 1, d), jnp.float32) if state is None else state.astype(jnp.float32)
    ids = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
    ys = []
    for step in range(t):
        if step > 0:
            # A new segment starts from an empty window.
            window = jnp.where((ids[:, step] != ids[:, step - 1])[:, None, None], 0.0, window)
        full = jnp.concatenate([window, x[:, step : step + 1].astype(jnp.float32)], axis=1)  # [B, W, D]
        y = jnp.einsum("bwd,wd->bd", full, weight.astype(jnp.float32))
        if bias is not None:
            y = y + bias
        ys.append(y)
        window = full[:, 1:]
    return jnp.stack(ys, axis=1).astype(x.dtype), window


def fft_causal_conv(u: jax.Array, kernel: jax.Array) -> jax.Array:
    """Long causal depthwise convolution by FFT: ``y_t = sum_{s<=t} K_{t-s} u_s``.

    Zero-padding to ``2T`` makes the circular FFT convolution causal (H3, S4).

    Args:
      u: ``[B,T,D]`` inputs.
      kernel: ``[T,D]`` filter taps per channel, ``kernel[0]`` weighs the current step.

    Returns:
      ``[B,T,D]`` float32.
    """
    if u.ndim != 3 or kernel.shape != u.shape[1:]:
        raise ValueError(f"fft_causal_conv: u has shape {tuple(u.shape)} and kernel {tuple(kernel.shape)}; "
                         "expected u [B,T,D] and kernel [T,D].")
    t = u.shape[1]
    n = 2 * t
    spectrum = jnp.fft.rfft(u.astype(jnp.float32), n=n, axis=1) * jnp.fft.rfft(kernel.astype(jnp.float32), n=n, axis=0)
    return jnp.fft.irfft(spectrum, n=n, axis=1)[:, :t]

def direct_causal_conv(u: jax.Array, kernel: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    """Long causal depthwise convolution computed directly, O(T^2 D).

    The reference of :func:`fft_causal_conv`, and the form that handles packed
    sequences: with ``segment_ids`` no tap reaches across a segment boundary.

    Args:
      u: ``[B,T,D]`` inputs.
      kernel: ``[T,D]`` filter taps, ``kernel[0]`` weighs the current step.
      segment_ids: optional ``[B,T]`` int ids of packed sequences.

    Returns:
      ``[B,T,D]`` float32.
    """
    b, t, _ = u.shape
    check_segment_ids(segment_ids, b, t)
    lags = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]  # [T(t), T(s)]
    taps = jnp.where((lags >= 0)[..., None], kernel[jnp.clip(lags, 0)].astype(jnp.float32), 0.0)  # [T,T,D]
    run = reset_index(segment_ids, b, t)  # [B,T]
    same = (run[:, :, None] == run[:, None, :]).astype(jnp.float32)  # [B,T(t),T(s)]
    return jnp.einsum("bts,tsd,bsd->btd", same, taps, u.astype(jnp.float32))


class ShortConv(nn.Module):
    """Causal depthwise convolution module with its own taps and bias.

    ``__call__(x, state=None, *, segment_ids=None) -> (y, new_state)``:
    ``x [B,T,D]``; ``state [B,W-1,D]`` or None (see :func:`causal_conv1d`).
    Use :func:`init_conv_state` for an empty decode cache.

    Attributes:
      kernel_size: number of taps W (>= 1).
      activation: ``"none"``, ``"silu"`` or ``"gelu"`` applied after the conv.
      use_bias: learn a per-channel bias.
      dtype: compute dtype of the output.
      param_dtype: dtype of the taps and bias.
    """

    kernel_size: int = 4
    activation: str = "none"
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, state=None, *, segment_ids=None):
        if self.kernel_size < 1:
            raise ValueError(f"ShortConv: kernel_size={self.kernel_size}; expected >= 1.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ShortConv: activation={self.activation!r}; expected one of {sorted(ACTIVATIONS)}.")
        d = x.shape[-1]
        # PyTorch Conv1d default init: uniform(+-1/sqrt(fan_in)), fan_in = W for depthwise.
        bound = 1.0 / self.kernel_size**0.5
        init = nn.initializers.uniform(2 * bound)
        weight = self.param("kernel", lambda k, s, dt: init(k, s, dt) - bound, (self.kernel_size, d), self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", lambda k, s, dt: init(k, s, dt) - bound, (d,), self.param_dtype)
        y, new_state = causal_conv1d(x.astype(self.dtype), weight, bias, state=state, segment_ids=segment_ids)
        return ACTIVATIONS[self.activation](y), new_state
