"""RWKV-6 and RWKV-7 specifics: the WKV forms against the papers' per-step loops.

The generic interface checks (decode, implementations, packing, bf16) are in
test_mixers_common.py; here each WKV is compared, values and gradients,
against an independent loop written as in the RWKV reference kernels.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch import mixers
from effarch.mixers import rwkv
from effarch.testing import assert_relative_close

B, T, H, K, V = 2, 9, 2, 5, 3  # awkward sizes; T spans three chunks of 4
CHUNK = 4
SEGMENTS = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 2, 2, 2]])


def _inputs(seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 7)
    r = jax.random.normal(keys[0], (B, T, H, K))
    k = jax.random.normal(keys[1], (B, T, H, K))
    v = jax.random.normal(keys[2], (B, T, H, V))
    log_w = -jnp.exp(jax.random.normal(keys[3], (B, T, H, K)) - 1.0)
    u = jax.random.normal(keys[4], (H, K))
    state = jax.random.normal(keys[5], (B, H, K, V))
    extra = jax.random.uniform(keys[6], (B, T, H, K))
    return r, k, v, log_w, u, state, extra


def _starts(segment_ids):
    if segment_ids is None:
        return np.zeros((B, T), bool)
    ids = np.asarray(segment_ids)
    return np.concatenate([np.zeros((B, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)


def rwkv6_loop(r, k, v, log_w, u, state, segment_ids=None):
    """Finch's WKV step by step (the ``wkv6`` kernel): read with the bonus, then decay and write."""
    starts = _starts(segment_ids)
    s = jnp.zeros((B, H, K, V)) if state is None else state
    outs = []
    for t in range(T):
        s = jnp.where(starts[:, t, None, None, None], 0.0, s)
        kv = jnp.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        outs.append(jnp.einsum("bhk,bhkv->bhv", r[:, t], s + u[None, :, :, None] * kv))
        s = jnp.exp(log_w[:, t])[..., None] * s + kv
    return jnp.stack(outs, axis=1), s


@pytest.mark.parametrize("with_state", [False, True], ids=["packed", "from_state"])
def test_rwkv6_wkv_matches_the_per_step_loop(with_state):
    r, k, v, log_w, u, state, _ = _inputs()
    state = state if with_state else None
    segment_ids = None if with_state else SEGMENTS  # a cache never comes with segments

    def ours(r, k, v, log_w, u, state):
        o, final = rwkv.rwkv6_wkv(r, k, v, log_w, u, state=state, segment_ids=segment_ids,
                                  chunk_size=CHUNK, implementation="chunked")
        return o, final

    def loop(r, k, v, log_w, u, state):
        o, final = rwkv6_loop(r, k, v, log_w, u, state, segment_ids)
        return o, (final if with_state else None)

    o, final = ours(r, k, v, log_w, u, state)
    o_ref, final_ref = loop(r, k, v, log_w, u, state)
    assert_relative_close(o, o_ref, name="rwkv6 o")
    if with_state:
        assert_relative_close(final, final_ref, name="rwkv6 final state")
    probe = jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
    argnums = (0, 1, 2, 3, 4, 5) if with_state else (0, 1, 2, 3, 4)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a)[0] * probe), argnums))(r, k, v, log_w, u, state)
    grads_ref = jax.jit(jax.grad(lambda *a: jnp.sum(loop(*a)[0] * probe), argnums))(r, k, v, log_w, u, state)
    assert_relative_close(grads, grads_ref, name="rwkv6 grads")


def test_rwkv6_bonus_acts_only_on_the_current_token():
    r, k, v, log_w, u, state, _ = _inputs(1)
    o_without, _ = rwkv.rwkv6_wkv(r, k, v, log_w, jnp.zeros_like(u), state=state, chunk_size=CHUNK)
    o_with, _ = rwkv.rwkv6_wkv(r, k, v, log_w, u, state=state, chunk_size=CHUNK)
    current = jnp.einsum("bthk,hk,bthk->bth", r, u, k)[..., None] * v  # (r_t . (u ⊙ k_t)) v_t
    chex.assert_trees_all_close(o_with - o_without, current, atol=1e-5, rtol=1e-5)


def test_token_shift_uses_the_cache_and_stops_at_segment_starts():
    x = jnp.arange(1.0, 1.0 + B * T).reshape(B, T, 1)
    last = jnp.array([[-1.0], [-2.0]])
    prev = rwkv.token_shift(x, last, SEGMENTS)
    expected = np.concatenate([np.asarray(last)[:, None], np.asarray(x)[:, :-1]], axis=1)
    expected[_starts(SEGMENTS)] = 0.0
    chex.assert_trees_all_close(prev, jnp.asarray(expected))
    chex.assert_trees_all_close(rwkv.token_shift(x, None)[:, 0], jnp.zeros((B, 1)))


