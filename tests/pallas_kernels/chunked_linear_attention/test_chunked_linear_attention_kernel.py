"""Pallas chunked linear attention against the float32 recurrence.

On CPU the GPU kernel runs with ``interpret=True`` and the TPU kernel in the
TPU interpreter (``pltpu.InterpretParams``); each case checks the output, the
final state and every gradient (q, k, v, log_decay, initial_state) in one
jitted ``value_and_grad``. Interpret mode proves the math, not the lowering:
the ``gpu`` / ``tpu`` marked cases compile the kernels on real hardware.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch import ops as effarch_ops
from effarch.testing import assert_relative_close
from pallas_kernels.chunked_linear_attention import BlockSizes, chunked_linear_attention
from pallas_kernels.chunked_linear_attention.reference import chunked_linear_attention_reference

# Log decay per step: weak, strong, and spread log-uniformly over the whole range.
DECAYS = {"weak": (1e-3, 1e-3), "strong": (20.0, 20.0), "mixed": (1e-3, 20.0)}


@dataclasses.dataclass(frozen=True)
class Case:
    backend: str
    form: str  # "none" | "scalar" | "channel"
    dtype: str = "float32"
    t: int = 63
    h: int = 2
    kd: int = 20
    vd: int = 24
    decay: str = "mixed"
    segments: bool = True
    initial_state: bool = True
    chunk: int = 16
    blocks: BlockSizes = BlockSizes()

    @property
    def id(self) -> str:
        return (f"{self.backend}-{self.form}-{self.dtype}-T{self.t}-K{self.kd}V{self.vd}-"
                f"{self.decay}{'-seg' if self.segments else ''}"
                f"{'-init' if self.initial_state else ''}")


def _inputs(case: Case, key=0):
    b = 2
    ks = jax.random.split(jax.random.PRNGKey(key), 8)
    dtype = jnp.dtype(case.dtype)
    q = jax.random.normal(ks[0], (b, case.t, case.h, case.kd), dtype)
    k = jax.random.normal(ks[1], (b, case.t, case.h, case.kd), dtype)
    v = jax.random.normal(ks[2], (b, case.t, case.h, case.vd), dtype)
    log_decay = None
    if case.form != "none":
        shape = (b, case.t, case.h) + ((case.kd,) if case.form == "channel" else ())
        lo, hi = DECAYS[case.decay]
        u = jax.random.uniform(ks[3], shape)
        log_decay = -jnp.exp(np.log(lo) + u * (np.log(hi) - np.log(lo)))
    s0 = jax.random.normal(ks[4], (b, case.h, case.kd, case.vd)) if case.initial_state else None
    segment_ids = None
    if case.segments:  # row 0: three segments, one shorter than a chunk; row 1: one
        steps = jnp.arange(case.t)
        first = (steps >= case.t // 3).astype(jnp.int32) + (steps >= case.t // 3 + 5)
        segment_ids = jnp.stack([first, jnp.zeros_like(first)])
    return q, k, v, log_decay, s0, segment_ids


def _outputs_and_grads(fn, case: Case, inputs, **kwargs):
    """``(o, final state, grads wrt (q, k, v, log_decay, initial_state))`` of a random loss."""
    q, k, v, log_decay, s0, segment_ids = inputs
    wo = jax.random.normal(jax.random.PRNGKey(7), v.shape)
    ws = jax.random.normal(jax.random.PRNGKey(8), (q.shape[0], q.shape[2], q.shape[3], v.shape[3]))

    def loss(q, k, v, log_decay, s0):
        o, state = fn(q, k, v, log_decay, scale=case.kd ** -0.5, initial_state=s0,
                      return_final_state=True, segment_ids=segment_ids, **kwargs)
        return jnp.sum(o.astype(jnp.float32) * wo) + jnp.sum(state * ws), (o, state)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))
    (_, (o, state)), grads = grad(q, k, v, log_decay, s0)
    return o, state, grads


def _check(case: Case, interpret: bool = True):
    inputs = _inputs(case)
    o, state, grads = _outputs_and_grads(
        chunked_linear_attention, case, inputs, chunk_size=case.chunk, backend=case.backend,
        interpret=interpret, block_sizes=case.blocks)
    ref_inputs = tuple(None if x is None or x.dtype == jnp.int32 else x.astype(jnp.float32)
                       for x in inputs[:5]) + inputs[5:]
    o_ref, state_ref, grads_ref = _outputs_and_grads(
        chunked_linear_attention_reference, case, ref_inputs)
    q, _, v, _, _, _ = inputs
    chex.assert_shape(o, v.shape)
    chex.assert_type(o, v.dtype)
    chex.assert_shape(state, (q.shape[0], q.shape[2], q.shape[3], v.shape[3]))
    assert_relative_close(o, o_ref, case.dtype, "o")
    assert_relative_close(state, state_ref, case.dtype, "final_state")
    for name, g, g_ref in zip(("dq", "dk", "dv", "dlog_decay", "dinitial_state"), grads,
                              grads_ref):
        if g_ref is not None:
            assert_relative_close(g, g_ref, case.dtype, name)


FAST = [
    Case("gpu", "scalar"),
    Case("gpu", "channel", decay="strong"),
    Case("gpu", "channel", decay="weak", dtype="bfloat16", blocks=BlockSizes(block_v=16)),
    Case("gpu", "none", dtype="bfloat16", kd=64, vd=64, segments=False),
    Case("gpu", "scalar", decay="strong", dtype="bfloat16", kd=60, vd=60, initial_state=False),
    Case("gpu", "channel", t=200, h=1, kd=16, vd=16, chunk=32, segments=False),
    Case("tpu", "scalar", kd=16, vd=16, blocks=BlockSizes(sub_chunk=8)),
    Case("tpu", "channel", kd=16, vd=16, blocks=BlockSizes(sub_chunk=8)),
]
SLOW = [
    Case("gpu", "scalar", t=1000, h=1, kd=16, vd=16, chunk=64),
    Case("gpu", "channel", t=1000, h=1, kd=16, vd=16, chunk=64, decay="strong"),
    Case("gpu", "channel", kd=128, vd=128, dtype="bfloat16", chunk=64),
    Case("gpu", "none", kd=128, vd=64),
    Case("tpu", "channel", dtype="bfloat16", decay="weak", blocks=BlockSizes(sub_chunk=8)),
    Case("tpu", "none", t=200, h=1, kd=16, vd=16, chunk=32),
]


@pytest.mark.parametrize("case", FAST, ids=lambda c: c.id)
def test_matches_recurrence(case):
    _check(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW, ids=lambda c: c.id)
def test_matches_recurrence_slow(case):
    _check(case)


def test_segments_equal_separate_runs():
    """Packed sequences give what running each sequence alone gives (via effarch.ops)."""
    b, h, kd, vd, lengths = 1, 2, 16, 16, (21, 30, 12)
    t = sum(lengths)
    ks = jax.random.split(jax.random.PRNGKey(3), 4)
    q = jax.random.normal(ks[0], (b, t, h, kd))
    k = jax.random.normal(ks[1], (b, t, h, kd))
    v = jax.random.normal(ks[2], (b, t, h, vd))
    log_decay = -jax.random.uniform(ks[3], (b, t, h, kd), minval=1e-3, maxval=3.0)
    segment_ids = jnp.repeat(jnp.array([4, 9, 4]), jnp.array(lengths), total_repeat_length=t)
    run = jax.jit(lambda q, k, v, g, s: effarch_ops.linear_attention(
        q, k, v, g, segment_ids=s, chunk_size=16, return_final_state=True,
        implementation="pallas"))
    packed, final = run(q, k, v, log_decay, segment_ids[None])
    pieces, start = [], 0
    for n in lengths:
        piece = slice(start, start + n)
        o, last = run(q[:, piece], k[:, piece], v[:, piece], log_decay[:, piece],
                      jnp.zeros((b, n), jnp.int32))
        pieces.append(o)
        start += n
    assert_relative_close(packed, jnp.concatenate(pieces, 1), jnp.float32, "packed o")
    assert_relative_close(final, last, jnp.float32, "final state of the last segment")


@pytest.mark.parametrize("backend,chunk_size", [("gpu", 8), ("tpu", 12)])
def test_chunk_size_hint_rounds_up_to_a_kernel_tile(backend, chunk_size):
    # Mixer presets use chunk_size=8; the GPU kernel tiles 16, the TPU kernel rounds 12 to 16.
    keys = jax.random.split(jax.random.PRNGKey(7), 4)
    q, k, v = (jax.random.normal(key, (1, 21, 2, 8)) for key in keys[:3])
    log_decay = -jax.random.uniform(keys[3], (1, 21, 2))
    kwargs = dict(scale=0.3, initial_state=None, return_final_state=True, segment_ids=None)
    o, final = chunked_linear_attention(q, k, v, log_decay, chunk_size=chunk_size,
                                        backend=backend, interpret=True, **kwargs)
    o_ref, final_ref = chunked_linear_attention_reference(q, k, v, log_decay, **kwargs)
    assert_relative_close(o, o_ref, jnp.float32, "o")
    assert_relative_close(final, final_ref, jnp.float32, "final state")


@pytest.mark.parametrize(
    "backend,blocks,message",
    [("gpu", BlockSizes(chunk=24), "power of two"),
     ("gpu", BlockSizes(sub_chunk=32, chunk=16), "sub_chunk"),
     ("tpu", BlockSizes(chunk=12), "multiple of 8"),
     ("tpu", BlockSizes(block_v=64), "block_v")],
    ids=["gpu-chunk", "gpu-subchunk", "tpu-chunk", "tpu-block_v"])
def test_bad_block_sizes_raise(backend, blocks, message):
    q = jnp.zeros((1, 8, 1, 16))
    with pytest.raises(ValueError, match=message):
        chunked_linear_attention(q, q, q, None, scale=1.0, initial_state=None,
                                 return_final_state=False, segment_ids=None, chunk_size=16,
                                 backend=backend, interpret=True, block_sizes=blocks)


def test_shape_check_names_arrays():
    q = jnp.zeros((1, 8, 1, 16))
    with pytest.raises(ValueError, match="axis B of v"):
        chunked_linear_attention(q, q, jnp.zeros((2, 8, 1, 16)), None, scale=1.0,
                                 initial_state=None, return_final_state=False, segment_ids=None,
                                 chunk_size=16)


def _hardware_case(platform: str):
    if jax.default_backend() != platform:
        pytest.skip(f"needs a {platform.upper()}; default backend is {jax.default_backend()}")


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["none", "scalar", "channel"])
def test_compiles_on_gpu(form):
    _hardware_case("gpu")
    case = Case("gpu", form, dtype="bfloat16", t=1000, kd=64, vd=128, chunk=64)
    _check(case, interpret=False)


@pytest.mark.tpu
@pytest.mark.parametrize("form", ["none", "scalar", "channel"])
def test_compiles_on_tpu(form):
    _hardware_case("tpu")
    case = Case("tpu", form, dtype="bfloat16", t=1000, kd=64, vd=128, chunk=64)
    _check(case, interpret=False)

