"""``implementation="auto"``: the policy table of docs/design.md §3, and what it runs.

"auto" resolves per (op, platform, forward only or with gradients). Where the
forward and training forms differ, the op's values without differentiation
are exactly the forward form's, and under ``jax.grad`` its values and
gradients are exactly the training form's: no new numbers, only a choice.
"""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch import ops
from effarch.ops import _common
from effarch.ops._common import Choice

DESIGN = pathlib.Path(__file__).resolve().parents[2] / "docs" / "design.md"

# The table of docs/design.md §3: op -> platform -> (forward only, training).
POLICY = {
    "linear_scan": {"cpu": ("recurrent", "recurrent")},
    "selective_scan": {"cpu": ("recurrent", "chunked")},
    "linear_attention": {"cpu": ("recurrent", "chunked")},
    "delta_rule": {"cpu": ("recurrent", "chunked")},
    "generalized_delta_rule": {"cpu": ("recurrent", "chunked")},
}
# No form has been timed on a GPU or TPU: the XLA chunked form for both uses.
for by_platform in POLICY.values():
    by_platform.update(gpu=("chunked", "chunked"), tpu=("chunked", "chunked"))


@pytest.mark.parametrize("op", list(POLICY))
@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
def test_policy_table(op, platform):
    assert _common.auto_policy(op, platform) == Choice(*POLICY[op][platform])


@pytest.mark.parametrize("op", _common.KERNEL_OPS)
def test_a_verified_kernel_becomes_auto_on_its_platform_only(op, monkeypatch):
    monkeypatch.setitem(_common.VERIFIED_KERNELS, op, ("gpu",))
    assert _common.auto_policy(op, "gpu") == Choice("pallas", "pallas")
    assert _common.auto_policy(op, "tpu") == Choice("chunked", "chunked")
    assert _common.auto_policy(op, "cpu") == Choice(*POLICY[op]["cpu"])


def test_design_doc_states_the_same_table():
    """Each op's row of the §3 table names the CPU forward and training forms of POLICY."""
    text = DESIGN.read_text()
    for op, by_platform in POLICY.items():
        forward, training = by_platform["cpu"]
        row = re.search(rf"^\| `{op}` \|([^|]*)\|([^|]*)\|", text, re.M)
        assert row, f"docs/design.md has no policy row for {op}"
        assert forward in row.group(1) and training in row.group(2), (
            f"docs/design.md's row for {op} says {row.group(0)!r}; the code runs "
            f"{forward} forward only and {training} in training on CPU")


# ---------------------------------------------------------------------------
# What "auto" runs: the forward form's values, the training form's gradients.
# ---------------------------------------------------------------------------


def _arrays(seed, **shapes):
    rng = np.random.default_rng(seed)
    return {n: jnp.asarray(rng.standard_normal(s), jnp.float32) for n, s in shapes.items()}


def _linear_scan(implementation, x, a):
    return ops.linear_scan(x, jax.nn.sigmoid(a), return_final_state=True,
                           implementation=implementation)


def _selective_scan(implementation, x, dt, A, B, C):
    return ops.selective_scan(x, dt, -jnp.exp(A), B, C, return_final_state=True,
                              implementation=implementation)


def _linear_attention(implementation, q, k, v, g):
    return ops.linear_attention(q, k, v, -jax.nn.softplus(g), return_final_state=True,
                                chunk_size=8, implementation=implementation)


def _delta_rule(implementation, q, k, v, beta, g):
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    return ops.delta_rule(q, k, v, jax.nn.sigmoid(beta), -jax.nn.softplus(g),
                          return_final_state=True, chunk_size=8, implementation=implementation)


def _generalized_delta_rule(implementation, q, k, v, a, b, w):
    b = b / jnp.linalg.norm(b, axis=-1, keepdims=True)
    return ops.generalized_delta_rule(q, k, v, -b * jax.nn.sigmoid(a), b, -jax.nn.sigmoid(w),
                                      return_final_state=True, chunk_size=8,
                                      implementation=implementation)


T, H, K = 11, 2, 4
CASES = {
    "linear_scan": (_linear_scan, dict(x=(2, T, 5), a=(2, T, 5))),
    "selective_scan": (_selective_scan, dict(x=(2, T, 4), dt=(2, T, 4), A=(4, 3),
                                             B=(2, T, 1, 3), C=(2, T, 1, 3))),
    "linear_attention": (_linear_attention, dict(q=(2, T, H, K), k=(2, T, H, K),
                                                 v=(2, T, H, 3), g=(2, T, H))),
    "delta_rule": (_delta_rule, dict(q=(2, T, H, K), k=(2, T, H, K), v=(2, T, H, 3),
                                     beta=(2, T, H), g=(2, T, H))),
    "generalized_delta_rule": (_generalized_delta_rule, dict(
        q=(2, T, H, K), k=(2, T, H, K), v=(2, T, H, 3), a=(2, T, H, K), b=(2, T, H, K),
        w=(2, T, H, K))),
}


