"""ops.delta_rule and ops.generalized_delta_rule: every form against the recurrence."""

from __future__ import annotations

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch import ops
from effarch.testing import assert_relative_close

WEAK, STRONG = -1e-3, -20.0  # log decay per step: gates near 1, gates near 0


def normal(rng, *shape):
    return rng.standard_normal(shape, np.float32)


def delta_inputs(seed, batch, time, heads, key_dim, value_dim, decay, dtype=jnp.float32):
    """Inputs of ``ops.delta_rule`` with L2-normalised keys and beta in (0, 1).

    Drawn with numpy: eager ``jax.random`` compiles a kernel per shape, which
    costs more CPU time than the tests themselves.
    """
    rng = np.random.default_rng(seed)
    k = normal(rng, batch, time, heads, key_dim)
    x = dict(
        q=normal(rng, batch, time, heads, key_dim),
        k=k / np.linalg.norm(k, axis=-1, keepdims=True),
        v=normal(rng, batch, time, heads, value_dim),
        beta=1.0 / (1.0 + np.exp(-normal(rng, batch, time, heads))),
        log_decay=decay * rng.uniform(0.5, 1.0, (batch, time, heads)),
    )
    x = {name: jnp.asarray(a, dtype) for name, a in x.items()}
    x["initial_state"] = jnp.asarray(normal(rng, batch, heads, key_dim, value_dim))
    return x


def generalized_inputs(seed, batch, time, heads, key_dim, value_dim, decay=None):
    """RWKV-7-like inputs: ``a = -kappa * iclr``, ``b = kappa``.

    ``log_decay`` in RWKV-7's range ``(-exp(-0.5), 0)`` by default, else
    ``decay`` times a uniform draw from ``[0.5, 1)``.
    """
    rng = np.random.default_rng(seed)
    shape = (batch, time, heads, key_dim)
    kappa = normal(rng, *shape)
    kappa = kappa / np.linalg.norm(kappa, axis=-1, keepdims=True)
    x = dict(
        q=normal(rng, *shape),
        k=0.5 * normal(rng, *shape),
        v=normal(rng, batch, time, heads, value_dim),
        a=-kappa * rng.uniform(0.0, 1.0, shape),
        b=kappa,
        log_decay=(
            -np.exp(-0.5) / (1.0 + np.exp(-normal(rng, *shape))) if decay is None
            else decay * rng.uniform(0.5, 1.0, shape)
        ),
        initial_state=normal(rng, batch, heads, key_dim, value_dim),
    )
    return {name: jnp.asarray(a, jnp.float32) for name, a in x.items()}


@functools.partial(jax.jit, static_argnames=("op", "implementation", "chunk_size", "scale"))
def run(op, inputs, implementation="auto", chunk_size=64, scale=None):
    """Calls ``op`` on an inputs dict (``segment_ids`` included), returning ``(o, S)``.

    Jitted: eager dispatch compiles every primitive on its own, slower on CPU.
    """
    return op(
        **inputs, return_final_state=True, implementation=implementation,
        chunk_size=chunk_size, scale=scale,
    )


def cotangents(o_shape, state_shape):
    """Fixed random cotangents for ``(o, S)``: gradients of a random projection."""
    rng = np.random.default_rng(7)
    return jnp.asarray(normal(rng, *o_shape)), jnp.asarray(normal(rng, *state_shape))


@functools.partial(jax.jit, static_argnames=("op", "options"))
def value_and_grads(inputs, op, options):
    """``(o, S)`` and the gradients of a fixed random projection of both."""
    (o, state), pullback = jax.vjp(lambda x: run(op, x, **dict(options)), inputs)
    d_o, d_state = cotangents(o.shape, state.shape)
    (grads,) = pullback((d_o.astype(o.dtype), d_state))
    return (o, state), grads


def as_float32(tree):
    return jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), tree)


# ---------------------------------------------------------------------------
# delta_rule: chunked against recurrent
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "time", [1, 63, pytest.param(1000, marks=pytest.mark.slow)], ids=lambda t: f"T{t}"
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("decay", [WEAK, STRONG], ids=["weak", "strong"])
def test_chunked_matches_recurrent(time, dtype, decay):
    key_dim = 60 if time == 63 else 16
    inputs = delta_inputs(0, 2, time, 2, key_dim, 12, decay, dtype)
    (o, state), grads = value_and_grads(
        inputs, ops.delta_rule, (("implementation", "chunked"), ("chunk_size", 32))
    )
    (o_ref, state_ref), grads_ref = value_and_grads(
        as_float32(inputs), ops.delta_rule, (("implementation", "recurrent"),)
    )
    assert o.dtype == dtype and state.dtype == jnp.float32
    chex.assert_shape(o, (2, time, 2, 12))
    chex.assert_shape(state, (2, 2, key_dim, 12))
    assert_relative_close(o, o_ref, dtype, "o")
    assert_relative_close(state, state_ref, dtype, "final_state")
    assert_relative_close(grads, grads_ref, dtype, "grad")