def rwkv7_loop(r, k, v, log_w, kk, iclr, state_vk):
    """The ``wkv7`` kernel of BlinkDL/RWKV-LM, in its own ``[V,K]`` state layout.

    ``S = S diag(w) + (S a) b^T + v k^T`` with ``a = -kk``, ``b = kk * iclr``; ``y = S r``.
    """
    s = state_vk
    a, b = -kk, kk * iclr
    outs = []
    for t in range(T):
        sa = jnp.einsum("bhvk,bhk->bhv", s, a[:, t])
        s = (s * jnp.exp(log_w[:, t])[:, :, None, :] + sa[..., None] * b[:, t, :, None, :]
             + v[:, t, :, :, None] * k[:, t, :, None, :])
        outs.append(jnp.einsum("bhvk,bhk->bhv", s, r[:, t]))
    return jnp.stack(outs, axis=1), s


def test_rwkv7_wkv_matches_the_reference_kernel_loop():
    r, k, v, log_w, _, state, iclr = _inputs(2)
    kk = jax.random.normal(jax.random.PRNGKey(3), (B, T, H, K))
    kk = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)

    def ours(r, k, v, log_w, kk, iclr, state):
        return rwkv.rwkv7_wkv(r, k, v, log_w, kk, iclr, state=state)

    def loop(r, k, v, log_w, kk, iclr, state):
        o, s = rwkv7_loop(r, k, v, log_w, kk, iclr, jnp.swapaxes(state, -1, -2))
        return o, jnp.swapaxes(s, -1, -2)

    args = (r, k, v, log_w, kk, iclr, state)
    assert_relative_close(ours(*args), loop(*args), name="rwkv7 (o, state)")
    probe = jnp.sin(jnp.arange(B * T * H * V, dtype=jnp.float32)).reshape(B, T, H, V)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a)[0] * probe), tuple(range(7))))(*args)
    grads_ref = jax.jit(jax.grad(lambda *a: jnp.sum(loop(*a)[0] * probe), tuple(range(7))))(*args)
    assert_relative_close(grads, grads_ref, name="rwkv7 grads")


@pytest.mark.parametrize("name", ["rwkv6", "rwkv7"])
def test_bad_head_size_is_rejected_with_the_values(name):
    with pytest.raises(ValueError, match="head_size=7 must be positive and divide d_model=32"):
        mixers.build(name, d_model=32, head_size=7)


def _rwkv7(**options):
    return mixers.build("rwkv7", d_model=16, preset="tiny", **options)


def test_rwkv7_value_residual_mixes_the_first_layers_values():
    """With v0 = 0 (and the zero-initialised LoRA) the mix is 1/2: v = (v + v_first) / 2, i.e. a plain
    layer whose value projection is the average of the two layers' value projections."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 16))
    first, later, plain = _rwkv7(value_residual=True), _rwkv7(value_residual=True), _rwkv7()
    p_plain = plain.init(jax.random.PRNGKey(1), x)
    w_first = jax.random.normal(jax.random.PRNGKey(2), (16, 16)) * 0.3
    p_first = jax.tree.map(lambda a: a, p_plain)
    p_first["params"]["value"]["kernel"] = w_first
    y_first, _, v_first = first.apply(p_first, x, value_residual=(None,))
    np.testing.assert_allclose(y_first, plain.apply(p_first, x)[0], rtol=1e-6, atol=1e-6)
    p_later = later.init(jax.random.PRNGKey(1), x, value_residual=(v_first,))
    for name in p_plain["params"]:
        p_later["params"][name] = p_plain["params"][name]
    p_later["params"]["v0"] = jnp.zeros((16,))
    y_later, _, passed = later.apply(p_later, x, value_residual=(v_first,))
    averaged = jax.tree.map(lambda a: a, p_plain)
    averaged["params"]["value"]["kernel"] = (p_plain["params"]["value"]["kernel"] + w_first) / 2
    assert_relative_close(y_later, plain.apply(averaged, x)[0], name="lerp(v, v_first, 1/2)")
    np.testing.assert_array_equal(passed, v_first)


def test_rwkv7_value_residual_is_checked():
    x = jnp.zeros((1, 4, 16))
    with pytest.raises(ValueError, match="value_residual=True in the config and value_residual=None"):
        _rwkv7(value_residual=True).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="value_residual=False in the config and value_residual=given"):
        _rwkv7().init(jax.random.PRNGKey(0), x, value_residual=(None,))


def test_rwkv7_initialisation_follows_the_reference():
    """Spot values of the current RWKV-7 init (layer 0 of 4, head size 8, 16 channels)."""
    mixer = _rwkv7(layer_ratio=0.0, num_layers=4)
    params = mixer.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 16)))["params"]
    # channel 0: zigzag = -1, so w0 = -6 + 0 + 0.5 - 2.5 and a0 = -0.19 - 0.3 - 0.2; the last channel of
    # head 0 (n = 7): zigzag = +1, n / 15 = 7 / 15.
    np.testing.assert_allclose(params["w0"][0], -8.0, rtol=1e-6)
    np.testing.assert_allclose(params["a0"][0], -0.69, rtol=1e-6)
    np.testing.assert_allclose(params["w0"][7], -6 + 6 * (7 / 15) + 0.5 + 2.5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(params["k_k"])[[0, 15]], [0.76, 0.66], rtol=1e-6)
    np.testing.assert_allclose(params["k_a"], 1.02, rtol=1e-6)
    np.testing.assert_allclose(params["ln_x"]["scale"], (1 / 4) ** 0.7, rtol=1e-6)
