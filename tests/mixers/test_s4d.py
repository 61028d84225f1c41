"""S4D: the FFT-convolution form equals the recurrent form; the scan equals a complex reference."""

import jax
import jax.numpy as jnp
import pytest

from effarch import mixers
from effarch.mixers.s4d import diagonal_ssm_reference, diagonal_ssm_scan, discretize, ssm_kernel
from effarch.testing import assert_relative_close


def _system(d=5, m=3, seed=0):
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    log_dt = jax.random.uniform(k1, (d,), minval=jnp.log(1e-2), maxval=jnp.log(0.5))
    a_real = -jnp.exp(jax.random.normal(k2, (d, m)) * 0.5 - 1.0)
    a_imag = jnp.pi * jnp.arange(m) * jnp.ones((d, 1)) + jax.random.normal(k3, (d, m))
    c = jax.random.normal(k4, (d, m)) + 1j * jax.random.normal(k1, (d, m))
    lam, b = discretize(log_dt, a_real, a_imag)
    return lam, b, c.astype(jnp.complex64)


@pytest.mark.parametrize("t", [1, 63], ids=lambda t: f"T{t}")
def test_rotated_scan_matches_complex_reference(t):
    lam, b, c = _system()
    u = jax.random.normal(jax.random.PRNGKey(1), (2, t, 5))
    h0 = (jax.random.normal(jax.random.PRNGKey(2), (2, 5, 3))
          + 1j * jax.random.normal(jax.random.PRNGKey(3), (2, 5, 3))).astype(jnp.complex64)
    y, h = jax.jit(lambda u: diagonal_ssm_scan(u, lam, b, c, initial_state=h0, implementation="recurrent"))(u)
    y_ref, h_ref = diagonal_ssm_reference(u, lam, b, c, initial_state=h0)
    assert_relative_close(y, y_ref, name="y")
    assert_relative_close(jnp.stack([h.real, h.imag]), jnp.stack([h_ref.real, h_ref.imag]), name="final state")
    g = jax.grad(lambda u: jnp.sum(jnp.sin(diagonal_ssm_scan(u, lam, b, c, initial_state=h0)[0])))(u)
    g_ref = jax.grad(lambda u: jnp.sum(jnp.sin(diagonal_ssm_reference(u, lam, b, c, initial_state=h0)[0])))(u)
    assert_relative_close(g, g_ref, name="grad u")


def test_kernel_is_the_impulse_response():
    lam, b, c = _system()
    impulse = jnp.zeros((1, 40, 5)).at[:, 0].set(1.0)
    response, _ = diagonal_ssm_reference(impulse, lam, b, c)
    assert_relative_close(ssm_kernel(lam, b, c, 40), response[0], name="kernel")


@pytest.mark.parametrize("init", ["lin", "real"])
def test_fft_form_equals_recurrent_form_through_the_mixer(init):
    fft = mixers.build("s4d", d_model=16, d_state=8, init=init, mode="fft")
    rec = mixers.build("s4d", d_model=16, d_state=8, init=init, mode="recurrent")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 50, 16))
    params = fft.init(jax.random.PRNGKey(1), x)

    def loss(mixer, p):
        y, _ = mixer.apply(p, x)
        return jnp.sum(jnp.sin(y)), y

    (_, y_fft), g_fft = jax.jit(jax.value_and_grad(lambda p: loss(fft, p), has_aux=True))(params)
    (_, y_rec), g_rec = jax.jit(jax.value_and_grad(lambda p: loss(rec, p), has_aux=True))(params)
    assert_relative_close(y_fft, y_rec, name="output")
    assert_relative_close(g_fft, g_rec, name="param grads")


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="d_state=7"):
        mixers.build("s4d", d_model=8, d_state=7)
    with pytest.raises(ValueError, match="init='complex'"):
        mixers.build("s4d", d_model=8, init="complex")