def test_auto_without_decay_or_initial_state_matches_recurrent():
    inputs = delta_inputs(1, 1, 40, 2, 8, 8, WEAK)
    del inputs["log_decay"], inputs["initial_state"]
    o_auto, state_auto = run(ops.delta_rule, inputs, chunk_size=16)
    o_ref, state_ref = run(ops.delta_rule, inputs, implementation="recurrent")
    assert_relative_close((o_auto, state_auto), (o_ref, state_ref), name="no decay")


FORMS = {
    "delta_recurrent": (ops.delta_rule, "recurrent"),
    "delta_chunked": (ops.delta_rule, "chunked"),
    "generalized_recurrent": (ops.generalized_delta_rule, "recurrent"),
    "generalized_chunked": (ops.generalized_delta_rule, "chunked"),
}


@pytest.mark.parametrize("form", ["delta_chunked", "generalized_chunked"])
def test_finite_at_long_strong_decay(form):
    op, implementation = FORMS[form]
    make = delta_inputs if form.startswith("delta") else generalized_inputs
    inputs = make(2, 1, 4096, 1, 8, 8, STRONG)
    inputs["log_decay"] = jnp.full_like(inputs["log_decay"], STRONG)
    (o, state), grads = value_and_grads(inputs, op, (("implementation", implementation),))
    for name, leaf in {"o": o, "state": state, **grads}.items():
        assert np.all(np.isfinite(leaf)), f"{form}: non-finite {name}"


# ---------------------------------------------------------------------------
# Semantics shared by every form of both ops
# ---------------------------------------------------------------------------


def form_inputs(form, seed, time):
    if form.startswith("delta"):
        return delta_inputs(seed, 2, time, 2, 6, 5, -0.3)
    return generalized_inputs(seed, 2, time, 2, 6, 5)


def slice_time(inputs, start, stop):
    return {
        name: a if name == "initial_state" else a[:, start:stop]
        for name, a in inputs.items()
    }


@pytest.mark.parametrize("form", FORMS)
def test_segments_equal_separate_runs(form):
    op, implementation = FORMS[form]
    inputs = form_inputs(form, 3, 43)
    # A one-step segment in the middle; both boundaries inside one chunk of 6.
    # Pieces of 21 steps share their compilation with the prefix test.
    bounds = [0, 21, 22, 43]
    segment_ids = jnp.asarray(
        np.repeat([[4, 9, 2]], 2, axis=0).repeat(np.diff(bounds), axis=1), jnp.int32
    )
    o, state = run(
        op, {**inputs, "segment_ids": segment_ids}, chunk_size=6,
        implementation=implementation,
    )
    pieces = []
    for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        piece = slice_time(inputs, start, stop)
        if i > 0:  # a fresh start (zeros, so the compilations are shared)
            piece["initial_state"] = jnp.zeros_like(inputs["initial_state"])
        piece_o, piece_state = run(op, piece, chunk_size=6, implementation=implementation)
        pieces.append(piece_o)
    assert_relative_close(o, jnp.concatenate(pieces, axis=1), name=f"{form} o")
    assert_relative_close(state, piece_state, name=f"{form} final_state")


@pytest.mark.parametrize("form", FORMS)
def test_prefix_then_continue_equals_full_run(form):
    op, implementation = FORMS[form]
    inputs = form_inputs(form, 4, 42)  # the split at 21 falls inside a chunk of 6
    o, state = run(op, inputs, chunk_size=6, implementation=implementation)
    o_head, state_head = run(
        op, slice_time(inputs, 0, 21), chunk_size=6, implementation=implementation
    )
    tail = slice_time(inputs, 21, 42)
    tail["initial_state"] = state_head
    o_tail, state_tail = run(op, tail, chunk_size=6, implementation=implementation)
    assert_relative_close(jnp.concatenate([o_head, o_tail], axis=1), o, name=f"{form} o")
    assert_relative_close(state_tail, state, name=f"{form} final_state")


