"""ops.attention: the "xla" and "chunked" forms agree, values and gradients.

The float32 "xla" form is the reference; it is itself checked against an
independent numpy softmax attention, and "chunked" (and bfloat16 runs of both)
are held to it within the docs/design.md §5 tolerance on awkward shapes.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch import ops
from effarch.testing import assert_relative_close

# One compilation per shape and option set (eager dispatch is slower on CPU).
attention = jax.jit(
    ops.attention,
    static_argnames=("causal", "window", "scale", "softcap", "chunk_size", "implementation"),
)


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem: q [B,T,H,K], k [B,S,Hkv,K], v [B,S,Hkv,V]."""

    b: int = 2
    t: int = 63
    s: int | None = None  # defaults to t
    h: int = 4
    hkv: int = 2
    k: int = 16
    v: int | None = None  # defaults to k
    causal: bool = True
    window: int | None = None
    softcap: float | None = None
    scale: float | None = None
    segments: bool = False  # random packed segment ids (T == S)
    chunk_size: int = 16

    @property
    def kv_len(self) -> int:
        return self.t if self.s is None else self.s

    def inputs(self, dtype=jnp.float32, seed: int = 0):
        rng = np.random.default_rng(seed)
        dv = self.k if self.v is None else self.v

        def normal(*shape, dtype=dtype):
            return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

        q = normal(self.b, self.t, self.h, self.k)
        k = normal(self.b, self.kv_len, self.hkv, self.k)
        v = normal(self.b, self.kv_len, self.hkv, dv)
        cotangent = normal(self.b, self.t, self.h, dv, dtype=jnp.float32)
        segment_ids = None
        if self.segments:
            # Ids change at random steps; id 0 reappears later (a new segment).
            starts = rng.random((self.b, self.t)) < 0.05
            segment_ids = jnp.asarray(np.cumsum(starts, axis=1) % 3, jnp.int32)
        return q, k, v, cotangent, segment_ids

    def options(self, segment_ids):
        return dict(causal=self.causal, window=self.window, softcap=self.softcap,
                    scale=self.scale, segment_ids=segment_ids, chunk_size=self.chunk_size)


CASES = {
    "mha_T63_K60_softcap": Case(h=2, hkv=2, k=60, softcap=5.0, scale=1.0),
    "gqa_noncausal_T63_S100": Case(s=100, causal=False),
    "mqa_T1000": Case(b=1, t=1000, h=2, hkv=1, k=8, chunk_size=128),
    "decode_T1_S77": Case(t=1, s=77, h=6, hkv=2),
    "ends_aligned_T24_S70_V20": Case(t=24, s=70, k=12, v=20),
    "query_before_keys_T40_S24_window7": Case(t=40, s=24, window=7),
    "segments_causal_window20": Case(t=90, segments=True, window=20),
    "segments_noncausal": Case(t=90, segments=True, causal=False),
}
# Each case compiles a forward and backward per form: bfloat16 runs a subset.
BF16_CASES = ("mha_T63_K60_softcap", "decode_T1_S77", "segments_causal_window20")