def _loss(fn, implementation):
    def loss(arrays):
        o, state = fn(implementation, **arrays)
        return jnp.sum(jnp.cos(o)) + jnp.sum(jnp.sin(state)), (o, state)
    return jax.jit(jax.grad(loss, has_aux=True))


# Two ops: the mechanism (_common.run_forms) is shared, and every op's wiring of
# its arrays to its forms is checked, forms and "auto", by
# tests/ops/test_independent_references.py; the others are in CASES for a rerun.
@pytest.mark.parametrize("op", ["linear_attention", "delta_rule"])
def test_auto_runs_the_forward_form_and_differentiates_the_training_form(op):
    fn, shapes = CASES[op]
    arrays = _arrays(0, **shapes)
    choice = _common.auto_policy(op, jax.default_backend())
    forward = jax.jit(lambda a, impl: fn(impl, **a), static_argnums=1)
    np.testing.assert_array_equal(forward(arrays, "auto")[0], forward(arrays, choice.forward)[0])
    grads, outputs = _loss(fn, "auto")(arrays)
    grads_ref, outputs_ref = _loss(fn, choice.training)(arrays)
    for got, want in zip(jax.tree.leaves((grads, outputs)), jax.tree.leaves((grads_ref, outputs_ref))):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_each_use_traces_only_its_form(monkeypatch):
    """Without differentiation only the forward form is traced; under jax.grad only the training form."""
    fn, shapes = CASES["linear_attention"]
    arrays = _arrays(1, **shapes)
    traced = []
    real = _common.run_forms

    def spy(choice, form, *args):
        def recording(name):
            f = form(name)
            return lambda *a: traced.append(name) or f(*a)
        return real(choice, recording, *args)

    monkeypatch.setattr(_common, "run_forms", spy)
    choice = _common.auto_policy("linear_attention", jax.default_backend())
    jax.jit(lambda a: fn("auto", **a))(arrays)
    assert traced == [choice.forward]
    traced.clear()
    jax.jit(jax.grad(lambda a: jnp.sum(fn("auto", **a)[0])))(arrays)
    assert traced == [choice.training]


# docs/design.md §3, the CPU block and chunk sizes: "auto" runs exactly the form it names.
cpu_only = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU rule of 'auto'")


@cpu_only
def test_cpu_attention_from_64_queries_is_the_chunked_form_in_blocks_of_64():
    from effarch.ops.attention import CPU_BLOCK
    a = _arrays(1, q=(1, 2 * CPU_BLOCK + 5, 2, 8), k=(1, 2 * CPU_BLOCK + 5, 1, 8), v=(1, 2 * CPU_BLOCK + 5, 1, 8))
    auto = ops.attention(a["q"], a["k"], a["v"], chunk_size=256)
    np.testing.assert_array_equal(auto, ops.attention(a["q"], a["k"], a["v"], chunk_size=CPU_BLOCK,
                                                      implementation="chunked"))
    short = _arrays(2, q=(1, CPU_BLOCK - 1, 2, 8), k=(1, CPU_BLOCK - 1, 1, 8), v=(1, CPU_BLOCK - 1, 1, 8))
    np.testing.assert_array_equal(ops.attention(short["q"], short["k"], short["v"]),
                                  ops.attention(short["q"], short["k"], short["v"], implementation="xla"))


def _linear_attention_chunked(x, chunk_size, implementation):
    return ops.linear_attention(x["q"], x["k"], x["v"], -jax.nn.softplus(x["g"]),
                                chunk_size=chunk_size, implementation=implementation)[0]


def _delta_rule_chunked(x, chunk_size, implementation):
    k = x["k"] / jnp.linalg.norm(x["k"], axis=-1, keepdims=True)
    return ops.delta_rule(x["q"], k, x["v"], jax.nn.sigmoid(x["beta"]), -jax.nn.softplus(x["g"]),
                          chunk_size=chunk_size, implementation=implementation)[0]


@cpu_only
@pytest.mark.parametrize("op", [_linear_attention_chunked, _delta_rule_chunked], ids=["linear_attention", "delta_rule"])
def test_cpu_trains_in_chunks_of_at_most_32(op):
    """With gradients, "auto" on CPU is the chunked form at ``CPU_CHUNK_SIZE`` whatever chunk the caller asks."""
    from effarch.ops._common import CPU_CHUNK_SIZE
    a = _arrays(3, q=(1, 100, 2, 4), k=(1, 100, 2, 4), v=(1, 100, 2, 3), beta=(1, 100, 2), g=(1, 100, 2))

    def grads(implementation, chunk_size):
        return jax.jit(jax.grad(lambda x: jnp.sum(jnp.cos(op(x, chunk_size, implementation)))))(a)

    for got, want in zip(jax.tree.leaves(grads("auto", 64)), jax.tree.leaves(grads("chunked", CPU_CHUNK_SIZE))):
        np.testing.assert_array_equal(got, want)