@pytest.mark.parametrize("implementation", ["recurrent", "chunked"])
def test_delta_single_step_closed_form(implementation):
    """At T = 1: ``S = g (I - beta k k^T) S_0 + beta k v^T``, in float64 numpy."""
    x = delta_inputs(5, 2, 1, 3, 7, 4, -0.7)
    o, state = run(ops.delta_rule, x, scale=0.3, implementation=implementation)
    q, k, v, beta, log_decay = (
        np.asarray(x[name], np.float64)[:, 0] for name in ("q", "k", "v", "beta", "log_decay")
    )  # [B,H,...]
    s0 = np.asarray(x["initial_state"], np.float64)  # [B,H,K,V]
    gate, beta = np.exp(log_decay)[..., None, None], beta[..., None, None]
    transition = gate * (np.eye(7) - beta * k[..., :, None] * k[..., None, :])  # [B,H,K,K]
    expected_state = transition @ s0 + beta * k[..., :, None] * v[..., None, :]
    expected_o = 0.3 * np.einsum("bhk,bhkv->bhv", q, expected_state)
    np.testing.assert_allclose(state, expected_state, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o[:, 0], expected_o, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# generalized_delta_rule
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("decay", [0.0, -0.5], ids=["no_decay", "decay"])
def test_generalized_reproduces_delta_rule(decay):
    """``a = -exp(g) beta k``, ``b = k``, keys ``beta k``, ``g`` over K is the delta rule."""
    x = delta_inputs(6, 2, 33, 2, 6, 5, decay)
    key_dim = x["k"].shape[-1]

    def as_generalized(x):
        beta = x["beta"][..., None]
        log_decay = jnp.broadcast_to(x["log_decay"][..., None], x["k"].shape)
        return ops.generalized_delta_rule(
            x["q"], beta * x["k"], x["v"], -jnp.exp(log_decay) * beta * x["k"], x["k"],
            log_decay, scale=key_dim**-0.5, initial_state=x["initial_state"],
            return_final_state=True, implementation="recurrent",
        )

    (o, state), grads = value_and_grads(x, ops.delta_rule, (("implementation", "recurrent"),))
    (o_gen, state_gen), pullback = jax.vjp(jax.jit(as_generalized), x)
    (grads_gen,) = pullback(cotangents(o.shape, state.shape))
    assert_relative_close((o_gen, state_gen), (o, state), name="generalized vs delta")
    assert_relative_close(grads_gen, grads, name="generalized vs delta grad")


@pytest.mark.parametrize("time", [1, 63], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("decay", [None, STRONG], ids=["rwkv7", "strong"])
def test_generalized_chunked_matches_recurrent(time, decay):
    inputs = generalized_inputs(12, 2, time, 2, 10, 7, decay)
    (o, state), grads = value_and_grads(
        inputs, ops.generalized_delta_rule, (("implementation", "chunked"),)
    )
    (o_ref, state_ref), grads_ref = value_and_grads(
        inputs, ops.generalized_delta_rule, (("implementation", "recurrent"),)
    )
    chex.assert_shape(o, (2, time, 2, 7))
    assert_relative_close((o, state), (o_ref, state_ref), name="o, final_state")
    assert_relative_close(grads, grads_ref, name="grad")


def test_generalized_chunked_bfloat16():
    x = generalized_inputs(8, 1, 40, 2, 8, 8)
    low = {n: a if n == "initial_state" else a.astype(jnp.bfloat16) for n, a in x.items()}
    (o, state), grads = value_and_grads(
        low, ops.generalized_delta_rule, (("implementation", "chunked"), ("scale", 1.0))
    )
    (o_ref, state_ref), grads_ref = value_and_grads(
        as_float32(low), ops.generalized_delta_rule,
        (("implementation", "recurrent"), ("scale", 1.0)),
    )
    assert o.dtype == jnp.bfloat16
    assert_relative_close((o, state), (o_ref, state_ref), jnp.bfloat16, "o, final_state")
    assert_relative_close(grads, grads_ref, jnp.bfloat16, "grad")


def test_generalized_default_scale_is_inverse_sqrt_key_dim():
    x = generalized_inputs(9, 1, 5, 1, 16, 3)
    o_default, _ = run(ops.generalized_delta_rule, x)
    o_unscaled, _ = run(ops.generalized_delta_rule, x, scale=1.0)
    chex.assert_trees_all_close(o_default, o_unscaled / 4.0, rtol=1e-6)


# ---------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------


BAD_DELTA_INPUTS = {
    "rank": (dict(q=jnp.zeros((8, 2, 4))), "expected rank 4, q [B,T,H,K]"),
    "key_dim": (dict(k=jnp.zeros((2, 8, 2, 3))), "axis K of k is 3"),
    "beta_rank": (dict(beta=jnp.zeros((2, 8, 2, 1))), "expected rank 3, beta [B,T,H]"),
    "beta_heads": (dict(beta=jnp.zeros((2, 8, 3))), "axis H of beta is 3"),
    "decay_per_channel": (
        dict(log_decay=jnp.zeros((2, 8, 2, 4))), "expected None or [B,T,H] = [2,8,2]"
    ),
    "decay_heads": (dict(log_decay=jnp.zeros((2, 8, 3))), "axis H of log_decay is 3"),
    "state": (dict(initial_state=jnp.zeros((2, 2, 3, 3))), "axis K of initial_state is 3"),
    "float_segments": (dict(segment_ids=jnp.zeros((2, 8))), "expected an integer array"),
    "segment_shape": (dict(segment_ids=jnp.zeros((2, 7), jnp.int32)), "[B,T] = [2,8]"),
    "chunk_size": (dict(chunk_size=0), "chunk_size=0"),
}


@pytest.mark.parametrize("case", BAD_DELTA_INPUTS)
def test_delta_rule_rejects_bad_inputs(case):
    change, message = BAD_DELTA_INPUTS[case]
    x = delta_inputs(10, 2, 8, 2, 4, 3, WEAK)
    with pytest.raises(ValueError, match=re.escape(message)):
        ops.delta_rule(**{**x, **change})


def test_delta_rule_rejects_unknown_implementation():
    x = delta_inputs(10, 2, 8, 2, 4, 3, WEAK)
    with pytest.raises(ValueError, match="'auto', 'recurrent', 'chunked'"):
        ops.delta_rule(**x, implementation="fast")
    with pytest.raises(NotImplementedError, match="'quadratic'"):
        ops.delta_rule(**x, implementation="quadratic")


def test_generalized_rejects_bad_inputs():
    x = generalized_inputs(11, 2, 8, 2, 4, 3)
    with pytest.raises(ValueError, match=r"log_decay: shape \(2, 8, 2\)"):
        ops.generalized_delta_rule(**{**x, "log_decay": x["log_decay"][..., 0]})
    with pytest.raises(ValueError, match=re.escape("log_decay is None; expected [B,T,H,K]")):
        ops.generalized_delta_rule(**{**x, "log_decay": None})
    with pytest.raises(ValueError, match="axis K of b is 5"):
        ops.generalized_delta_rule(**{**x, "b": jnp.zeros((2, 8, 2, 5))})
    with pytest.raises(ValueError, match="'auto', 'recurrent', 'chunked'"):
        ops.generalized_delta_rule(**x, implementation="fast")


@pytest.mark.parametrize("chunk_size", [48, 64], ids=lambda c: f"C{c}")
def test_generalized_sub_chunked_pairs_with_segments_match_recurrent(chunk_size):
    """Chunks longer than a sub-chunk (16 steps) factor the decay across sub-chunks; with packed segments
    crossing sub-chunk and chunk boundaries the result is still the recurrence's."""
    inputs = generalized_inputs(5, 2, 100, 2, 8, 6, STRONG)
    ids = np.zeros((2, 100), np.int32)
    ids[0, 20:] = 1
    ids[0, 70:] = 2
    ids[1, 33:] = 1
    inputs = {**inputs, "segment_ids": jnp.asarray(ids)}
    (o, state), grads = value_and_grads(
        inputs, ops.generalized_delta_rule, (("implementation", "chunked"), ("chunk_size", chunk_size))
    )
    (o_ref, state_ref), grads_ref = value_and_grads(
        inputs, ops.generalized_delta_rule, (("implementation", "recurrent"),)
    )
    assert_relative_close((o, state), (o_ref, state_ref), name="o, final_state")
    assert_relative_close({k: v for k, v in grads.items() if k != "segment_ids"},
                          {k: v for k, v in grads_ref.items() if k != "segment_ids"}, name="grad")


# ---------------------------------------------------------------------------
# The blocked triangular solve inside the chunked forms, against numpy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [7, 16, 48, 64], ids=lambda c: f"C{c}")
def test_unit_lower_solve_matches_numpy_solve(size):
    """One block (7, 16), three and four blocks of 16 (48, 64); the diagonal and upper triangle
    of ``tri`` are ignored. Value and both gradients against ``numpy.linalg.solve``."""
    from effarch.ops.delta_rule import unit_lower_solve

    rng = np.random.default_rng(size)
    tri = 0.3 * normal(rng, 2, size, size)  # an arbitrary diagonal and upper part: ignored
    rhs, cotangent = normal(rng, 2, size, 5), normal(rng, 2, size, 5)
    lower = np.tril(tri.astype(np.float64), -1) + np.eye(size)
    x_ref = np.linalg.solve(lower, rhs.astype(np.float64))
    g_rhs_ref = np.linalg.solve(np.swapaxes(lower, -1, -2), cotangent.astype(np.float64))
    g_tri_ref = np.tril(-np.einsum("bif,bjf->bij", g_rhs_ref, x_ref), -1)

    x, vjp = jax.vjp(unit_lower_solve, jnp.asarray(tri), jnp.asarray(rhs))
    g_tri, g_rhs = vjp(jnp.asarray(cotangent))
    np.testing.assert_allclose(x, x_ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(g_rhs, g_rhs_ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(g_tri, g_tri_ref, rtol=2e-5, atol=2e-5)