def _output_and_grads(case: Case, implementation: str, q, k, v, cotangent, segment_ids):
    def loss(q, k, v):
        o = attention(q, k, v, implementation=implementation, **case.options(segment_ids))
        return jnp.sum(o.astype(jnp.float32) * cotangent), o

    (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return o, grads


def _numpy_attention(q, k, v, *, causal, window=None, softcap=None):
    """Independent float64 softmax attention, K/V repeated per query head."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    k = np.repeat(k, h // hkv, axis=2)
    v = np.repeat(v, h // hkv, axis=2)
    out = np.zeros((b, t, h, v.shape[-1]))
    for bi in range(b):
        for hi in range(h):
            for ti in range(t):
                pos = ti + s - t
                logits = k[bi, :, hi] @ q[bi, ti, hi] / np.sqrt(d)
                if softcap is not None:
                    logits = softcap * np.tanh(logits / softcap)
                keys = np.arange(s)
                seen = np.ones(s, bool)
                if causal:
                    seen &= keys <= pos
                if window is not None:
                    seen &= keys > pos - window
                if not seen.any():
                    continue
                w = np.exp(logits[seen] - logits[seen].max())
                out[bi, ti, hi] = (w / w.sum()) @ v[bi, seen, hi]
    return out


@pytest.mark.parametrize(
    "name, dtype",
    [(name, jnp.float32) for name in CASES] + [(name, jnp.bfloat16) for name in BF16_CASES],
    ids=[f"{name}-float32" for name in CASES] + [f"{name}-bfloat16" for name in BF16_CASES],
)
def test_chunked_matches_xla(name, dtype):
    case = CASES[name]
    q, k, v, cotangent, segment_ids = case.inputs(dtype)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref_o, ref_grads = _output_and_grads(case, "xla", *f32, cotangent, segment_ids)
    for implementation in ("chunked", "xla") if dtype == jnp.bfloat16 else ("chunked",):
        o, grads = _output_and_grads(case, implementation, q, k, v, cotangent, segment_ids)
        chex.assert_shape(o, (*q.shape[:3], v.shape[-1]))
        assert o.dtype == dtype
        assert [g.dtype for g in grads] == [dtype] * 3
        assert_relative_close(o, ref_o, dtype, name=f"{implementation} output")
        assert_relative_close(grads, ref_grads, dtype, name=f"{implementation} dq, dk, dv")


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_matches_numpy(implementation):
    case = Case(b=1, t=20, s=33, h=4, hkv=2, k=12, v=8, window=9, softcap=3.0,
                chunk_size=8)
    q, k, v, _, _ = case.inputs()
    o = attention(q, k, v, implementation=implementation, **case.options(None))
    ref = _numpy_attention(q, k, v, causal=True, window=9, softcap=3.0)
    assert_relative_close(o, ref, name=implementation)


@pytest.mark.parametrize(
    "implementation, causal",
    [("xla", True), ("chunked", True), ("chunked", False)],
    ids=["xla-causal", "chunked-causal", "chunked-noncausal"],
)
def test_segments_equal_separate_runs(implementation, causal):
    lengths = (23, 40, 23)
    case = Case(b=1, t=sum(lengths), causal=causal)
    q, k, v, _, _ = case.inputs()
    segment_ids = jnp.repeat(jnp.array([5, 2, 5]), jnp.array(lengths))[None]  # [1, T]
    packed = attention(q, k, v, causal=causal, segment_ids=segment_ids, chunk_size=16,
                           implementation=implementation)
    start = 0
    for length in lengths:
        part = slice(start, start + length)
        alone = attention(q[:, part], k[:, part], v[:, part], causal=causal,
                              chunk_size=16, implementation=implementation)
        assert_relative_close(packed[:, part], alone, name=f"segment at {start}")
        start += length


@pytest.mark.parametrize("window", [None, 5], ids=["full", "window5"])
@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_decode_matches_full_causal(implementation, window):
    case = Case(t=50, h=4, hkv=1)
    q, k, v, _, _ = case.inputs()
    full = attention(q, k, v, window=window, implementation=implementation,
                         chunk_size=16)
    for t in (0, 49):
        step = attention(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], window=window,
                             implementation=implementation, chunk_size=16)
        assert_relative_close(step, full[:, t:t + 1], name=f"decode step {t}")


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_queries_without_keys_give_zeros(implementation):
    b, t, s = 2, 12, 20
    case = Case(b=b, t=t, s=s, causal=False, chunk_size=8)
    q, k, v, cotangent, _ = case.inputs()
    q_ids = jnp.tile(jnp.arange(t) % 3, (b, 1))  # ids 0, 1, 2
    kv_ids = jnp.tile(jnp.arange(s) % 2, (b, 1))  # ids 0, 1 only
    o, grads = _output_and_grads(case, implementation, q, k, v, cotangent, (q_ids, kv_ids))
    unseen = (q_ids == 2)[..., None, None]
    chex.assert_trees_all_close(jnp.where(unseen, o, 0.0), jnp.zeros_like(o))
    assert float(jnp.abs(jnp.where(unseen, 0.0, o)).max()) > 0.0
    chex.assert_tree_all_finite(grads)
    chex.assert_trees_all_close(jnp.where(unseen, grads[0], 0.0), jnp.zeros_like(grads[0]))


def test_auto_matches_xla():
    case = Case(window=9)
    q, k, v, _, _ = case.inputs()
    auto = attention(q, k, v, window=9)
    xla = attention(q, k, v, window=9, implementation="xla")
    assert_relative_close(auto, xla)


def _bad(**changes):
    q = jnp.zeros((2, 8, 4, 16))
    k = jnp.zeros((2, 8, 2, 16))
    v = jnp.zeros((2, 8, 2, 16))
    args = dict(q=q, k=k, v=v)
    args.update({name: value for name, value in changes.items() if name in args})
    options = {name: value for name, value in changes.items() if name not in args}
    return args, options


BAD_INPUTS = {
    "q_rank3": (_bad(q=jnp.zeros((2, 8, 64))), "q: shape \\(2, 8, 64\\).*rank 4"),
    "k_head_dim": (_bad(k=jnp.zeros((2, 8, 2, 12))), "axis K of k is 12"),
    "batch": (_bad(v=jnp.zeros((3, 8, 2, 16))), "axis B of v is 3"),
    "kv_time": (_bad(v=jnp.zeros((2, 9, 2, 16))), "axis S of v is 9"),
    "kv_heads": (_bad(k=jnp.zeros((2, 8, 3, 16)), v=jnp.zeros((2, 8, 3, 16))),
                 "3 key/value heads .* must divide the 4 query heads"),
    "no_keys": (_bad(k=jnp.zeros((2, 0, 2, 16)), v=jnp.zeros((2, 0, 2, 16))), "S >= 1 keys"),
    "int_q": (_bad(q=jnp.zeros((2, 8, 4, 16), jnp.int32)), "expected a floating dtype"),
    "window0": (_bad(window=0), "window=0"),
    "window_noncausal": (_bad(window=4, causal=False), "pass causal=True"),
    "softcap0": (_bad(softcap=0.0), "softcap=0.0"),
    "chunk0": (_bad(chunk_size=0), "chunk_size=0"),
    "segment_float": (_bad(segment_ids=jnp.zeros((2, 8))), "expected an integer array"),
    "segment_shape": (_bad(segment_ids=jnp.zeros((2, 7), jnp.int32)), "\\[B,T\\] = \\[2,8\\]"),
    "segment_one_array_T_ne_S": (
        _bad(k=jnp.zeros((2, 5, 2, 16)), v=jnp.zeros((2, 5, 2, 16)),
             segment_ids=jnp.zeros((2, 8), jnp.int32)),
        "pass a pair"),
    "segment_pair_kv_shape": (
        _bad(segment_ids=(jnp.zeros((2, 8), jnp.int32), jnp.zeros((2, 5), jnp.int32))),
        "kv_segment_ids.*\\[B,T\\] = \\[2,8\\]"),
    "segment_triple": (_bad(segment_ids=(jnp.zeros((2, 8), jnp.int32),) * 3), "pair"),
    "unknown_implementation": (_bad(implementation="flash"), "unknown implementation"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_raise(name):
    (args, options), match = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=match):
        ops.attention(args["q"], args["k"], args["v"], **options)


def test_cudnn_off_a_gpu_raises():
    # "pallas" is implemented (pallas_kernels/attention, tests/pallas_kernels/attention/test_attention_kernel.py).
    implementation = "cudnn"
    if jax.default_backend() == "gpu":
        pytest.skip("cudnn is available on this platform")
    args, options = _bad(implementation=implementation)
    with pytest.raises(NotImplementedError, match=implementation):
        ops.attention(args["q"], args["k"], args["v"], **options)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("window", [None, 32], ids=["full", "window32"])
def test_cudnn_matches_xla(window):
    case = Case(b=2, t=256, h=8, hkv=2, k=64, window=window)
    q, k, v, cotangent, _ = case.inputs(jnp.bfloat16)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref_o, ref_grads = _output_and_grads(case, "xla", *f32, cotangent, None)
    o, grads = _output_and_grads(case, "cudnn", q, k, v, cotangent, None)
    assert_relative_close(o, ref_o, jnp.bfloat16, name="cudnn output")
    assert_relative_close(grads, ref_grads, jnp.bfloat16, name="cudnn dq, dk, dv")


@pytest.mark.parametrize("length", [1, 5, 16, 17, 77], ids=lambda n: f"filled{n}")
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
def test_decode_attention_matches_numpy_over_the_filled_slots(length, softcap):
    """Slots past ``length`` hold garbage and must not count; blocks of 16 over a cache of 77."""
    b, cache_len, h, hkv, d = 2, 77, 6, 2, 12
    rng = np.random.default_rng(length)
    q = jnp.asarray(rng.standard_normal((b, 1, h, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, cache_len, hkv, d)) * 3, jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, cache_len, hkv, d)), jnp.float32)
    step = jax.jit(ops.decode_attention, static_argnames=("softcap", "block_size"))
    o = step(q, k, v, jnp.int32(length), softcap=softcap, block_size=16)
    expected = _numpy_attention(q, k[:, :length], v[:, :length], causal=False, softcap=softcap)
    np.testing.assert_allclose(o, expected, rtol=1e-5, atol=1e-5)


def test_decode_attention_refuses_several_queries():
    q = jnp.zeros((1, 2, 2, 4))
    kv = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match=r"has T=2; expected one query step"):
        ops.decode_attention(q, kv, kv, 3)
