"""Mamba-1 and Mamba-2: initialisation from the papers, the SSD mapping, option checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch import mixers
from effarch.mixers.mamba import dt_bias_init
from effarch.testing import assert_relative_close


def test_dt_bias_init_gives_step_sizes_in_range():
    bias = dt_bias_init(1e-3, 1e-1, 1e-4)(jax.random.PRNGKey(0), (4096,))
    dt = jax.nn.softplus(bias)
    assert float(dt.min()) >= 1e-3 * (1 - 1e-4) and float(dt.max()) <= 1e-1 * (1 + 1e-4)
    assert 0.008 < float(jnp.median(dt)) < 0.0125, "log-uniform: median near sqrt(1e-3 * 1e-1)"


def test_mamba_a_is_s4d_real():
    mixer = mixers.build("mamba", d_model=8, preset="tiny")
    params = mixer.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 8)))["params"]
    a = -np.exp(np.asarray(params["A_log"]))
    np.testing.assert_allclose(a, -np.broadcast_to(np.arange(1, 5), (16, 4)), rtol=1e-6)
    assert params["dt_proj"]["kernel"].shape == (1, 16), "dt_rank = ceil(D / 16)"


def test_mamba2_a_range_and_one_head_group_per_norm_group():
    mixer = mixers.build("mamba2", d_model=16, preset="tiny")
    params = mixer.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 16)))["params"]
    neg_a = np.exp(np.asarray(params["A_log"]))
    assert params["A_log"].shape == (2,) and np.all((neg_a >= 1) & (neg_a <= 16))
    assert params["in_proj"]["kernel"].shape == (16, 2 * 32 + 2 * 2 * 8 + 2)  # z, x, B, C, dt


def test_mamba2_state_is_ssd_with_dt_scaled_values():
    """One step from zero: S = B (dt x)^T per head, so y = (C.B) dt x + D x before the gate."""
    mixer = mixers.build("mamba2", d_model=8, d_state=4, head_dim=8, expand=1, d_conv=1)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 8))
    params = mixer.init(jax.random.PRNGKey(1), x)
    cache = mixer.init_cache(1, 4)
    _, cache = mixer.apply(params, x, cache)
    p = params["params"]
    zxbcdt = x[0, 0] @ p["in_proj"]["kernel"]
    conv = jax.nn.silu(zxbcdt[8:24] * p["conv"]["kernel"][0] + p["conv"]["bias"])
    u, b_in = conv[:8], conv[8:12]
    dt = jax.nn.softplus(zxbcdt[24:] + p["dt_bias"])
    assert_relative_close(cache.state[0, 0], jnp.outer(b_in, dt[0] * u), name="S_1")


def test_mamba_dt_bc_norm_normalises_dt_b_and_c_before_the_scan():
    """Jamba's norms: scaling the x_proj rows of dt, B or C leaves the output unchanged (up to eps)."""
    d, r, n = 8, 3, 4
    mixer = mixers.build("mamba", d_model=d, d_state=n, dt_rank=r, dt_bc_norm=True, dt_bc_norm_eps=1e-12)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, d))
    params = mixer.init(jax.random.PRNGKey(1), x)
    assert {k: params["params"][k]["scale"].shape for k in ("dt_norm", "b_norm", "c_norm")} == \
        {"dt_norm": (r,), "b_norm": (n,), "c_norm": (n,)}
    y, _ = mixer.apply(params, x)
    rows = jnp.concatenate([jnp.full(r, 3.0), jnp.full(n, 0.2), jnp.full(n, 7.0)])  # dt, B, C scaled apart
    scaled = jax.tree_util.tree_map_with_path(
        lambda path, a: a * rows if "x_proj" in str(path) else a, params)
    assert_relative_close(mixer.apply(scaled, x)[0], y, name="scaled dt, B, C")
    plain = mixers.build("mamba", d_model=d, d_state=n, dt_rank=r)
    plain_params = {"params": {k: v for k, v in params["params"].items() if not k.endswith("_norm")}}
    assert float(jnp.max(jnp.abs(plain.apply(plain_params, x)[0] - y))) > 1e-3, "the norms change the output"


@pytest.mark.parametrize(
    "name,options,message",
    [("mamba", {"d_state": 0}, "d_state=0"),
     ("mamba", {"dt_min": 0.5, "dt_max": 0.1}, "dt_min=0.5, dt_max=0.1"),
     ("mamba2", {"head_dim": 7}, "head_dim=7 must divide"),
     ("mamba2", {"head_dim": 8, "ngroups": 3}, "ngroups=3 must divide")],
    ids=["mamba_state", "mamba_dt", "mamba2_head", "mamba2_groups"])
def test_bad_options_are_named(name, options, message):
    with pytest.raises(ValueError, match=message):
        mixers.build(name, d_model=16, **options)
