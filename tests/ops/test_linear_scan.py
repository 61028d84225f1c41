"""ops.linear_scan: every form against the float32 recurrent reference."""

import functools

import chex
import jax
import jax.numpy as jnp
import pytest

from effarch import ops
from effarch.ops import _common
from effarch.ops.linear_scan import OP, resolve
from effarch.testing import assert_relative_close
from pallas_kernels.linear_scan.reference import linear_scan_reference, random_inputs

# (T, D, dtype, decay_shift): +6 weak decay (a near 1), -3 strong decay.
CASES = {
    "T1_f32": (1, 5, jnp.float32, 2.0),
    "T63_f32_weak": (63, 7, jnp.float32, 6.0),
    "T63_bf16_strong": (63, 7, jnp.bfloat16, -3.0),
    "T1000_f32_weak": (1000, 3, jnp.float32, 6.0),
    "T1000_bf16": (1000, 3, jnp.bfloat16, 2.0),
}


def _scan(implementation):
    """Jitted ``ops.linear_scan`` returning ``(h, final_state)``."""
    return jax.jit(
        functools.partial(ops.linear_scan, return_final_state=True, implementation=implementation)
    )


def _loss_and_outputs(fn, inputs, weights):
    """A scalar that touches h and the final state, so every gradient is exercised."""

    def loss(inputs):
        h, h_final = fn(inputs)
        value = jnp.sum(h.astype(jnp.float32) * weights[0]) + jnp.sum(h_final * weights[1])
        return value, (h, h_final)

    (_, outputs), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(inputs)
    return outputs, grads


@functools.cache
def _case(case):
    """Inputs, loss weights and the reference outputs and gradients of a case."""
    time, channels, dtype, shift = CASES[case]
    inputs = random_inputs(
        jax.random.PRNGKey(0), batch=2, time=time, channels=channels, dtype=dtype,
        decay_shift=shift,
    )
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    weights = (jax.random.normal(k1, (2, time, channels)), jax.random.normal(k2, (2, channels)))
    reference = _loss_and_outputs(lambda v: linear_scan_reference(**v), inputs, weights)
    return inputs, weights, reference


SLOW_CASES = {"T1000_bf16"}


@pytest.mark.parametrize("implementation", ["recurrent", "chunked"])
@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES],
)
def test_forms_match_reference(case, implementation):
    time, channels, dtype, _ = CASES[case]
    inputs, weights, ((h_ref, final_ref), grads_ref) = _case(case)
    (h, h_final), grads = _loss_and_outputs(lambda v: _scan(implementation)(**v), inputs, weights)
    chex.assert_shape(h, (2, time, channels))
    chex.assert_shape(h_final, (2, channels))
    assert h.dtype == dtype and h_final.dtype == jnp.float32
    assert_relative_close(h, h_ref, dtype, "h")
    assert_relative_close(h_final, final_ref, dtype, "final_state")
    assert set(grads) == {"x", "a", "initial_state"}
    assert_relative_close(grads, grads_ref, dtype, "grad")


@pytest.mark.parametrize("implementation", ["recurrent", "chunked"])
def test_segment_ids_equal_separate_runs(implementation):
    split, time = 23, 90
    inputs = random_inputs(jax.random.PRNGKey(3), batch=1, time=time, channels=5)
    scan = _scan(implementation)
    h, h_final = scan(**inputs, segment_ids=jnp.array([[4] * split + [9] * (time - split)]))
    h_first, _ = scan(inputs["x"][:, :split], inputs["a"][:, :split],
                      initial_state=inputs["initial_state"])
    h_second, final_second = scan(inputs["x"][:, split:], inputs["a"][:, split:])
    assert_relative_close(h, jnp.concatenate([h_first, h_second], 1), jnp.float32, "h")
    assert_relative_close(h_final, final_second, jnp.float32, "final_state")


@pytest.mark.parametrize("implementation", ["recurrent", "chunked"])
def test_prefix_then_continue_equals_full_run(implementation):
    split, time = 41, 100
    x, a, h0 = random_inputs(jax.random.PRNGKey(4), batch=2, time=time, channels=6).values()
    scan = _scan(implementation)
    h_full, final_full = scan(x, a, initial_state=h0)
    h_pre, final_pre = scan(x[:, :split], a[:, :split], initial_state=h0)
    h_rest, final_rest = scan(x[:, split:], a[:, split:], initial_state=final_pre)
    assert_relative_close(jnp.concatenate([h_pre, h_rest], 1), h_full, jnp.float32, "h")
    assert_relative_close(final_rest, final_full, jnp.float32, "final_state")


def test_no_initial_state_and_no_final_state():
    x, a, _ = random_inputs(jax.random.PRNGKey(6), batch=2, time=9, channels=4).values()
    h, h_final = ops.linear_scan(x, a, implementation="chunked")
    assert h_final is None
    assert_relative_close(h, linear_scan_reference(x, a)[0], jnp.float32, "h")


BAD_INPUTS = {
    "x_rank": (dict(x=jnp.zeros((2, 8))), "x: shape \\(2, 8\\)"),
    "a_shape": (dict(a=jnp.zeros((2, 8, 5))), "axis D of a is 5"),
    "state_shape": (dict(initial_state=jnp.zeros((2, 6, 1))), "initial_state: shape"),
    "float_segment_ids": (dict(segment_ids=jnp.zeros((2, 8), jnp.float32)), "integer array"),
    "unknown_implementation": (dict(implementation="fast"), "unknown implementation='fast'"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_inputs_raise_value_error(name):
    changes, message = BAD_INPUTS[name]
    inputs = dict(x=jnp.zeros((2, 8, 6)), a=jnp.zeros((2, 8, 6)), initial_state=jnp.zeros((2, 6)))
    with pytest.raises(ValueError, match=message):
        ops.linear_scan(**{**inputs, **changes})


def test_auto_resolves_by_the_policy_table():
    """docs/design.md §3; GPU/TPU keep the XLA chunked form while no kernel is verified there."""
    assert _common.auto_policy(OP, "cpu") == _common.Choice("recurrent", "recurrent")
    assert _common.auto_policy(OP, "gpu") == _common.auto_policy(OP, "tpu") == ("chunked", "chunked")
    assert resolve("auto") == _common.auto_policy(OP, jax.default_backend())
    assert resolve("chunked") == ("chunked", "chunked")
