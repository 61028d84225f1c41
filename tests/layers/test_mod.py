"""Mixture-of-Depths routing (effarch.layers.mod) against its per-token reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from effarch.layers.mod import mixture_of_depths, mixture_of_depths_reference, select_tokens
from effarch.testing import assert_relative_close


def test_mixture_of_depths_matches_reference_for_per_token_block():
    kx, ks, kw = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (2, 11, 6))
    scores = jax.random.normal(ks, (2, 11))
    w = jax.random.normal(kw, (6, 6))
    block = lambda h: h + jnp.tanh(h @ w)  # noqa: E731  (per token)
    out, _ = mixture_of_depths(lambda h, _: (block(h), None), x, scores, capacity=0.4)
    assert_relative_close(out, mixture_of_depths_reference(block, x, scores, 0.4), name="mod")
    idx = select_tokens(scores, 0.4)
    chex.assert_shape(idx, (2, 5))  # ceil(0.4 * 11)
    assert np.all(np.diff(np.asarray(idx), axis=1) > 0), "selected tokens keep time order"
