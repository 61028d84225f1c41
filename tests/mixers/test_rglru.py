"""RG-LRU specifics: the per-step recurrence, the gates, the decay initialisation, the bounded sqrt.

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


def paper_loop(x, gate_a, gate_x, decay_param, state, position, segment_ids=None):
    """Griffin eqs. 1-4 step by step, with ``a = sigmoid(Λ)`` and ``Λ = -decay_param``.

    As in the recurrentgemma release, a sequence's first token (position 0, a
    segment start) enters without the ``sqrt(1 - a^2)`` factor.
    """
    ids = np.zeros((B, T), int) if segment_ids is None else np.asarray(segment_ids)
    a = jax.nn.sigmoid(-decay_param)
    h, outs = state, []
    for t in range(T):
        first = np.full((B, 1), position == 0) if t == 0 else (ids[:, t] != ids[:, t - 1])[:, None]
        if t > 0:
            h = jnp.where(first, 0.0, h)
        r, i = jax.nn.sigmoid(gate_a[:, t]), jax.nn.sigmoid(gate_x[:, t])
        a_t = a ** (C * r)
        h = a_t * h + jnp.where(first, 1.0, jnp.sqrt(1.0 - a_t**2)) * (i * x[:, t])
        outs.append(h)
    return jnp.stack(outs, axis=1), h


@pytest.mark.parametrize("implementation,packed,position", [("recurrent", False, 5), ("chunked", True, 0)],
                         ids=["recurrent-from_state", "chunked-packed-from_start"])
def test_rg_lru_matches_the_paper_equations(implementation, packed, position):
    x, gate_a, gate_x, decay_param, state = _inputs()
    segment_ids = SEGMENTS if packed else None
    if position == 0:
        state = jnp.zeros_like(state)

    def ours(x, gate_a, gate_x, decay_param, state):
        return rglru.rg_lru(x, gate_a, gate_x, decay_param, c=C, state=state, position=position,
                            segment_ids=segment_ids, implementation=implementation)

    def reference(*args):
        return paper_loop(*args, position=position, segment_ids=segment_ids)

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


def test_initial_decay_is_uniform_on_the_ring():
    """recurrentgemma's rnn_param_init: ``a = sigmoid(Λ)`` with ``a^2`` uniform in ``[0.9^2, 0.999^2]``."""
    config = mixers.make_config("rglru", d_model=64)
    decay_param = rglru.decay_param_init(config.decay_init_range)(jax.random.PRNGKey(0), (4096,))
    a = np.exp(-np.asarray(jax.nn.softplus(decay_param), np.float64))
    low, high = config.decay_init_range
    assert (low, high) == (0.9, 0.999)
    assert a.min() >= low - 1e-6 and a.max() <= high + 1e-6
    np.testing.assert_allclose(np.quantile(a**2, [0.25, 0.5, 0.75]),
                               low**2 + (high**2 - low**2) * np.array([0.25, 0.5, 0.75]), atol=0.01)


def test_block_diagonal_gates_are_dense_gates_with_block_diagonal_kernels():
    """The release's per-head gates equal ``gates="dense"`` with the blocks placed on the diagonal."""
    d, heads = 12, 3
    x = jax.random.normal(jax.random.PRNGKey(0), (B, T, d))
    blocked = mixers.build("rglru", d_model=d, num_heads=heads)
    dense = mixers.build("rglru", d_model=d, gates="dense")
    params = blocked.init(jax.random.PRNGKey(1), x)
    assert params["params"]["input_gate"]["kernel"].shape == (heads, d // heads, d // heads)
    p = params["params"]
    as_dense = {name: {"kernel": jax.scipy.linalg.block_diag(*p[name]["kernel"]), "bias": p[name]["bias"].reshape(-1)}
                for name in ("input_gate", "recurrence_gate")}
    dense_params = {"params": {**p, **as_dense}}
    assert_relative_close(dense.apply(dense_params, x)[0], blocked.apply(params, x)[0], name="block-diagonal gates")


def test_gates_must_fit_the_heads():
    with pytest.raises(ValueError, match="num_heads=5 must divide lru_width=12"):
        mixers.build("rglru", d_model=12, num_heads=5)
    mixers.build("rglru", d_model=12, num_heads=5, gates="dense")


def test_sqrt_derivative_is_bounded():
    grad = jax.vmap(jax.grad(rglru.sqrt_bounded_derivative))(jnp.array([0.0, 1e-12, 0.25]))
    np.testing.assert_allclose(np.asarray(grad), [rglru.MAX_SQRT_GRADIENT, rglru.MAX_SQRT_GRADIENT, 1.0],
                               rtol=1e-6)
