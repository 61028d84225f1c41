"""Hyena: implicit filters, the decode paths of the long convolution, limits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch import mixers
from effarch.mixers.hyena import HyenaConfig, ImplicitFilter, _conv_from_buffer, positional_encoding
from effarch.layers.conv import direct_causal_conv
from effarch.testing import assert_relative_close


def test_filters_decay_along_the_sequence():
    cfg = HyenaConfig(d_model=8, max_len=256, filter_order=16)
    filt = ImplicitFilter(cfg)
    h = filt.apply(filt.init(jax.random.PRNGKey(0)))
    assert h.shape == (256, 8)
    early, late = jnp.abs(h[:16]).mean(0), jnp.abs(h[-16:]).mean(0)
    assert np.all(np.asarray(late < early)), "the exponential window damps late taps on every channel"
    assert positional_encoding(256, 5).shape == (256, 5)


@pytest.mark.parametrize("t", [1, 5], ids=["one_step_direct", "several_steps_fft"])
def test_conv_from_buffer_equals_direct(t):
    buffer = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 3)).at[:, 9 + t:].set(0.0)
    kernel = jax.random.normal(jax.random.PRNGKey(1), (16, 3))
    out = _conv_from_buffer(buffer, kernel, jnp.int32(9), t)
    assert_relative_close(out, direct_causal_conv(buffer, kernel)[:, 9 : 9 + t])


def test_limits_are_named():
    mixer = mixers.build("hyena", d_model=8, preset="tiny", max_len=16)
    with pytest.raises(ValueError, match="max_len=32 exceeds the filter length config.max_len=16"):
        mixer.init_cache(1, 32)
    with pytest.raises(ValueError, match="T=17 steps, more than config.max_len=16"):
        mixer.init(jax.random.PRNGKey(0), jnp.zeros((1, 17, 8)))
    with pytest.raises(ValueError, match="implementation='chunked'"):
        mixers.build("hyena", d_model=8, implementation="chunked")
