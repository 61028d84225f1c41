"""Linear attention, RetNet, GLA, HGRN-2: feature maps, decays, gates, option checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch import mixers
from effarch.mixers.hgrn2 import forget_gate
from effarch.mixers.linear_attention import feature_map, taylor_feature_map
from effarch.mixers.retnet import retention_log_decay
from effarch.testing import assert_relative_close


def test_taylor_feature_map_approximates_exp():
    q = jax.random.normal(jax.random.PRNGKey(0), (7, 16)) * 0.5
    k = jax.random.normal(jax.random.PRNGKey(1), (7, 16)) * 0.5
    dots = jnp.sum(q * k, -1) / 4.0  # q.k / sqrt(d)
    phi = jnp.sum(taylor_feature_map(q) * taylor_feature_map(k), -1)
    assert taylor_feature_map(q).shape == (7, 1 + 16 + 256)
    assert_relative_close(phi, 1 + dots + dots**2 / 2, name="phi(q).phi(k)")


def test_elu_feature_map_is_positive():
    x = jnp.linspace(-15, 15, 101)  # below ~-17, elu(x) + 1 rounds to 0 in float32
    assert float(jnp.min(feature_map("elu", x))) > 0


def test_sum_normalization_is_a_weighted_average():
    """With every value equal to 2, phi(q).S / phi(q).z is exactly 2."""
    mixer = mixers.build("linear_attention", d_model=8, num_heads=2, feature_map="elu")
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 9, 8)).at[..., 0].set(2.0)
    params = mixer.init(jax.random.PRNGKey(1), x)
    params["params"]["v_proj"]["kernel"] = jnp.zeros((8, 8)).at[0].set(1.0)  # v = x[..., 0] = 2
    params["params"]["o_proj"]["kernel"] = jnp.eye(8)
    y, _ = mixer.apply(params, x)
    np.testing.assert_allclose(y, 2.0, rtol=1e-5)


def test_retention_decays_follow_the_paper():
    np.testing.assert_allclose(np.exp(retention_log_decay(4)), 1 - 2.0 ** (-5 - np.arange(4)), rtol=1e-6)


@pytest.mark.parametrize("lower_bound", [0.0, 0.9])
def test_hgrn2_forget_gate_respects_the_lower_bound(lower_bound):
    logits = jnp.linspace(-40, 40, 81)
    log_f, one_minus_f = forget_gate(logits, lower_bound)
    f = jnp.exp(log_f)
    assert float(jnp.min(f)) >= lower_bound - 1e-6 and float(jnp.max(f)) <= 1.0
    assert_relative_close(one_minus_f + f, jnp.ones_like(f), name="k = 1 - f")


@pytest.mark.parametrize("d_model,expansion", [(256, 128), (64, 64), (200, 100), (129, 43), (7, 7)],
                         ids=lambda v: str(v))
def test_hgrn2_default_expansion_builds_at_every_width(d_model, expansion):
    """expand_ratio=None: the largest divisor of d_model up to the paper's 128."""
    config = mixers.make_config("hgrn2", d_model=d_model)
    assert (config.expansion, config.num_heads) == (expansion, d_model // expansion)


def test_gla_decay_starts_near_one():
    mixer = mixers.build("gla", d_model=16, preset="tiny")
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 16))
    _, inter = mixer.apply(mixer.init(jax.random.PRNGKey(1), x), x, capture_intermediates=True,
                           mutable=["intermediates"])
    up = inter["intermediates"]["gk_up"]["__call__"][0]
    log_alpha = jax.nn.log_sigmoid(up) / 16.0
    alpha = jnp.exp(log_alpha)
    assert float(jnp.median(alpha)) > 0.95 and float(jnp.min(alpha)) > 0.5, "logsigmoid / 16 keeps alpha near 1"


@pytest.mark.parametrize(
    "name,options,message",
    [("linear_attention", {"feature_map": "identity"}, "normalization='sum' needs a positive feature map"),
     ("linear_attention", {"feature_map": "relu"}, "feature_map='relu'"),
     ("retnet", {"num_heads": 3}, "num_heads=3 must divide d_model=16"),
     ("gla", {"expand_k": 0.3}, "key width expand_k"),
     ("hgrn2", {"expand_ratio": 5}, "expand_ratio=5 must divide d_model=16"),
     ("hgrn2", {"expand_ratio": 8, "lower_bound": 1.0}, "lower_bound=1.0")],
    ids=["la_sum_identity", "la_map", "retnet_heads", "gla_keys", "hgrn2_ratio", "hgrn2_bound"])
def test_bad_options_are_named(name, options, message):
    with pytest.raises(ValueError, match=message):
        mixers.build(name, d_model=16, **options)


@pytest.mark.parametrize("lower_bound", [0.0, 0.3, 0.9])
def test_hgrn2_vector_lower_bound_equals_the_scalar_one(lower_bound):
    logits = jnp.linspace(-40, 40, 81)
    want = forget_gate(logits, lower_bound)
    got = forget_gate(logits, jnp.full((81,), lower_bound))
    assert_relative_close(got[0], want[0], name="log f")
    assert_relative_close(got[1], want[1], name="1 - f")


def test_hgrn2_learned_bound_is_a_call_argument():
    learned = mixers.build("hgrn2", d_model=16, preset="tiny", lower_bound="learned")
    fixed = mixers.build("hgrn2", d_model=16, preset="tiny", lower_bound=0.3)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 7, 16))
    params = fixed.init(jax.random.PRNGKey(1), x)
    y_fixed, _ = fixed.apply(params, x)
    y_learned, _ = learned.apply(params, x, lower_bound=jnp.full((16,), 0.3))
    assert_relative_close(y_learned, y_fixed, name="learned bound 0.3 vs config bound 0.3")
    with pytest.raises(ValueError, match="a 'learned' bound comes from the LM"):
        learned.apply(params, x)
    with pytest.raises(ValueError, match=r"lower_bound has shape \(8,\); expected \[16\]"):
        learned.apply(params, x, lower_bound=jnp.zeros((8,)))
    with pytest.raises(ValueError, match="lower_bound='fixed'; expected a float in"):
        mixers.make_config("hgrn2", d_model=16, lower_bound="fixed")
