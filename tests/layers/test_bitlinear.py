"""BitLinear (BitNet b1.58): ternary weights, 8-bit activations, straight-through gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effarch.layers.linear import (
    ACTIVATION_LEVELS,
    QUANT_EPS,
    BitLinear,
    int8_activations,
    projection,
    ternary_weights,
)
from effarch.layers.norms import rms_normalize
from effarch.models import LM, LMConfig
from effarch.testing import assert_relative_close, descent_losses


def test_ternary_weights_by_hand():
    w = jnp.array([[0.9, -0.1], [-2.0, 0.5]])
    scale = 0.875 + QUANT_EPS  # mean |w|
    # w / scale = [1.03, -0.11, -2.29, 0.57] -> round, clip to [-1, 1] -> [1, 0, -1, 1]
    np.testing.assert_allclose(ternary_weights(w), np.array([[1, 0], [-1, 1]]) * scale, rtol=1e-6)


def test_ternary_weights_take_three_values():
    w = jax.random.normal(jax.random.PRNGKey(0), (37, 29))
    q = np.asarray(ternary_weights(w))
    scale = float(jnp.mean(jnp.abs(w))) + QUANT_EPS
    levels = q / scale  # the STE's forward value w + (q - w) is q up to float rounding
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-6)
    np.testing.assert_array_equal(np.unique(np.round(levels)), [-1.0, 0.0, 1.0])


def test_int8_activations_grid_per_token():
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 33))
    q = np.asarray(int8_activations(x))
    step = (np.max(np.abs(np.asarray(x)), axis=-1, keepdims=True) + QUANT_EPS) / ACTIVATION_LEVELS
    levels = q / step
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)  # on the per-token grid
    assert np.max(np.abs(levels)) <= ACTIVATION_LEVELS + 1e-3
    np.testing.assert_allclose(q, x, atol=float(np.max(step)) / 2 + 1e-6)  # rounding error <= half a step


def _bitlinear_and_inputs():
    kx, kp = jax.random.split(jax.random.PRNGKey(2))
    x = jax.random.normal(kx, (2, 7, 13))
    layer = BitLinear(features=9)
    return layer, layer.init(kp, x), x


def test_forward_equals_quantised_matmul():
    layer, variables, x = _bitlinear_and_inputs()
    w = variables["params"]["kernel"]
    ref = int8_activations(rms_normalize(x, QUANT_EPS)) @ ternary_weights(w)
    assert_relative_close(layer.apply(variables, x), ref, name="bitlinear forward")
    assert isinstance(projection(9, kind="bitlinear"), BitLinear)


def test_ste_gradient_is_the_identity_path():
    """Gradients pass each quantiser as if it were the identity.

    d/dW: the dense gradient of ``A @ W`` with A the (constant) quantised
    activations; d/dx: the dense gradient of ``rms_norm(x) @ Wq`` with Wq the
    (constant) ternary weights.
    """
    layer, variables, x = _bitlinear_and_inputs()
    w = variables["params"]["kernel"]
    cotangent = jax.random.normal(jax.random.PRNGKey(3), (2, 7, 9))
    _, vjp = jax.vjp(lambda v, x: layer.apply(v, x), variables, x)
    grad_vars, grad_x = vjp(cotangent)

    quantised_acts = int8_activations(rms_normalize(x, QUANT_EPS))
    ternary = ternary_weights(w)
    _, vjp_w = jax.vjp(lambda w: quantised_acts @ w, w)
    _, vjp_x = jax.vjp(lambda x: rms_normalize(x, QUANT_EPS) @ ternary, x)
    assert_relative_close(grad_vars["params"]["kernel"], vjp_w(cotangent)[0], name="dW")
    assert_relative_close(grad_x, vjp_x(cotangent)[0], name="dx")


def test_bitlinear_model_trains():
    cfg = LMConfig.preset("tiny", projection="bitlinear", pattern="A", n_layers=1)
    lm = LM(config=cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, cfg.vocab_size)
    params = nn.unbox(lm.init(jax.random.PRNGKey(1), tokens))
    assert "kernel" in params["params"]["layer_0"]["mlp"]["gate"]

    losses = descent_losses(lm, params, tokens)
    assert losses[-1] < losses[0] - 0.1, losses
