"""Pallas attention kernels against effarch.ops.attention's XLA form.

On CPU the GPU kernels run with ``interpret=True`` and the TPU path (splash
attention where it covers the call, else our Mosaic kernels) in the TPU
interpreter (``pltpu.InterpretParams``); each case checks the output and the
gradients of q, k and v in one jitted ``value_and_grad`` against the float32
XLA form (plain masked softmax) on the same inputs.

bfloat16: the kernel gets bf16 inputs, the reference the same values in
float32, so the difference is the kernel's own rounding: bf16 matmul operands
(P and dZ are rounded to bf16 before their matmuls, as in every flash kernel)
and the bf16 output. The bound is design §5's 1e-2, and the kernel's error
must also stay within twice the XLA form's own error when it runs in bf16
(plus 1e-3): no worse than what the plain form loses to bf16.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import pytest

from effarch import ops
from effarch.testing import assert_relative_close, relative_rmse, tolerance
from pallas_kernels import _platform
from pallas_kernels.attention import BlockSizes, attention, tpu
from pallas_kernels.attention import ops as ops_module
from pallas_kernels.attention.reference import attention_reference

NAMES = ("o", "dq", "dk", "dv")


@dataclasses.dataclass(frozen=True)
class Case:
    backend: str = "gpu"
    dtype: str = "float32"
    t: int = 63
    s: int | None = None  # None: T
    h: int = 4
    hkv: int = 2
    kd: int = 60
    vd: int = 60
    causal: bool = True
    window: int | None = None
    segments: str | None = None  # None | "runs" (one [B,T] array) | "pair" (q ids, kv ids)
    softcap: float | None = None
    blocks: BlockSizes = BlockSizes()

    @property
    def id(self) -> str:
        s = "" if self.s is None else f"S{self.s}"
        return "-".join(filter(None, [
            self.backend, self.dtype, f"T{self.t}{s}", f"H{self.h}kv{self.hkv}",
            f"K{self.kd}V{self.vd}", "causal" if self.causal else "full",
            self.window and f"w{self.window}", self.segments and f"seg_{self.segments}",
            self.softcap and "softcap"]))


def _inputs(case: Case):
    b, s = 2, case.s or case.t
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    dtype = jnp.dtype(case.dtype)
    q = jax.random.normal(ks[0], (b, case.t, case.h, case.kd)).astype(dtype)
    k = jax.random.normal(ks[1], (b, s, case.hkv, case.kd)).astype(dtype)
    v = jax.random.normal(ks[2], (b, s, case.hkv, case.vd)).astype(dtype)
    segment_ids = None
    if case.segments == "runs":  # row 0: three segments, one of 5 steps; row 1: one
        steps = jnp.arange(case.t)
        first = (steps >= case.t // 3).astype(jnp.int32) + (steps >= case.t // 3 + 5)
        segment_ids = jnp.stack([first, jnp.zeros_like(first)])
    elif case.segments == "pair":  # ids 0..2 in stripes: some queries see no key
        segment_ids = (jax.random.randint(ks[3], (b, case.t), 0, 3),
                       jnp.arange(b * s).reshape(b, s) // 7 % 3)
    return q, k, v, segment_ids


def _values_and_grads(fn, q, k, v):
    wo = jax.random.normal(jax.random.PRNGKey(7), (*q.shape[:3], v.shape[3]))

    def loss(q, k, v):
        o = fn(q, k, v)
        return jnp.sum(o.astype(jnp.float32) * wo), o

    (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return (o, *grads)


def _options(case: Case, segment_ids):
    return dict(causal=case.causal, window=case.window, segment_ids=segment_ids,
                softcap=case.softcap)


def _check(case: Case, interpret: bool = True):
    q, k, v, segment_ids = _inputs(case)
    options = _options(case, segment_ids)
    got = _values_and_grads(lambda q, k, v: attention(
        q, k, v, **options, backend=case.backend, interpret=interpret,
        block_sizes=case.blocks), q, k, v)
    xla = lambda q, k, v: ops.attention(q, k, v, **options, implementation="xla")  # noqa: E731
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = _values_and_grads(xla, f32(q), f32(k), f32(v))
    chex.assert_shape(got[0], (*q.shape[:3], v.shape[3]))
    chex.assert_type(got[0], q.dtype)
    if case.dtype == "float32":
        for name, g, w in zip(NAMES, got, want):
            assert_relative_close(g, w, case.dtype, name)
        return
    plain = _values_and_grads(xla, q, k, v)
    for name, g, w, p in zip(NAMES, got, want, plain):
        err, bound = relative_rmse(g, w), min(tolerance(case.dtype), 2 * relative_rmse(p, w) + 1e-3)
        assert err <= bound, f"{name}: relative RMS error {err:.3e} > {bound:.3e}"


FAST = [
    Case(segments="runs", softcap=20.0),
    Case(hkv=1, kd=32, vd=16, window=10, dtype="bfloat16"),
    Case(t=1, h=2, hkv=1, kd=16, vd=16),
    # TPU: splash attention (runs of ids), then our Mosaic kernels (an id pair).
    Case(backend="tpu", kd=32, vd=32, segments="runs", window=20, softcap=20.0),
    Case(backend="tpu", t=45, s=70, hkv=1, kd=32, vd=16, segments="pair"),
]
SLOW = [
    Case(t=1000, h=2, hkv=1, kd=64, vd=64, segments="runs", window=300),
    Case(t=1000, h=2, hkv=1, kd=64, vd=64, dtype="bfloat16", softcap=30.0),
    Case(t=45, s=100, causal=True, segments="pair"),
    Case(t=100, s=45, causal=True),
    Case(t=63, s=80, causal=False, softcap=5.0),
    Case(hkv=4, window=1, blocks=BlockSizes(block_q=16, block_k=32)),
    Case(backend="tpu", dtype="bfloat16", hkv=1, softcap=30.0),
    Case(backend="tpu", t=200, h=2, hkv=1, kd=32, vd=32, causal=False),
    Case(backend="tpu", t=100, s=45, h=2, hkv=1, kd=32, vd=32, window=30),
]


@pytest.mark.parametrize("case", FAST, ids=lambda c: c.id)
def test_matches_xla_form(case):
    _check(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW, ids=lambda c: c.id)
def test_matches_xla_form_slow(case):
    _check(case)


def test_reference_matches_xla_form():
    """reference.py (standalone) and the XLA form agree: two independent truths."""
    case = Case(t=40, s=50, segments="pair", window=7, softcap=3.0)
    q, k, v, segment_ids = _inputs(case)
    o = ops.attention(q, k, v, **_options(case, segment_ids), implementation="xla")
    ref = attention_reference(q, k, v, **_options(case, segment_ids), scale=case.kd ** -0.5)
    assert_relative_close(o, ref, jnp.float32, "o")


def test_effarch_op_dispatches_to_kernel():
    q, k, v, segment_ids = _inputs(Case(t=24, h=2, hkv=1, kd=16, vd=16, segments="runs"))
    run = lambda impl: ops.attention(q, k, v, segment_ids=segment_ids, softcap=4.0,  # noqa: E731
                                     implementation=impl)
    assert_relative_close(run("pallas"), run("xla"), jnp.float32, "o")


@pytest.mark.parametrize("kwargs,message", [
    (dict(window=0), "window=0"),
    (dict(window=4, causal=False), "window=4"),
    (dict(softcap=-1.0), "softcap=-1.0"),
    (dict(block_sizes=BlockSizes(block_q=24)), "block_q=24"),
    (dict(block_sizes=BlockSizes(block_k=64), backend="tpu"), "block_k=64"),
    (dict(segment_ids=jnp.zeros((2, 9), jnp.int32)), r"segment_ids: shape \(2, 9\)"),
], ids=["window0", "window-noncausal", "softcap", "block_q", "tpu-block_k", "segment-shape"])
def test_bad_inputs_raise(kwargs, message):
    q = jnp.zeros((2, 8, 2, 16))
    with pytest.raises(ValueError, match=message):
        attention(q, q, q, interpret=True, **kwargs)


@pytest.mark.parametrize("causal,t,s,segments,expected", [
    (True, 8, 8, "runs", None), (False, 8, 12, None, None), (True, 8, 12, None, None),
    (True, 12, 8, None, "T=12 > S=8"), (True, 8, 8, "pair", "pair")],
    ids=["runs", "full", "causal-short-q", "causal-long-q", "pair"])
def test_tpu_uses_splash_where_it_covers_the_call(causal, t, s, segments, expected):
    cfg = ops_module._Config(
        target=_platform.KernelTarget(backend="tpu", interpret=True), block_sizes=BlockSizes(),
        causal=causal, window=None, scale=1.0, softcap=None, q_len=t, kv_len=s)
    reason = tpu.splash_unsupported(cfg, segments)
    assert reason is None if expected is None else expected in reason


def test_heads_must_divide():
    q, k = jnp.zeros((1, 8, 3, 16)), jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="Hkv=2"):
        attention(q, k, k, interpret=True)


def _hardware_case(platform: str):
    if jax.default_backend() != platform:
        pytest.skip(f"needs a {platform.upper()}; default backend is {jax.default_backend()}")


@pytest.mark.gpu
@pytest.mark.parametrize("segments", [None, "runs"])
def test_compiles_on_gpu(segments):
    _hardware_case("gpu")
    _check(Case(t=1000, h=8, hkv=2, kd=128, vd=128, dtype="bfloat16", segments=segments,
                softcap=30.0), interpret=False)
