"""ops.selective_scan: every form against the float32 recurrent reference."""

import functools

import chex
import jax
import jax.numpy as jnp
import pytest

from effarch import ops
from effarch.ops import _common
from effarch.ops.selective_scan import OP, RECURRENT_TRAINING_MAX_BYTES, resolve
from effarch.testing import assert_relative_close
from pallas_kernels.selective_scan.reference import random_inputs, selective_scan_reference

GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")

# (T, D, N, G, dtype, dt_shift): D never a multiple of anything convenient.
CASES = {
    "T1_G1_f32": (1, 5, 3, 1, jnp.float32, 0.0),
    "T63_G3_f32_large_dt": (63, 6, 4, 3, jnp.float32, 4.0),
    "T63_G2_bf16_tiny_dt": (63, 6, 4, 2, jnp.bfloat16, -8.0),
    "T1000_G1_f32": (1000, 3, 2, 1, jnp.float32, 0.0),
    "T1000_G3_bf16_large_dt": (1000, 3, 2, 3, jnp.bfloat16, 4.0),
}


def _loss_and_outputs(fn, inputs, weights):
    """A scalar that touches y and the final state, so every gradient is exercised."""

    def loss(inputs):
        y, h = fn(inputs)
        value = jnp.sum(y.astype(jnp.float32) * weights[0]) + jnp.sum(h * weights[1])
        return value, (y, h)

    (_, outputs), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(inputs)
    return outputs, grads


def _scan(implementation):
    """Jitted ``ops.selective_scan`` returning ``(y, final_state)``."""
    return jax.jit(
        functools.partial(
            ops.selective_scan, return_final_state=True, implementation=implementation
        ),
        static_argnames="dt_softplus",
    )


def _reference(inputs):
    return selective_scan_reference(**inputs)


@functools.cache
def _case(case):
    """Inputs, loss weights and the reference outputs and gradients of a case."""
    time, channels, state, groups, dtype, dt_shift = CASES[case]
    inputs = random_inputs(
        jax.random.PRNGKey(0), batch=2, time=time, channels=channels, state=state,
        groups=groups, dtype=dtype, dt_shift=dt_shift,
    )
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    weights = (
        jax.random.normal(k1, (2, time, channels)),
        jax.random.normal(k2, (2, channels, state)),
    )
    return inputs, weights, _loss_and_outputs(_reference, inputs, weights)


SLOW_CASES = {"T1000_G3_bf16_large_dt"}


@pytest.mark.parametrize("implementation", ["recurrent", "chunked"])
@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES],
)
def test_forms_match_reference(case, implementation):
    time, channels, state, _, dtype, _ = CASES[case]
    inputs, weights, ((y_ref, h_ref), grads_ref) = _case(case)
    (y, h), grads = _loss_and_outputs(lambda v: _scan(implementation)(**v), inputs, weights)
    chex.assert_shape(y, (2, time, channels))
    chex.assert_shape(h, (2, channels, state))
    assert y.dtype == dtype and h.dtype == jnp.float32
    assert_relative_close(y, y_ref, dtype, "y")
    assert_relative_close(h, h_ref, dtype, "final_state")
    assert set(grads) == set(GRAD_NAMES)
    assert_relative_close(grads, grads_ref, dtype, "grad")


@pytest.mark.parametrize("implementation", ["recurrent", "chunked"])
def test_optional_inputs_absent(implementation):
    inputs = random_inputs(jax.random.PRNGKey(2), batch=2, time=70, channels=4, state=3)
    core = {n: inputs[n] for n in ("x", "dt", "A", "B", "C")}
    y, h = _scan(implementation)(**core, dt_softplus=False)
    y_ref, h_ref = selective_scan_reference(**core, dt_softplus=False)
    assert_relative_close((y, h), (y_ref, h_ref), jnp.float32, "no_optionals")
    y_only, no_state = ops.selective_scan(**core, implementation=implementation)
    assert no_state is None
    chex.assert_shape(y_only, (2, 70, 4))


@pytest.mark.parametrize("implementation", ["recurrent", "chunked"])
def test_segment_ids_equal_separate_runs(implementation):
    split, time = 23, 90
    inputs = random_inputs(jax.random.PRNGKey(3), batch=1, time=time, channels=5, state=3)
    segment_ids = jnp.array([[7] * split + [2] * (time - split)])
    y, h = _scan(implementation)(**inputs, segment_ids=segment_ids)

    def part(start, stop, initial_state):
        sliced = {
            n: v[:, start:stop] if v.ndim >= 3 and n != "A" and n != "initial_state" else v
            for n, v in inputs.items()
        }
        sliced["initial_state"] = initial_state
        return _scan(implementation)(**sliced)

    y_first, _ = part(0, split, inputs["initial_state"])
    y_second, h_second = part(split, time, None)
    assert_relative_close(y, jnp.concatenate([y_first, y_second], axis=1), jnp.float32, "y")
    assert_relative_close(h, h_second, jnp.float32, "final_state")


