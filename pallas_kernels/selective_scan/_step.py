"""One step of the selective scan and of its adjoint, written once for both kernels.

The GPU and TPU kernels call these on tiles in their own layout: a state tile
holds ``[channels, N]`` (GPU, ``n_axis=1``) or ``[N, channels]`` (TPU,
``n_axis=0``); channel vectors (x, delta, ...) are kept 2-D with size 1 on the
N axis, so they broadcast against it. Everything is float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SOFTPLUS_LINEAR = 20.0  # softplus(v) == v to float32 precision above this


def step_size(dt, dt_bias, dt_softplus: bool):
    """``(delta, d delta / d dt)`` for float32 dt and dt_bias of one step."""
    v = dt + dt_bias
    if not dt_softplus:
        return v, jnp.ones_like(v)
    exp_v = jnp.exp(jnp.minimum(v, SOFTPLUS_LINEAR))
    delta = jnp.where(v > SOFTPLUS_LINEAR, v, jnp.log1p(exp_v))
    return delta, exp_v / (1.0 + exp_v)  # sigmoid(v)


def scan_step(h, x, delta, keep, A, B, C, *, n_axis: int):
    """``h_t = keep * exp(delta A) h_{t-1} + delta x B``; returns ``(h_t, C . h_t)``.

    keep is 0 where a segment starts (the state restarts from zero), else 1.
    """
    a = jnp.exp(delta * A) * keep
    h = a * h + (delta * x) * B
    return h, jnp.sum(C * h, axis=n_axis, keepdims=True)


def gated_output(y_ssm, x, D, z):
    """``(y_ssm + D x) * silu(z)`` (no gate when z is None)."""
    y = y_ssm + D * x
    return y if z is None else y * (z * jax.nn.sigmoid(z))


def adjoint_step(g, h, h_prev, x, dt, dt_bias, keep, A, B, C, D, z, dy, *,
                 dt_softplus: bool, n_axis: int):
    """Reverse-time step: from ``g = dL/dh_t`` (future terms only) to ``dL/dh_{t-1}``.

    With ``a = keep exp(delta A)``, ``h_t = a h_{t-1} + delta x B``,
    ``y = (C . h_t + D x) silu(z)``:

        g      += C dy_ssm                      (dy_ssm = dy silu(z))
        dx      = D dy_ssm + delta sum_n(g B)
        ddelta  = x sum_n(g B) + sum_n(g h_{t-1} a A)
        dA      = g h_{t-1} a delta, dB = g delta x, dC = dy_ssm h_t  (per channel)
        g_prev  = a g

    Returns:
      ``(g_prev, dict)`` with dx, ddt, dz (channel vectors; dz None without a
      gate), dD (channel vector), and the per-channel tiles dA, dB, dC that
      the kernel sums over batch, time or group members.
    """
    delta, ddelta_ddt = step_size(dt, dt_bias, dt_softplus)
    a = jnp.exp(delta * A) * keep
    y_ssm = jnp.sum(C * h, axis=n_axis, keepdims=True)
    if z is None:
        dy_ssm, dz = dy, None
    else:
        sig = jax.nn.sigmoid(z)
        dy_ssm = dy * z * sig
        dz = dy * (y_ssm + D * x) * sig * (1.0 + z * (1.0 - sig))
    g = g + C * dy_ssm
    g_b = jnp.sum(g * B, axis=n_axis, keepdims=True)
    da_a = g * h_prev * a
    ddelta = x * g_b + jnp.sum(da_a * A, axis=n_axis, keepdims=True)
    grads = dict(
        dx=D * dy_ssm + delta * g_b,
        ddt=ddelta * ddelta_ddt,
        dz=dz,
        dD=dy_ssm * x,
        dA=da_a * delta,
        dB=g * (delta * x),
        dC=h * dy_ssm,
    )
    return a * g, grads
