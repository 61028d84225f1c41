"""MoE MLP: dispatch against the dense reference, capacity drops, load-balancing loss."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.layers.moe import (
    MoE,
    MoEConfig,
    expert_capacity,
    load_balancing_loss,
    moe_forward,
    moe_reference,
    queue_positions,
    route,
)
from effarch.layers.mlp import swiglu_reference
from effarch.models import LM, LMConfig
from effarch.testing import assert_relative_close

# Awkward sizes: N = 2 * 7 tokens, D = 12, F = 20.
B, T, D, F = 2, 7, 12, 20


def _weights(num_experts, seed=0):
    kx, kr, kg, ku, kd = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = jax.random.normal(kx, (B * T, D))
    router = jax.random.normal(kr, (D, num_experts))
    w_gate = jax.random.normal(kg, (num_experts, D, F)) / np.sqrt(D)
    w_up = jax.random.normal(ku, (num_experts, D, F)) / np.sqrt(D)
    w_down = jax.random.normal(kd, (num_experts, F, D)) / np.sqrt(F)
    return x, router, w_gate, w_up, w_down


def _queue_reference(experts: np.ndarray, num_experts: int, capacity: int):
    """Numpy loop: walk assignments in priority order, fill each expert up to capacity."""
    n, k = experts.shape
    filled = np.zeros(num_experts, int)
    position = np.zeros((k, n), int)
    kept = np.zeros((k, n), bool)
    for choice in range(k):
        for token in range(n):
            e = experts[token, choice]
            position[choice, token] = filled[e]
            kept[choice, token] = filled[e] < capacity
            filled[e] += 1
    return position.reshape(-1), kept


@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (5, 3)], ids=["E4k1", "E5k3"])
def test_matches_dense_reference_with_ample_capacity(num_experts, top_k):
    x, *weights = _weights(num_experts)
    ample = num_experts / top_k  # capacity = N: nothing can be dropped

    def forward(x, *w):
        return moe_forward(x, *w, top_k=top_k, capacity_factor=ample)[0]

    y, aux = moe_forward(x, *weights, top_k=top_k, capacity_factor=ample)
    assert float(aux["moe_dropped_fraction"]) == 0.0
    assert_relative_close(y, moe_reference(x, *weights, top_k=top_k), name="y")
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
    grads = jax.jit(jax.grad(loss(forward), argnums=(0, 1, 2, 3, 4)))(x, *weights)
    reference = lambda *a: moe_reference(*a, top_k=top_k)  # noqa: E731
    grads_ref = jax.jit(jax.grad(loss(reference), argnums=(0, 1, 2, 3, 4)))(x, *weights)
    assert_relative_close(grads, grads_ref, name="grads")


def test_no_capacity_factor_drops_nothing_however_skewed_the_routing():
    num_experts, top_k = 4, 2
    x, router, *experts_w = _weights(num_experts, seed=2)
    skewed = router.at[:, 0].add(10.0)  # expert 0 is every token's first choice
    assert expert_capacity(B * T, num_experts, top_k, None) == B * T
    y, aux = moe_forward(x, skewed, *experts_w, top_k=top_k, capacity_factor=None)
    assert float(aux["moe_dropped_fraction"]) == 0.0
    assert_relative_close(y, moe_reference(x, skewed, *experts_w, top_k=top_k), name="y without capacity")


def test_normalized_gates_sum_to_one_and_match_the_reference():
    num_experts, top_k = 5, 3
    x, *weights = _weights(num_experts, seed=3)
    _, gates, _ = route(x @ weights[0], top_k, normalize_gates=True)
    np.testing.assert_allclose(np.sum(gates, axis=-1), 1.0, rtol=1e-6)
    y, _ = moe_forward(x, *weights, top_k=top_k, capacity_factor=None, normalize_gates=True)
    assert_relative_close(y, moe_reference(x, *weights, top_k=top_k, normalize_gates=True), name="y")


def test_shared_expert_adds_a_sigmoid_gated_swiglu():
    config = MoEConfig(num_experts=3, top_k=1, capacity_factor=None, shared_d_ff=7)
    x = jax.random.normal(jax.random.PRNGKey(4), (B, T, D))
    moe = MoE(config=config, d_ff=F)
    variables = nn.unbox(moe.init(jax.random.PRNGKey(5), x))
    p = variables["params"]
    assert p["shared"]["gate"]["kernel"].shape == (D, 7) and p["shared_gate"]["kernel"].shape == (D, 1)
    y, _ = moe.apply(variables, x)
    routed, _ = MoE(config=MoEConfig(num_experts=3, top_k=1, capacity_factor=None), d_ff=F).apply(
        {"params": {k: v for k, v in p.items() if not k.startswith("shared")}}, x)
    shared = swiglu_reference(x, p["shared"]["gate"]["kernel"], p["shared"]["up"]["kernel"],
                              p["shared"]["down"]["kernel"])
    assert_relative_close(y, routed + jax.nn.sigmoid(x @ p["shared_gate"]["kernel"]) * shared, name="y")


def test_small_capacity_drops_and_reports_fraction():
    num_experts, top_k, factor = 4, 2, 0.5
    x, router, *experts_w = _weights(num_experts, seed=1)
    cap = expert_capacity(B * T, num_experts, top_k, factor)
    assert cap == 4  # ceil(0.5 * 14 * 2 / 4)
    y, aux = moe_forward(x, router, *experts_w, top_k=top_k, capacity_factor=factor)

    probs, gates, experts = route(x @ router, top_k)
    _, kept = _queue_reference(np.asarray(experts), num_experts, cap)
    assert kept.sum() < kept.size, "the test wants some drops"
    np.testing.assert_allclose(float(aux["moe_dropped_fraction"]), 1 - kept.mean(), rtol=1e-6)
    # Reference: each kept assignment's expert output weighted by its gate.
    w_gate, w_up, w_down = experts_w
    y_ref = np.zeros((B * T, D), np.float32)
    for choice in range(top_k):
        for token in range(B * T):
            if kept[choice, token]:
                e = int(experts[token, choice])
                h = (jax.nn.silu(x[token] @ w_gate[e]) * (x[token] @ w_up[e])) @ w_down[e]
                y_ref[token] += float(gates[token, choice]) * np.asarray(h)
    assert_relative_close(y, y_ref, name="y with drops")


def test_queue_positions_match_loop():
    experts = jax.random.randint(jax.random.PRNGKey(3), (B * T, 2), 0, 5)
    position, _ = _queue_reference(np.asarray(experts), 5, capacity=B * T)
    np.testing.assert_array_equal(queue_positions(experts.T.reshape(-1), 5), position)


def test_load_balancing_loss_is_one_when_uniform():
    n, e = 12, 4
    uniform = jnp.full((n, e), 1.0 / e)
    balanced = jnp.arange(n)[:, None] % e  # [N, 1], each expert n / e times
    np.testing.assert_allclose(load_balancing_loss(uniform, balanced), 1.0, rtol=1e-6)
    # Zero router logits give uniform probabilities: the loss is 1 whatever the tie-break.
    probs, _, experts = route(jnp.zeros((n, e)), 2)
    np.testing.assert_allclose(load_balancing_loss(probs, experts), 1.0, rtol=1e-6)
    # Everything on one expert with certainty: the maximum, E.
    collapsed = jax.nn.one_hot(jnp.zeros(n, int), e)
    np.testing.assert_allclose(load_balancing_loss(collapsed, jnp.zeros((n, 1), int)), float(e), rtol=1e-6)


def test_module_params_have_logical_axes():
    moe = MoE(config=MoEConfig(num_experts=3, top_k=1), d_ff=F)
    variables = moe.init(jax.random.PRNGKey(0), jnp.ones((B, T, D)))
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["gate"]) == ("expert", "embed", "mlp")
    assert tuple(specs["down"]) == ("expert", "mlp", "embed")
    y, aux = moe.apply(variables, jnp.ones((B, T, D)))
    assert y.shape == (B, T, D) and set(aux) == {"moe_aux_loss", "moe_dropped_fraction"}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_experts=0), "num_experts=0"),
        (dict(num_experts=4, top_k=5), r"top_k=5; expected an int in \[1, num_experts=4\]"),
        (dict(capacity_factor=0.0), "capacity_factor=0.0"),
        (dict(aux_loss_weight=-1.0), "aux_loss_weight=-1.0"),
    ],
    ids=["no-experts", "top_k-too-big", "zero-capacity", "negative-weight"],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**kwargs)


def test_moe_language_model_reports_aux_and_has_router_gradients():
    cfg = LMConfig.preset("tiny", pattern="A", n_layers=1, mlp="moe",
                          moe={"num_experts": 4, "top_k": 2, "capacity_factor": 1.0, "aux_loss_weight": 0.1})
    lm = LM(config=cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 0, cfg.vocab_size)
    variables = lm.init(jax.random.PRNGKey(1), tokens)
    _, aux = lm.apply(variables, tokens)[:2]
    assert set(aux) == {"aux_loss", "moe_aux_loss", "moe_dropped_fraction"}
    np.testing.assert_allclose(aux["aux_loss"], 0.1 * aux["moe_aux_loss"], rtol=1e-6)
    assert 0.0 <= float(aux["moe_dropped_fraction"]) < 1.0

    def loss(v):
        logits, aux, _ = lm.apply(v, tokens)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + aux["aux_loss"]

    grads = jax.jit(jax.grad(loss))(variables)
    router_grad = nn.unbox(grads)["params"]["layer_0"]["mlp"]["router"]
    assert np.all(np.isfinite(router_grad)) and np.any(router_grad != 0)
