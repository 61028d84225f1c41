"""The optimiser: warmup + cosine schedule, clipping, weight decay only on matrices, TrainConfig checks."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effarch import train


def _config(**overrides):
    fields = dict(steps=100, batch_size=4, seq_len=8, lr=1e-2, warmup_steps=10, min_lr_ratio=0.1)
    return train.TrainConfig(**{**fields, **overrides})


def test_schedule_warms_up_then_decays_to_the_floor():
    schedule = train.learning_rate(_config())
    lrs = np.array([schedule(s) for s in range(101)])
    np.testing.assert_allclose(lrs[[0, 5, 10]], [0.0, 5e-3, 1e-2], rtol=1e-6)
    assert np.all(np.diff(lrs[10:]) <= 0)
    np.testing.assert_allclose(lrs[100], 1e-3, rtol=1e-6)
    np.testing.assert_allclose(lrs[55], 1e-3 + 0.5 * (1e-2 - 1e-3), rtol=1e-5)  # cosine midpoint


def test_weight_decay_skips_vectors():
    params = {"norm": {"scale": jnp.ones((4,))}, "dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))}}
    assert train.decay_mask(params) == {"norm": {"scale": False}, "dense": {"kernel": True, "bias": False}}
    opt = train.make_optimizer(_config(warmup_steps=0, weight_decay=0.5))
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    assert float(jnp.abs(updates["norm"]["scale"]).max()) == 0.0
    assert float(jnp.abs(updates["dense"]["bias"]).max()) == 0.0
    np.testing.assert_allclose(updates["dense"]["kernel"], -1e-2 * 0.5 * np.ones((4, 4)), rtol=1e-6)


def test_clipping_equals_adamw_on_the_clipped_gradient():
    params = {"w": jnp.ones((3, 5)), "b": jnp.zeros((5,))}
    grads = {"w": jnp.full((3, 5), 100.0), "b": jnp.arange(5.0) * 1e3}
    clipped = jax.tree.map(lambda g: g / optax.global_norm(grads), grads)
    with_clip = train.make_optimizer(_config(warmup_steps=0, grad_clip=1.0))
    without = train.make_optimizer(_config(warmup_steps=0, grad_clip=0.0))
    state_a, state_b = with_clip.init(params), without.init(params)
    for _ in range(3):
        a, state_a = with_clip.update(grads, state_a, params)
        b, state_b = without.update(clipped, state_b, params)
        chex.assert_trees_all_close(a, b, rtol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(batch_size=6, grad_accum=4), "not divisible by grad_accum=4"),
        (dict(warmup_steps=100), "warmup_steps=100 must be below steps=100"),
        (dict(mesh=(-1, -1, 1)), "at most one -1"),
        (dict(steps=0), "steps=0"),
        (dict(eval_fraction=0.0), "eval_fraction=0.0"),
        (dict(data="stdlib"), "tuple of paths"),
    ],
    ids=["accum", "warmup", "mesh", "steps", "eval_fraction", "data_str"],
)
def test_train_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(**overrides)


def test_weight_decay_skips_recurrence_and_ssm_parameters_of_any_rank():
    """Mamba-1's A_log [E*D, N], S4D's A and per-head norm scales [H, K] are not decayed; weights and experts are."""
    from effarch.models import LM, LMConfig  # pylint: disable=import-outside-toplevel
    from effarch.layers.moe import MoEConfig  # pylint: disable=import-outside-toplevel

    config = LMConfig(d_model=32, n_layers=3, pattern="SQK", mixers={"Q": ("s4d", {}), "K": ("gla", {})},
                      mlp="moe", moe=MoEConfig(num_experts=4, top_k=2), vocab_size=64)
    params = jax.eval_shape(lambda: LM(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    params = nn.unbox(params)  # as the trainer holds them
    decayed = {jax.tree_util.keystr(path): (flag, leaf.ndim)
               for (path, flag), leaf in zip(jax.tree_util.tree_flatten_with_path(train.decay_mask(params))[0],
                                             jax.tree.leaves(params))}

    def flags_of(name):
        found = {flag for key, (flag, _) in decayed.items() if key.endswith(f"['{name}']")}
        assert found, f"no parameter named {name} in {sorted(decayed)[:20]}"
        return found

    assert {ndim for key, (_, ndim) in decayed.items() if key.endswith("['A_log']")} >= {2}  # Mamba-1's A_log
    for name in ("A_log", "D", "dt_bias", "log_neg_a_real", "a_imag", "log_dt", "scale", "bias"):
        assert flags_of(name) == {False}, name
    for name in ("kernel", "embedding", "gate", "up", "down", "router"):
        assert flags_of(name) == {True}, name
