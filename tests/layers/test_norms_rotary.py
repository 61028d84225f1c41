"""Norms and rotary embeddings against readable references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.layers.norms import GatedRMSNorm, HeadNorm, LayerNorm, RMSNorm
from effarch.layers.rotary import (
    apply_rotary,
    apply_rotary_reference,
    segment_positions,
    token_positions,
)
from effarch.testing import assert_relative_close

X = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 12)) * 3 + 1


def test_rmsnorm_and_layernorm():
    y = RMSNorm().apply(RMSNorm().init(jax.random.PRNGKey(0), X), X)
    assert_relative_close(y, X / np.sqrt(np.mean(np.square(X), -1, keepdims=True) + 1e-6))
    y = LayerNorm().apply(LayerNorm().init(jax.random.PRNGKey(0), X), X)
    ref = (X - X.mean(-1, keepdims=True)) / np.sqrt(X.var(-1, keepdims=True) + 1e-6)
    assert_relative_close(y, ref)


def test_zero_centered_rmsnorm_scales_by_one_plus_its_parameter():
    norm = RMSNorm(zero_centered=True)
    variables = norm.init(jax.random.PRNGKey(0), X)
    np.testing.assert_array_equal(variables["params"]["scale"], np.zeros(12))  # starts as the identity scale
    offset = jax.random.normal(jax.random.PRNGKey(1), (12,))
    y = norm.apply({"params": {"scale": offset}}, X)
    plain = RMSNorm().apply({"params": {"scale": 1.0 + offset}}, X)
    assert_relative_close(y, plain)


@pytest.mark.parametrize("group_size", [None, 4], ids=["whole", "groups4"])
def test_gated_rmsnorm(group_size):
    z = jax.random.normal(jax.random.PRNGKey(1), X.shape)
    norm = GatedRMSNorm(group_size=group_size)
    y = norm.apply(norm.init(jax.random.PRNGKey(0), X, z), X, z)
    g = group_size or 12
    gated = (X * jax.nn.silu(z)).reshape(2, 5, 12 // g, g)
    ref = gated / np.sqrt(np.mean(np.square(gated), -1, keepdims=True) + 1e-6)
    assert_relative_close(y, ref.reshape(X.shape))
    with pytest.raises(ValueError, match="group_size=5 must divide"):
        GatedRMSNorm(group_size=5).init(jax.random.PRNGKey(0), X, z)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_head_norm_is_per_head(kind):
    x = X.reshape(2, 5, 3, 4) * jnp.array([1.0, 10.0, 100.0])[:, None]
    norm = HeadNorm(kind=kind)
    y = norm.apply(norm.init(jax.random.PRNGKey(0), x), x)
    per_head = [HeadNorm(kind=kind, use_scale=False).apply({}, x[:, :, h:h + 1]) for h in range(3)]
    assert_relative_close(y, jnp.concatenate(per_head, axis=2))


@pytest.mark.parametrize("fraction", [1.0, 0.5], ids=["full", "half"])
def test_rotary_matches_complex_reference_and_is_relative(fraction):
    q = jax.random.normal(jax.random.PRNGKey(2), (2, 7, 3, 8))
    k = jax.random.normal(jax.random.PRNGKey(3), (2, 7, 3, 8))
    pos = jnp.arange(7)
    assert_relative_close(apply_rotary(q, pos, fraction=fraction), apply_rotary_reference(q, pos, fraction=fraction))
    scores = jnp.einsum("bthk,bshk->bhts", apply_rotary(q, pos), apply_rotary(k, pos))
    shifted = jnp.einsum("bthk,bshk->bhts", apply_rotary(q, pos + 100), apply_rotary(k, pos + 100))
    assert_relative_close(shifted, scores, name="relative positions")


def test_segment_positions():
    ids = jnp.array([[3, 3, 3, 1, 1, 7], [0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(segment_positions(ids), [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])


def test_token_positions_from_cache_segments_or_zero():
    ids = jnp.array([[0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(token_positions(3, start=jnp.array(7)), [7, 8, 9])
    np.testing.assert_array_equal(token_positions(5, segment_ids=ids), [[0, 1, 0, 1, 2]])
    np.testing.assert_array_equal(token_positions(4), [0, 1, 2, 3])
    # Decoding from a cache continues its position whatever the ids say.
    np.testing.assert_array_equal(token_positions(2, start=jnp.array(3), segment_ids=ids[:, :2]), [3, 4])