@pytest.mark.parametrize("implementation", ["recurrent", "chunked"])
def test_prefix_then_continue_equals_full_run(implementation):
    split, time = 41, 100
    inputs = random_inputs(jax.random.PRNGKey(4), batch=2, time=time, channels=6, state=2, groups=2)
    by_time = ("x", "dt", "B", "C", "z")
    scan = _scan(implementation)
    y_full, h_full = scan(**inputs)
    prefix = {**inputs, **{n: inputs[n][:, :split] for n in by_time}}
    y_pre, h_pre = scan(**prefix)
    rest = {**inputs, **{n: inputs[n][:, split:] for n in by_time}, "initial_state": h_pre}
    y_rest, h_rest = scan(**rest)
    assert_relative_close(jnp.concatenate([y_pre, y_rest], 1), y_full, jnp.float32, "y")
    assert_relative_close(h_rest, h_full, jnp.float32, "final_state")


def _bad(**changes):
    inputs = random_inputs(jax.random.PRNGKey(5), batch=2, time=8, channels=6, state=3, groups=2)
    inputs.update(changes)
    return inputs


BAD_INPUTS = {
    "x_rank": (lambda: _bad(x=jnp.zeros((2, 8))), "x: shape \\(2, 8\\)"),
    "groups_not_dividing": (
        lambda: _bad(B=jnp.zeros((2, 8, 4, 3)), C=jnp.zeros((2, 8, 4, 3))),
        "G=4 .* must divide the channels D=6",
    ),
    "A_shape": (lambda: _bad(A=jnp.zeros((6, 5))), "A \\(6, 5\\) as \\[D,N\\]"),
    "A_rank": (lambda: _bad(A=jnp.zeros((6,))), "A: shape \\(6,\\)"),
    "C_time": (lambda: _bad(C=jnp.zeros((2, 9, 2, 3))), "axis T of C is 9"),
    "z_channels": (lambda: _bad(z=jnp.zeros((2, 8, 5))), "axis D of z is 5"),
    "state_shape": (lambda: _bad(initial_state=jnp.zeros((2, 6, 4))), "axis N of initial_state"),
    "float_segment_ids": (
        lambda: _bad(segment_ids=jnp.zeros((2, 8), jnp.float32)), "integer array"
    ),
    "segment_ids_shape": (
        lambda: _bad(segment_ids=jnp.zeros((2, 7), jnp.int32)), "expected \\[B,T\\] = \\[2,8\\]"
    ),
    "unknown_implementation": (
        lambda: _bad(implementation="fast"), "unknown implementation='fast'"
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_inputs_raise_value_error(name):
    make, message = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=message):
        ops.selective_scan(**make())


def test_auto_resolves_by_the_policy_table():
    """docs/design.md §3; GPU/TPU keep the XLA chunked form while no kernel is verified there."""
    assert _common.auto_policy(OP, "cpu") == _common.Choice("recurrent", "chunked")
    assert _common.auto_policy(OP, "gpu") == _common.auto_policy(OP, "tpu") == ("chunked", "chunked")
    assert resolve("auto") == _common.auto_policy(OP, jax.default_backend())
    assert resolve("chunked") == ("chunked", "chunked")


def test_unsupported_implementation_raises_not_implemented():
    with pytest.raises(NotImplementedError, match="quadratic"):
        ops.selective_scan(**_bad(implementation="quadratic"))


def test_cpu_training_is_recurrent_while_the_saved_states_are_small(monkeypatch):
    """docs/design.md §3: the size rule changes only "auto" on CPU, only the training form."""
    monkeypatch.setattr(_common, "platform", lambda: "cpu")
    assert resolve("auto", RECURRENT_TRAINING_MAX_BYTES) == ("recurrent", "recurrent")
    assert resolve("auto", RECURRENT_TRAINING_MAX_BYTES + 1) == ("recurrent", "chunked")
    assert resolve("chunked", 1) == ("chunked", "chunked")
    monkeypatch.setattr(_common, "platform", lambda: "gpu")
    assert resolve("auto", 1) == ("chunked", "chunked")


def test_auto_gradients_are_the_recurrent_forms_when_small():
    inputs = random_inputs(jax.random.PRNGKey(7), batch=1, time=13, channels=8, state=4)

    def grads(implementation):
        def loss(v):
            y, h = ops.selective_scan(**v, return_final_state=True, implementation=implementation)
            return jnp.sum(jnp.sin(y)) + jnp.sum(h)
        return jax.jit(jax.grad(loss))(inputs)

    expected = "recurrent" if jax.default_backend() == "cpu" else "chunked"
    chex.assert_trees_all_close(grads("auto"), grads(expected), rtol=1e-6, atol=1e-6)
