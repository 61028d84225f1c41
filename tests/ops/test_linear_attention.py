"""ops.linear_attention: every form equals the float32 recurrence, values and gradients."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch import ops
from effarch.ops import _common
from effarch.testing import assert_relative_close

PARALLEL_FORMS = ("quadratic", "chunked")
DECAYS = ("none", "head", "scalar", "channel")


def make_inputs(key, b, t, h, kd, vd, decay, strength, dtype=jnp.float32):
    """Random q, k, v, log_decay, initial_state; decay strength in log space per step."""
    ks = jax.random.split(key, 5)
    q = jax.random.normal(ks[0], (b, t, h, kd), dtype)
    k = jax.random.normal(ks[1], (b, t, h, kd), dtype)
    v = jax.random.normal(ks[2], (b, t, h, vd), dtype)
    shape = {"none": None, "head": (h,), "scalar": (b, t, h), "channel": (b, t, h, kd)}[decay]
    log_decay = None
    if shape is not None:
        # Uniform in [strength, strength / 10]: every step decays by about that much.
        u = jax.random.uniform(ks[3], shape, jnp.float32, 0.1, 1.0)
        log_decay = strength * u
    s0 = jax.random.normal(ks[4], (b, h, kd, vd), jnp.float32)
    return q, k, v, log_decay, s0


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def run(impl, q, k, v, log_decay, s0, segment_ids=None, chunk_size=16):
    return ops.linear_attention(
        q, k, v, log_decay, initial_state=s0, return_final_state=True,
        segment_ids=segment_ids, chunk_size=chunk_size, implementation=impl)


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def loss_and_grads(impl, q, k, v, log_decay, s0, segment_ids=None, chunk_size=16):
    """Gradients of a random linear functional of (o, S) wrt every input."""
    wo = jax.random.normal(jax.random.PRNGKey(7), v.shape, jnp.float32)
    ws = jax.random.normal(jax.random.PRNGKey(8), s0.shape, jnp.float32)

    def loss(q, k, v, log_decay, s0):
        o, s = run(impl, q, k, v, log_decay, s0, segment_ids, chunk_size)
        return jnp.sum(o.astype(jnp.float32) * wo) + jnp.sum(s * ws)

    argnums = (0, 1, 2, 4) if log_decay is None else (0, 1, 2, 3, 4)
    return jax.grad(loss, argnums=argnums)(q, k, v, log_decay, s0)


def upcast(*xs):
    return tuple(None if x is None else x.astype(jnp.float32) for x in xs)


FORM_CASES = [
    pytest.param(impl, decay, strength, jnp.float32, id=f"{impl}-{decay}-{name}-f32")
    for impl in PARALLEL_FORMS for decay in DECAYS
    for strength, name in ((-1e-3, "weak"), (-20.0, "strong"))
] + [
    pytest.param("chunked", decay, strength, jnp.bfloat16, id=f"chunked-{decay}-{name}-bf16")
    for decay in ("scalar", "channel") for strength, name in ((-1e-3, "weak"), (-20.0, "strong"))
]


@pytest.mark.parametrize("impl,decay,strength,dtype", FORM_CASES)
def test_forms_agree_values_and_grads(impl, decay, strength, dtype):
    q, k, v, g, s0 = make_inputs(jax.random.PRNGKey(0), 2, 63, 2, 12, 10, decay, strength, dtype)
    ref_inputs = (*upcast(q, k, v), g, s0)
    o_ref, s_ref = run("recurrent", *ref_inputs)
    o, s = run(impl, q, k, v, g, s0)
    chex.assert_shape(o, (2, 63, 2, 10))
    chex.assert_type(o, dtype)
    chex.assert_type(s, jnp.float32)
    assert_relative_close(o, o_ref, dtype, "o")
    assert_relative_close(s, s_ref, dtype, "final_state")
    grads = loss_and_grads(impl, q, k, v, g, s0)
    grads_ref = loss_and_grads("recurrent", *ref_inputs)
    assert_relative_close(grads, grads_ref, dtype, "grads")


@pytest.mark.parametrize("t", [1, 63, 1000])
@pytest.mark.parametrize("decay", ["scalar", "channel"])
def test_awkward_lengths_and_key_dim(t, decay):
    """T = 1, 63, 1000 and K = 60 (no power of two), chunk 64 against the recurrence."""
    q, k, v, g, s0 = make_inputs(jax.random.PRNGKey(1), 1, t, 1, 60, 8, decay, -0.5)
    o_ref, s_ref = run("recurrent", q, k, v, g, s0, chunk_size=64)
    forms = PARALLEL_FORMS if t <= 63 else ("chunked",)
    for impl in forms:
        o, s = run(impl, q, k, v, g, s0, chunk_size=64)
        assert_relative_close((o, s), (o_ref, s_ref), jnp.float32, f"{impl} T={t}")
    grads_ref = loss_and_grads("recurrent", q, k, v, g, s0, chunk_size=64)
    grads = loss_and_grads("chunked", q, k, v, g, s0, chunk_size=64)
    assert_relative_close(grads, grads_ref, jnp.float32, f"chunked grads T={t}")


@pytest.mark.parametrize("chunk_size", [1, 5, 48, 200])
def test_chunk_sizes(chunk_size):
    """Any chunk size, with or without sub-chunks, equals the recurrence."""
    q, k, v, g, s0 = make_inputs(jax.random.PRNGKey(2), 1, 50, 2, 8, 4, "channel", -1.0)
    ref = run("recurrent", q, k, v, g, s0)
    assert_relative_close(run("chunked", q, k, v, g, s0, chunk_size=chunk_size), ref)


def test_quadratic_matches_numpy_closed_form():
    """The dual O = (Q K^T ∘ L) V written independently in numpy, scalar decay."""
    q, k, v, g, _ = make_inputs(jax.random.PRNGKey(3), 1, 9, 1, 4, 3, "scalar", -0.7)
    qn, kn, vn, gn = (np.asarray(x, np.float64)[0, :, 0] for x in (q, k, v, g))
    t = qn.shape[0]
    L = np.zeros((t, t))
    for i in range(t):
        for j in range(i + 1):
            L[i, j] = np.exp(gn[j + 1:i + 1].sum())
    expected = ((qn @ kn.T) * L) @ vn * 4 ** -0.5
    for impl in ("recurrent",) + PARALLEL_FORMS:
        o, _ = ops.linear_attention(q, k, v, g, implementation=impl)
        np.testing.assert_allclose(np.asarray(o)[0, :, 0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ("recurrent",) + PARALLEL_FORMS)
@pytest.mark.parametrize("decay", ["none", "channel"])
def test_packed_segments_equal_separate_runs(impl, decay):
    lengths = [5, 17, 1, 9]  # ids repeat non-contiguously: 0, 1, 0, 2
    ids = [0, 1, 0, 2]
    t = sum(lengths)
    q, k, v, g, s0 = make_inputs(jax.random.PRNGKey(4), 1, t, 2, 6, 5, decay, -0.3)
    segment_ids = jnp.asarray(np.repeat(ids, lengths)[None], jnp.int32)
    o, s = run(impl, q, k, v, g, s0, segment_ids=segment_ids, chunk_size=8)
    start = 0
    for i, n in enumerate(lengths):
        piece = lambda x: None if x is None or x.ndim == 1 else x[:, start:start + n]
        init = s0 if i == 0 else jnp.zeros_like(s0)  # initial_state feeds the first segment
        gi = g if g is None or g.ndim == 1 else piece(g)
        o_i, s_i = run("recurrent", piece(q), piece(k), piece(v), gi, init)
        assert_relative_close(o[:, start:start + n], o_i, jnp.float32, f"segment {i}")
        start += n
    assert_relative_close(s, s_i, jnp.float32, "final state = last segment's")


@pytest.mark.parametrize("impl", ("recurrent",) + PARALLEL_FORMS)
def test_prefix_then_continue_equals_full(impl):
    q, k, v, g, s0 = make_inputs(jax.random.PRNGKey(5), 2, 40, 2, 8, 6, "scalar", -0.2)
    o_full, s_full = run(impl, q, k, v, g, s0)
    split = 23
    o1, s1 = run(impl, q[:, :split], k[:, :split], v[:, :split], g[:, :split], s0)
    o2, s2 = run(impl, q[:, split:], k[:, split:], v[:, split:], g[:, split:], s1)
    assert_relative_close(jnp.concatenate([o1, o2], 1), o_full, jnp.float32, "o")
    assert_relative_close(s2, s_full, jnp.float32, "state")


def test_defaults_scale_and_no_state():
    q, k, v, _, _ = make_inputs(jax.random.PRNGKey(6), 1, 10, 1, 9, 3, "none", 0.0)
    o, s = ops.linear_attention(q, k, v)
    assert s is None
    o2, _ = ops.linear_attention(q, k, v, scale=1.0, implementation="recurrent")
    assert_relative_close(o * 3.0, o2)  # default scale is K ** -0.5 = 1/3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("decay", ["scalar", "channel"])
def test_strong_decay_long_sequence_is_finite(dtype, decay):
    """log_decay -20 per step over T = 4096: no inf or NaN forward or backward."""
    t = 4096
    q, k, v, _, s0 = make_inputs(jax.random.PRNGKey(9), 1, t, 1, 4, 4, "none", 0.0, dtype)
    shape = (1, t, 1) if decay == "scalar" else (1, t, 1, 4)
    g = jnp.full(shape, -20.0)
    grads = loss_and_grads("chunked", q, k, v, g, s0, chunk_size=64)
    o, s = run("chunked", q, k, v, g, s0, chunk_size=64)
    for x in (o, s, *grads):
        assert bool(jnp.all(jnp.isfinite(x.astype(jnp.float32))))
    # With a = exp(-20), S_t is k_t v_t^T to float32 precision.
    qf, kf, vf = upcast(q, k, v)
    expected = jnp.einsum("bthk,bthk->bth", qf, kf)[..., None] * vf * 4 ** -0.5
    assert_relative_close(o, expected, dtype)


def test_jit_and_vmap():
    q, k, v, g, s0 = make_inputs(jax.random.PRNGKey(10), 2, 20, 2, 4, 4, "scalar", -0.5)
    f = jax.jit(lambda *a: run("chunked", *a))
    ref = run("recurrent", q, k, v, g, s0)
    assert_relative_close(f(q, k, v, g, s0), ref)
    batched = jax.vmap(lambda *a: run("chunked", *a), in_axes=(0, 0, 0, 0, 0))(
        q[:, None], k[:, None], v[:, None], g[:, None], s0[:, None])
    assert_relative_close((batched[0][:, 0], batched[1][:, 0]), ref)


@pytest.mark.parametrize("decay", ("none", "head", "scalar", "channel"))
@pytest.mark.parametrize("groups", (1, 2))
def test_grouped_queries_and_keys_equal_the_recurrence_on_repeated_heads(groups, decay):
    """q, k with G heads (Mamba-2's ngroups), each shared by H / G = 6 / G value heads.

    The chunked form computes each group's scores once (no repeat for a scalar or
    no decay); the reference is the recurrence on q, k repeated per value head,
    with packed segments and an initial state. Values, final state and every
    gradient (a group's q gradient sums over its heads).
    """
    h, t = 6, 37
    q, k, v, log_decay, s0 = make_inputs(jax.random.PRNGKey(5), 2, t, h, 4, 3, decay, -0.3)
    q, k = q[:, :, :groups], k[:, :, :groups]
    ids = jnp.asarray(np.repeat([[0, 1, 2], [3, 3, 4]], [10, 17, 10], axis=1), jnp.int32)
    repeated = lambda q, k: (jnp.repeat(q, h // groups, axis=2), jnp.repeat(k, h // groups, axis=2))
    o, s = run("chunked", q, k, v, log_decay, s0, ids, chunk_size=8)
    o_ref, s_ref = run("recurrent", *repeated(q, k), v, log_decay, s0, ids)
    assert_relative_close(o, o_ref, name="o")
    assert_relative_close(s, s_ref, name="final state")
    grads = loss_and_grads("chunked", q, k, v, log_decay, s0, ids, chunk_size=8)

    wo = jax.random.normal(jax.random.PRNGKey(7), v.shape, jnp.float32)
    ws = jax.random.normal(jax.random.PRNGKey(8), s0.shape, jnp.float32)

    def loss(q, k, v, log_decay, s0):
        o, s = run("recurrent", *repeated(q, k), v, log_decay, s0, ids)
        return jnp.sum(o * wo) + jnp.sum(s * ws)

    argnums = (0, 1, 2, 4) if log_decay is None else (0, 1, 2, 3, 4)
    expected = jax.grad(loss, argnums=argnums)(q, k, v, log_decay, s0)
    for name, got, want in zip(("q", "k", "v", "log_decay", "s0") if log_decay is not None
                               else ("q", "k", "v", "s0"), grads, expected):
        assert_relative_close(got, want, name=f"d{name}")


class TestBadInput:
    def inputs(self):
        return make_inputs(jax.random.PRNGKey(11), 2, 8, 3, 4, 5, "scalar", -0.5)

    def test_rank(self):
        q, k, v, *_ = self.inputs()
        with pytest.raises(ValueError, match=r"q: shape \(2, 8, 12\).*expected rank 4"):
            ops.linear_attention(q.reshape(2, 8, 12), k, v)

    def test_mismatched_key_dim(self):
        q, k, v, *_ = self.inputs()
        with pytest.raises(ValueError, match=r"axis K of k is 3"):
            ops.linear_attention(q, k[..., :3], v)

    def test_mismatched_time(self):
        q, k, v, *_ = self.inputs()
        with pytest.raises(ValueError, match=r"axis T of v is 7"):
            ops.linear_attention(q, k, v[:, :7])

    def test_decay_shape_fits_no_form(self):
        q, k, v, *_ = self.inputs()
        with pytest.raises(ValueError, match=r"log_decay: shape \(2, 8\).*fits no decay form.*\[B,T,H\]=\(2, 8, 3\)"):
            ops.linear_attention(q, k, v, jnp.zeros((2, 8)))

    def test_state_shape(self):
        q, k, v, *_ = self.inputs()
        with pytest.raises(ValueError, match=r"initial_state"):
            ops.linear_attention(q, k, v, initial_state=jnp.zeros((2, 3, 4, 4)))

    def test_float_segment_ids(self):
        q, k, v, *_ = self.inputs()
        with pytest.raises(ValueError, match=r"segment_ids: shape \(2, 8\) float32; expected an integer"):
            ops.linear_attention(q, k, v, segment_ids=jnp.zeros((2, 8)))

    def test_segment_ids_shape(self):
        q, k, v, *_ = self.inputs()
        with pytest.raises(ValueError, match=r"expected \[B,T\] = \[2,8\]"):
            ops.linear_attention(q, k, v, segment_ids=jnp.zeros((2, 9), jnp.int32))

    def test_unknown_implementation_lists_valid(self):
        q, k, v, *_ = self.inputs()
        with pytest.raises(ValueError, match=r"unknown implementation='fast'.*'recurrent'.*'chunked'"):
            ops.linear_attention(q, k, v, implementation="fast")

    def test_unsupported_implementation(self):
        q, k, v, *_ = self.inputs()
        with pytest.raises(NotImplementedError, match=r"no implementation='cudnn'"):
            ops.linear_attention(q, k, v, implementation="cudnn")

    def test_groups_must_divide_value_heads(self):
        q, k, v, *_ = self.inputs()
        with pytest.raises(ValueError, match=r"q and k have 2 heads, v has 3; the query/key heads \(groups\) "
                                             r"must divide"):
            ops.linear_attention(q[:, :, :2], k[:, :, :2], v)

    def test_chunk_size(self):
        q, k, v, *_ = self.inputs()
        with pytest.raises(ValueError, match=r"chunk_size=0"):
            ops.linear_attention(q, k, v, chunk_size=0)


def test_auto_keeps_xla_on_devices_until_a_kernel_is_verified(monkeypatch):
    """docs/design.md §3: on CPU the recurrence forward only, chunked for training."""
    auto = functools.partial(_common.auto_policy, "linear_attention")
    assert [auto(p) for p in ("cpu", "gpu", "tpu")] == [
        ("recurrent", "chunked"), ("chunked", "chunked"), ("chunked", "chunked")]
    monkeypatch.setitem(_common.VERIFIED_KERNELS, "linear_attention", ("gpu",))
    assert auto("gpu") == ("pallas", "pallas") and auto("tpu") == ("chunked", "chunked")
