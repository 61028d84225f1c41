"""Causal depthwise short convolution against its per-step reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.layers.conv import ShortConv, causal_conv1d, causal_conv1d_reference, init_conv_state
from effarch.testing import assert_relative_close


def _inputs(b=2, t=13, d=6, w=4, seed=0):
    kx, kw, kb, ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    return (jax.random.normal(kx, (b, t, d)), jax.random.normal(kw, (w, d)),
            jax.random.normal(kb, (d,)), jax.random.normal(ks, (b, w - 1, d)))


@pytest.mark.parametrize("w", [1, 2, 4], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "state"])
def test_matches_reference(w, with_state):
    x, weight, bias, state = _inputs(w=w)
    state = state if with_state else None
    y, new_state = causal_conv1d(x, weight, bias, state=state)
    y_ref, state_ref = causal_conv1d_reference(x, weight, bias, state=state)
    assert_relative_close(y, y_ref, name="y")
    np.testing.assert_allclose(new_state, state_ref, rtol=0, atol=0)
    grads = jax.grad(lambda *a: jnp.sum(jnp.sin(causal_conv1d(*a, state=state)[0])), (0, 1, 2))(x, weight, bias)
    grads_ref = jax.grad(lambda *a: jnp.sum(jnp.sin(causal_conv1d_reference(*a, state=state)[0])), (0, 1, 2))(
        x, weight, bias)
    assert_relative_close(grads, grads_ref, name="grads")


@pytest.mark.parametrize("packed", [False, True], ids=["one", "packed"])
def test_gradients_over_batch_blocks(monkeypatch, packed):
    # The backward pass sums the tap gradients over blocks of batch rows: with a
    # block of 4 rows' bytes, a batch of 6 is cut into 2 blocks of 3. With
    # segments, the new state holds only the last segment's inputs (zeros before
    # its start), as the reference's window does.
    from effarch.layers import conv  # pylint: disable=import-outside-toplevel

    b, t, d, w = 6, 10, 5, 4
    monkeypatch.setattr(conv, "_TAP_GRAD_BLOCK_BYTES", 4 * (t + w - 1) * d * 4)
    x, weight, bias, state = _inputs(b=b, t=t, d=d, w=w, seed=3)
    ids = jnp.array([[0] * 3 + [1] * 7] * 3 + [[0] * 10] * 2 + [[0] * 9 + [1]]) if packed else None

    def loss(fn):
        def f(x, weight, bias, state):
            y, new_state = fn(x, weight, bias, state=state, segment_ids=ids)
            return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(new_state))
        return f

    grads = jax.grad(loss(causal_conv1d), (0, 1, 2, 3))(x, weight, bias, state)
    grads_ref = jax.grad(loss(causal_conv1d_reference), (0, 1, 2, 3))(x, weight, bias, state)
    assert_relative_close(grads, grads_ref, name="grads x, weight, bias, state")
    new_state = causal_conv1d(x, weight, bias, state=state, segment_ids=ids)[1]
    np.testing.assert_allclose(new_state, causal_conv1d_reference(x, weight, bias, state=state, segment_ids=ids)[1],
                               rtol=0, atol=0)


def test_segments_equal_separate_sequences():
    x, weight, bias, _ = _inputs(b=1, t=11)
    ids = jnp.array([[0] * 4 + [1] * 2 + [2] * 5])
    y, _ = causal_conv1d(x, weight, bias, segment_ids=ids)
    pieces = [causal_conv1d(x[:, s:e], weight, bias)[0] for s, e in ((0, 4), (4, 6), (6, 11))]
    assert_relative_close(y, jnp.concatenate(pieces, axis=1), name="packed")
    y_ref, _ = causal_conv1d_reference(x, weight, bias, segment_ids=ids)
    assert_relative_close(y, y_ref, name="packed vs reference")


def test_step_by_step_equals_full():
    x, weight, bias, _ = _inputs(t=9, w=4)
    full, full_state = causal_conv1d(x, weight, bias)
    state = init_conv_state(2, 4, 6)
    prefix, state = causal_conv1d(x[:, :2], weight, bias, state=state)  # prefill shorter than W-1
    ys = [prefix]
    for t in range(2, 9):
        y, state = causal_conv1d(x[:, t:t + 1], weight, bias, state=state)
        ys.append(y)
    assert_relative_close(jnp.concatenate(ys, axis=1), full, name="decoded")
    np.testing.assert_allclose(state, full_state, rtol=0, atol=0)


def test_module_and_bad_shapes():
    x, *_ = _inputs()
    conv = ShortConv(kernel_size=3, activation="silu")
    params = conv.init(jax.random.PRNGKey(1), x)
    y, state = conv.apply(params, x)
    assert y.shape == x.shape and state.shape == (2, 2, 6)
    with pytest.raises(ValueError, match=r"state has shape \(2, 3, 6\); expected \[B,W-1,D\]"):
        conv.apply(params, x, jnp.zeros((2, 3, 6)))
    with pytest.raises(ValueError, match="weight has shape"):
        causal_conv1d(x, jnp.zeros((4, 5)))


@pytest.mark.parametrize("t", [1, 13], ids=lambda t: f"T{t}")
def test_fft_long_conv_matches_direct(t):
    from effarch.layers.conv import direct_causal_conv, fft_causal_conv

    u = jax.random.normal(jax.random.PRNGKey(3), (2, t, 5))
    kernel = jax.random.normal(jax.random.PRNGKey(4), (t, 5))
    assert_relative_close(fft_causal_conv(u, kernel), direct_causal_conv(u, kernel), name="fft")
    grads = jax.grad(lambda u, k: jnp.sum(jnp.sin(fft_causal_conv(u, k))), (0, 1))(u, kernel)
    grads_ref = jax.grad(lambda u, k: jnp.sum(jnp.sin(direct_causal_conv(u, k))), (0, 1))(u, kernel)
    assert_relative_close(grads, grads_ref, name="fft grads")


def test_direct_long_conv_respects_segments():
    from effarch.layers.conv import direct_causal_conv

    u = jax.random.normal(jax.random.PRNGKey(3), (1, 9, 4))
    kernel = jax.random.normal(jax.random.PRNGKey(4), (9, 4))
    ids = jnp.array([[0] * 5 + [1] * 4])
    packed = direct_causal_conv(u, kernel, segment_ids=ids)
    separate = jnp.concatenate([direct_causal_conv(u[:, :5], kernel[:5]), direct_causal_conv(u[:, 5:], kernel[:4])], 1)
    assert_relative_close(packed, separate, name="packed")
