"""RG-LRU specifics: the paper's per-step recurrence, the decay range, the bounded sqrt.

The generic interface checks are in test_mixers_common.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch import mixers
from effarch.mixers import rglru
from effarch.testing import assert_relative_close

B, T, W = 2, 9, 6
C = 8.0
SEGMENTS = jnp.array([[0, 0, 0, 0, 1, 1, 1, 1, 1], [3] * T])


def _inputs(seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = jax.random.normal(keys[0], (B, T, W))
    gate_a = jax.random.normal(keys[1], (B, T, W))
    gate_x = jax.random.normal(keys[2], (B, T, W))
    decay_param = jax.random.normal(keys[3], (W,)) - 2.0
    state = jax.random.normal(keys[4], (B, W))
    return x, gate_a, gate_x, decay_param, state


def paper_loop(x, gate_a, gate_x, decay_param, state, segment_ids=None):
    """Griffin eqs. 1-4 step by step, with ``a = sigmoid(Λ)`` and ``Λ = -decay_param``."""
    ids = np.zeros((B, T), int) if segment_ids is None else np.asarray(segment_ids)
    a = jax.nn.sigmoid(-decay_param)
    h, outs = state, []
    for t in range(T):
        if t > 0:
            h = jnp.where((ids[:, t] != ids[:, t - 1])[:, None], 0.0, h)
        r, i = jax.nn.sigmoid(gate_a[:, t]), jax.nn.sigmoid(gate_x[:, t])
        a_t = a ** (C * r)
        h = a_t * h + jnp.sqrt(1.0 - a_t**2) * (i * x[:, t])
        outs.append(h)
    return jnp.stack(outs, axis=1), h


@pytest.mark.parametrize("implementation,packed", [("recurrent", False), ("chunked", True)],
                         ids=["recurrent-from_state", "chunked-packed"])
def test_rg_lru_matches_the_paper_equations(implementation, packed):
    x, gate_a, gate_x, decay_param, state = _inputs()
    segment_ids = SEGMENTS if packed else None

    def ours(x, gate_a, gate_x, decay_param, state):
        return rglru.rg_lru(x, gate_a, gate_x, decay_param, c=C, state=state, segment_ids=segment_ids,
                            implementation=implementation)

    def reference(*args):
        return paper_loop(*args, segment_ids=segment_ids)

    args = (x, gate_a, gate_x, decay_param, state)
    assert_relative_close(ours(*args), reference(*args), name="rg_lru (h, h_final)")
    probe = jnp.cos(jnp.arange(B * T * W, dtype=jnp.float32)).reshape(B, T, W)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a)[0] * probe), tuple(range(5))))(*args)
    grads_ref = jax.jit(jax.grad(lambda *a: jnp.sum(reference(*a)[0] * probe), tuple(range(5))))(*args)
    assert_relative_close(grads, grads_ref, name="rg_lru grads")


def test_decay_lies_in_the_open_unit_interval():
    """``0 < a_t < 1`` for any gate: ``log a_t`` is finite and strictly negative, ``a_t > 0``."""
    gate_a = jnp.array([-20.0, -3.0, 0.0, 3.0, 20.0])[:, None, None] * jnp.ones((1, 1, 3))
    decay_param = jnp.array([-8.0, 0.0, 8.0])
    log_a = np.asarray(rglru.rg_lru_log_decay(gate_a, decay_param, C))
    assert np.all(np.isfinite(log_a) & (log_a < 0.0)), log_a
    assert np.all(np.exp(log_a) > 0.0)


def test_initial_decay_spans_the_configured_range():
    """With the recurrence gate fully open (r = 1), ``a^c`` starts inside decay_init_range."""
    config = mixers.make_config("rglru", d_model=64)
    decay_param = rglru.decay_param_init(config.c, config.decay_init_range)(jax.random.PRNGKey(0), (64,))
    a_c = jnp.exp(rglru.rg_lru_log_decay(jnp.full((64,), 40.0), decay_param, config.c))
    low, high = config.decay_init_range
    assert float(a_c.min()) >= low - 1e-6 and float(a_c.max()) <= high + 1e-6
    assert float(a_c.max() - a_c.min()) > 0.5 * (high - low), "spread over the range"


def test_sqrt_derivative_is_bounded():
    grad = jax.vmap(jax.grad(rglru.sqrt_bounded_derivative))(jnp.array([0.0, 1e-12, 0.25]))
    np.testing.assert_allclose(np.asarray(grad), [rglru.MAX_SQRT_GRADIENT, rglru.MAX_SQRT_GRADIENT, 1.0],
                               rtol=1e-6)
