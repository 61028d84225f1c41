"""DeltaNet and Gated DeltaNet against an independent per-step forward of the papers' layers.

The generic interface checks are in test_mixers_common.py. Here the whole
layer is recomputed from its parameters with a plain loop over time (short
convs, L2-normalised q and k, sigmoid beta, the (gated) delta rule, per-head
RMS norm, output gate), values and parameter gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch import mixers
from effarch.mixers import deltanet
from effarch.testing import assert_relative_close

B, T, D = 2, 5, 16
HEAD_DIM = 4  # 4 heads


def _silu_conv(kernel, x):
    """Causal depthwise conv (no bias) then SiLU; ``kernel [W,D]``, the last tap on the current token."""
    width = kernel.shape[0]
    padded = jnp.pad(x, ((0, 0), (width - 1, 0), (0, 0)))
    return jax.nn.silu(sum(kernel[j] * padded[:, j : j + T] for j in range(width)))


def layer_loop(params, x, cfg, gated):
    """DeltaNet (Yang et al. 2024) / Gated DeltaNet layer, step by step."""
    p = params["params"]
    h, hv, kd, vd = cfg.heads, cfg.value_heads, cfg.head_dim, cfg.value_dim
    lin = lambda name, inputs: inputs @ p[name]["kernel"]
    l2 = lambda a: a / jnp.sqrt(jnp.sum(a * a, axis=-1, keepdims=True) + deltanet.L2_EPS)
    # Value head j reads key head j // (hv / h).
    q = jnp.repeat(l2(_silu_conv(p["conv_q"]["kernel"], lin("q_proj", x)).reshape(B, T, h, kd)), hv // h, axis=2)
    k = jnp.repeat(l2(_silu_conv(p["conv_k"]["kernel"], lin("k_proj", x)).reshape(B, T, h, kd)), hv // h, axis=2)
    v = _silu_conv(p["conv_v"]["kernel"], lin("v_proj", x)).reshape(B, T, hv, vd)
    beta = jax.nn.sigmoid(lin("b_proj", x))  # [B,T,H_v]
    alpha = jnp.ones((B, T, hv))
    if gated:
        alpha = jnp.exp(-jnp.exp(p["A_log"]) * jax.nn.softplus(lin("a_proj", x) + p["dt_bias"]))
    state = jnp.zeros((B, hv, kd, vd))
    outs = []
    for t in range(T):
        k_t, b_t = k[:, t], beta[:, t, :, None, None]
        erase = k_t[..., None] * jnp.einsum("bhk,bhkv->bhv", k_t, state)[:, :, None]  # k (k^T S)
        state = alpha[:, t, :, None, None] * (state - b_t * erase) + b_t * k_t[..., None] * v[:, t, :, None]
        outs.append(jnp.einsum("bhkv,bhk->bhv", state, q[:, t]) / np.sqrt(kd))
    o = jnp.stack(outs, axis=1)  # [B,T,H_v,V]
    o = o / jnp.sqrt(jnp.mean(o * o, axis=-1, keepdims=True) + cfg.norm_eps) * p["o_norm"]["scale"]  # scale [V]
    if gated:
        o = o * jax.nn.silu(lin("g_proj", x).reshape(B, T, hv, vd))
    return lin("o_proj", o.reshape(B, T, hv * vd))


# Gated DeltaNet runs every piece of DeltaNet plus the decay and gate; plain
# DeltaNet's layer check is slow-marked to keep the default run short.
@pytest.mark.parametrize("name", [pytest.param("deltanet", marks=pytest.mark.slow), "gated_deltanet"])
def test_layer_matches_the_per_step_forward(name):
    mixer = mixers.build(name, d_model=D, head_dim=HEAD_DIM, chunk_size=2)
    x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
    params = mixer.init(jax.random.PRNGKey(1), x)
    gated = name == "gated_deltanet"
    y, _ = mixer.apply(params, x)
    assert_relative_close(y, layer_loop(params, x, mixer.config, gated), name=f"{name} output")
    probe = jnp.cos(jnp.arange(B * T * D, dtype=jnp.float32)).reshape(B, T, D)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(mixer.apply(p, x)[0] * probe)))(params)
    grads_ref = jax.jit(jax.grad(lambda p: jnp.sum(layer_loop(p, x, mixer.config, gated) * probe)))(params)
    assert_relative_close(grads, grads_ref, name=f"{name} param grads")


def test_gated_decay_starts_in_the_mamba2_range():
    """``-exp(A_log) softplus(dt_bias)`` at zero input: A in [1, 16], dt in [1e-3, 0.1]."""
    keys = jax.random.split(jax.random.PRNGKey(2))
    a = np.exp(np.asarray(deltanet.a_log_init(keys[0], (64,))))
    dt = np.asarray(jax.nn.softplus(deltanet.dt_bias_init(keys[1], (64,))))
    assert np.all((a >= 1.0) & (a <= 16.0)), a
    np.testing.assert_array_less(deltanet.DT_INIT_RANGE[0] * (1 - 1e-4), dt)
    np.testing.assert_array_less(dt, deltanet.DT_INIT_RANGE[1] * (1 + 1e-4))


def test_head_dim_must_divide_d_model():
    with pytest.raises(ValueError, match="head_dim=5 must divide d_model=16"):
        mixers.build("deltanet", d_model=D, head_dim=5)


def test_value_heads_are_a_multiple_of_key_heads():
    with pytest.raises(ValueError, match="num_v_heads=6 must be a positive multiple of the query/key heads "
                                         "num_heads=4"):
        mixers.build("gated_deltanet", d_model=D, head_dim=HEAD_DIM, num_v_heads=6)
