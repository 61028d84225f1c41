"""Every op against an independent reference: the paper's recurrence as a float64 numpy loop.

The other op tests compare an op's forms with each other (the recurrent form
is their truth); here nothing of the op is reused. Each reference below is
the per-step recurrence written from the paper, in float64 numpy, segments
and initial state included. Values of every XLA form and of ``"auto"`` are
compared with it; gradients are checked by central finite differences of the
numpy loop along a random direction per input (``<grad, u>`` against
``(L(x + eps u) - L(x - eps u)) / 2 eps``), the initial state included.

Small awkward shapes (T = 13, K = 5, V = 3, chunks of 4) keep this in the
default tier. The Pallas forms are checked against their references in
tests/pallas_kernels/.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch import ops
from effarch.mixers import xlstm
from effarch.ops.selective_scan import selective_scan_chunked
from effarch.testing import assert_relative_close

B, T, H, K, V = 2, 13, 2, 5, 3
CHUNK = 4
SPLIT = 6  # row 0 packs two sequences: steps [0, SPLIT) and [SPLIT, T)
SEGMENT_IDS = np.array([[3] * SPLIT + [8] * (T - SPLIT), [1] * T])
EPS = 1e-5  # finite-difference step (float64)


def _starts(segment_ids, batch, time):
    """``[B,T]`` bool: the state restarts from zero before this step."""
    if segment_ids is None:
        return np.zeros((batch, time), bool)
    ids = np.asarray(segment_ids)
    return np.concatenate([np.zeros((batch, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softplus(x):
    return np.log1p(np.exp(x))


# ---------------------------------------------------------------------------
# The references, step by step in float64.
# ---------------------------------------------------------------------------


def linear_scan_np(x, a, initial_state, segment_ids=None):
    """``h_t = a_t h_{t-1} + x_t`` (RG-LRU / LRU / HGRN core)."""
    batch, time, _ = x.shape
    starts = _starts(segment_ids, batch, time)
    h, out = initial_state.copy(), np.zeros_like(x)
    for t in range(time):
        h = np.where(starts[:, t, None], 0.0, h)
        h = a[:, t] * h + x[:, t]
        out[:, t] = h
    return out, h


def selective_scan_np(x, dt, A, B_, C, D, z, dt_bias, initial_state, segment_ids=None):
    """Mamba-1 (Gu & Dao 2023, Algorithm 2); channel d reads group d // (D / G)."""
    batch, time, channels = x.shape
    groups = B_.shape[2]
    group = np.arange(channels) // (channels // groups)  # [D]
    starts = _starts(segment_ids, batch, time)
    h, y = initial_state.copy(), np.zeros_like(x)  # h [B,D,N]
    for t in range(time):
        delta = _softplus(dt[:, t] + dt_bias)  # [B,D]
        h = np.where(starts[:, t, None, None], 0.0, h)
        h = np.exp(delta[..., None] * A) * h + (delta * x[:, t])[..., None] * B_[:, t][:, group]
        y[:, t] = np.sum(h * C[:, t][:, group], axis=-1) + D * x[:, t]
    return y * z * _sigmoid(z), h


def linear_attention_np(q, k, v, log_decay, scale, initial_state, segment_ids=None):
    """``S_t = diag(a_t) S_{t-1} + k_t v_t^T``, ``o_t = scale S_t^T q_t`` (GLA / SSD / RetNet)."""
    batch, time = q.shape[:2]
    starts = _starts(segment_ids, batch, time)
    S, o = initial_state.copy(), np.zeros(v.shape)  # S [B,H,K,V]
    for t in range(time):
        S = np.where(starts[:, t, None, None, None], 0.0, S)
        if log_decay is not None:
            g = log_decay if log_decay.ndim == 1 else log_decay[:, t]  # [H], [B,H] or [B,H,K]
            a = np.exp(g)
            a = a[..., None, None] if a.ndim < 3 else a[..., None]
            S = a * S
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = scale * np.einsum("bhk,bhkv->bhv", q[:, t], S)
    return o, S


def delta_rule_np(q, k, v, beta, log_decay, scale, initial_state, segment_ids=None):
    """``S_t = g_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` (DeltaNet, Gated DeltaNet)."""
    batch, time, _, key_dim = q.shape
    starts = _starts(segment_ids, batch, time)
    S, o = initial_state.copy(), np.zeros(v.shape)
    eye = np.eye(key_dim)
    for t in range(time):
        S = np.where(starts[:, t, None, None, None], 0.0, S)
        k_t, b_t = k[:, t], beta[:, t, :, None, None]
        gate = 1.0 if log_decay is None else np.exp(log_decay[:, t])[..., None, None]
        S = gate * ((eye - b_t * k_t[..., :, None] * k_t[..., None, :]) @ S)
        S = S + b_t * k_t[..., :, None] * v[:, t, :, None, :]
        o[:, t] = scale * np.einsum("bhk,bhkv->bhv", q[:, t], S)
    return o, S


def generalized_delta_rule_np(q, k, v, a, b, log_decay, scale, initial_state, segment_ids=None):
    """``S_t = (diag(w_t) + a_t b_t^T) S_{t-1} + k_t v_t^T`` (RWKV-7)."""
    batch, time = q.shape[:2]
    starts = _starts(segment_ids, batch, time)
    S, o = initial_state.copy(), np.zeros(v.shape)
    for t in range(time):
        S = np.where(starts[:, t, None, None, None], 0.0, S)
        transition = (np.exp(log_decay[:, t])[..., :, None] * np.eye(q.shape[-1])
                      + a[:, t, :, :, None] * b[:, t, :, None, :])  # [B,H,K,K]
        S = transition @ S + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = scale * np.einsum("bhk,bhkv->bhv", q[:, t], S)
    return o, S


def mlstm_np(q, k, v, i_pre, f_pre, C0, n0):
    """xLSTM's mLSTM (Beck et al. 2024, section 2.3), unstabilised: ``h = C^T q / max(|n^T q|, 1)``."""
    C, n, h = C0.copy(), n0.copy(), np.zeros(v.shape)
    for t in range(q.shape[1]):
        f, i = _sigmoid(f_pre[:, t]), np.exp(i_pre[:, t])  # [B,H]
        C = f[..., None, None] * C + i[..., None, None] * k[:, t, :, :, None] * v[:, t, :, None, :]
        n = f[..., None] * n + i[..., None] * k[:, t]
        q_t = q[:, t] / np.sqrt(q.shape[-1])
        den = np.maximum(np.abs(np.einsum("bhk,bhk->bh", n, q_t)), 1.0)
        h[:, t] = np.einsum("bhkv,bhk->bhv", C, q_t) / den[..., None]
    return h, C, n


# ---------------------------------------------------------------------------
# Inputs, and the check shared by every op.
# ---------------------------------------------------------------------------


def _draw(seed, shapes, transforms=None):
    """float64 numpy arrays of the given shapes, standard normal, then transformed."""
    rng = np.random.default_rng(seed)
    arrays = {name: rng.standard_normal(shape) for name, shape in shapes.items()}
    for name, transform in (transforms or {}).items():
        if name in arrays:
            arrays[name] = transform(arrays[name])
    return arrays


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _projection(outputs, seed=99):
    """Fixed random weights for a scalar loss ``sum_i <w_i, out_i>`` of every output."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(np.shape(o)) for o in outputs]


def check_against_reference(jax_fn, numpy_fn, inputs, *, grad_names, name, seed=0,
                            check_grads=True):
    """Values of ``jax_fn`` against ``numpy_fn``; gradients by finite differences.

    Args:
      jax_fn: ``(**float32 inputs) -> tuple of outputs``, jittable.
      numpy_fn: ``(**float64 inputs) -> tuple of outputs``.
      inputs: float64 numpy arrays by name (None for an absent input).
      grad_names: the inputs whose gradients are checked.
    """
    outputs_ref = numpy_fn(**inputs)
    as_f32 = {n: None if x is None else jnp.asarray(x, jnp.float32) for n, x in inputs.items()}
    if not check_grads:
        outputs = jax.jit(jax_fn)(**as_f32)
        assert_relative_close(tuple(outputs), tuple(outputs_ref), name=f"{name} values")
        return
    weights = _projection(outputs_ref)

    def loss_np(arrays):
        return sum(np.sum(w * o) for w, o in zip(weights, numpy_fn(**arrays)))

    def loss_jax(differentiable, rest):
        outs = jax_fn(**differentiable, **rest)
        loss = sum(jnp.sum(jnp.asarray(w, jnp.float32) * o.astype(jnp.float32))
                   for w, o in zip(weights, outs))
        return loss, outs

    differentiable = {n: as_f32[n] for n in grad_names}
    rest = {n: x for n, x in as_f32.items() if n not in grad_names}
    # One compilation for values and gradients (under jax.grad "auto" runs its training form).
    grads, outputs = jax.jit(jax.grad(loss_jax, has_aux=True))(differentiable, rest)
    assert_relative_close(tuple(outputs), tuple(outputs_ref), name=f"{name} values")
    rng = np.random.default_rng(seed + 1)
    for n in grad_names:
        u = rng.standard_normal(inputs[n].shape)
        plus, minus = dict(inputs), dict(inputs)
        plus[n], minus[n] = inputs[n] + EPS * u, inputs[n] - EPS * u
        expected = (loss_np(plus) - loss_np(minus)) / (2 * EPS)
        got = float(np.sum(np.asarray(grads[n], np.float64) * u))
        scale = np.linalg.norm(np.asarray(grads[n], np.float64)) * np.linalg.norm(u)
        assert abs(got - expected) <= 2e-3 * abs(expected) + 1e-5 * scale, (
            f"{name}: d/d{n} along a random direction: {got:.6g} by autodiff, "
            f"{expected:.6g} by finite differences of the numpy recurrence")


# The XLA forms of every op, values and gradients; "auto" (what a user gets)
# forward only: under jax.grad it is its training form exactly
# (tests/ops/test_auto_policy.py), whose gradients are checked here.
FORMS = ("recurrent", "chunked", "auto")


def _grads_checked(implementation: str) -> bool:
    return implementation != "auto"


# ---------------------------------------------------------------------------
# linear_scan, selective_scan
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", FORMS)
def test_linear_scan(implementation):
    inputs = _draw(1, {"x": (B, T, 7), "a": (B, T, 7), "initial_state": (B, 7)},
                   {"a": lambda a: _sigmoid(a + 1.0)})
    ids = SEGMENT_IDS  # row 0 packs two sequences, row 1 is one

    def fn(x, a, initial_state):
        return ops.linear_scan(x, a, initial_state=initial_state, return_final_state=True,
                               segment_ids=ids, implementation=implementation)

    check_against_reference(fn, functools.partial(linear_scan_np, segment_ids=ids), inputs,
                            grad_names=("x", "a", "initial_state"),
                            check_grads=_grads_checked(implementation),
                            name=f"linear_scan {implementation}")


D_CHANNELS, N_STATE, GROUPS = 6, 3, 3


@pytest.mark.parametrize("implementation", FORMS)
def test_selective_scan(implementation):
    d, n, g = D_CHANNELS, N_STATE, GROUPS
    inputs = _draw(2, {"x": (B, T, d), "dt": (B, T, d), "A": (d, n), "B_": (B, T, g, n),
                       "C": (B, T, g, n), "D": (d,), "z": (B, T, d), "dt_bias": (d,),
                       "initial_state": (B, d, n)},
                   {"A": lambda a: -np.exp(a), "dt": lambda x: x - 1.0})
    ids = SEGMENT_IDS

    def fn(x, dt, A, B_, C, D, z, dt_bias, initial_state):
        options = dict(dt_bias=dt_bias, initial_state=initial_state, segment_ids=ids)
        if implementation == "chunked":  # several chunks (the op's own chunk is 64 steps)
            return selective_scan_chunked(x, dt, A, B_, C, D, z, **options,
                                                         chunk_size=CHUNK)
        return ops.selective_scan(x, dt, A, B_, C, D, z, **options, return_final_state=True,
                                  implementation=implementation)

    check_against_reference(fn, functools.partial(selective_scan_np, segment_ids=ids), inputs,
                            grad_names=tuple(inputs), check_grads=_grads_checked(implementation),
                            name=f"selective_scan {implementation}")


# ---------------------------------------------------------------------------
# linear_attention: every decay form
# ---------------------------------------------------------------------------

DECAY_SHAPES = {"none": None, "head": (H,), "scalar": (B, T, H), "channel": (B, T, H, K)}


@pytest.mark.parametrize("implementation", ("recurrent", "quadratic", "chunked", "auto"))
@pytest.mark.parametrize("decay", list(DECAY_SHAPES))
def test_linear_attention(implementation, decay):
    shapes = {"q": (B, T, H, K), "k": (B, T, H, K), "v": (B, T, H, V),
              "initial_state": (B, H, K, V)}
    if DECAY_SHAPES[decay] is not None:
        shapes["log_decay"] = DECAY_SHAPES[decay]
    inputs = _draw(3, shapes, {"log_decay": lambda g: -_softplus(g)})
    inputs.setdefault("log_decay", None)
    ids = SEGMENT_IDS if decay == "scalar" else None  # packed once, with the common decay

    def fn(q, k, v, log_decay, initial_state):
        return ops.linear_attention(q, k, v, log_decay, scale=0.7, initial_state=initial_state,
                                    return_final_state=True, segment_ids=ids,
                                    chunk_size=CHUNK, implementation=implementation)

    # Gradients of the training form (chunked) under every decay, and of each
    # form under the common scalar decay; values for all.
    check_grads = implementation == "chunked" or (decay == "scalar" and implementation != "auto")
    grad_names = tuple(n for n in inputs if inputs[n] is not None)
    check_against_reference(fn, functools.partial(linear_attention_np, scale=0.7, segment_ids=ids),
                            inputs, grad_names=grad_names, check_grads=check_grads,
                            name=f"linear_attention {implementation} {decay}")


# ---------------------------------------------------------------------------
# delta_rule (DeltaNet, Gated DeltaNet), generalized_delta_rule (RWKV-7)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", FORMS)
@pytest.mark.parametrize("variant", ["deltanet", "gated_deltanet"])
def test_delta_rule(implementation, variant):
    shapes = {"q": (B, T, H, K), "k": (B, T, H, K), "v": (B, T, H, V), "beta": (B, T, H),
              "initial_state": (B, H, K, V)}
    if variant == "gated_deltanet":
        shapes["log_decay"] = (B, T, H)
    inputs = _draw(4, shapes, {"k": _unit, "beta": _sigmoid, "log_decay": lambda g: -_softplus(g)})
    inputs.setdefault("log_decay", None)
    ids = SEGMENT_IDS if variant == "gated_deltanet" else None

    def fn(q, k, v, beta, log_decay, initial_state):
        return ops.delta_rule(q, k, v, beta, log_decay, scale=0.7, initial_state=initial_state,
                              return_final_state=True, segment_ids=ids, chunk_size=CHUNK,
                              implementation=implementation)

    # k is differentiated as given (the op does not normalise it).
    grad_names = tuple(n for n in inputs if inputs[n] is not None)
    check_against_reference(fn, functools.partial(delta_rule_np, scale=0.7, segment_ids=ids),
                            inputs, grad_names=grad_names, check_grads=_grads_checked(implementation),
                            name=f"{variant} {implementation}")


@pytest.mark.parametrize("implementation", FORMS)
def test_generalized_delta_rule(implementation):
    inputs = _draw(5, {"q": (B, T, H, K), "k": (B, T, H, K), "v": (B, T, H, V),
                       "a": (B, T, H, K), "b": (B, T, H, K), "log_decay": (B, T, H, K),
                       "initial_state": (B, H, K, V)},
                   {"b": _unit, "log_decay": lambda w: -np.exp(-0.5) * _sigmoid(w),
                    "k": lambda k: 0.5 * k})
    inputs["a"] = -inputs["b"] * _sigmoid(inputs["a"])  # RWKV-7: a = -kappa * iclr, b = kappa
    ids = SEGMENT_IDS

    def fn(q, k, v, a, b, log_decay, initial_state):
        return ops.generalized_delta_rule(q, k, v, a, b, log_decay, scale=1.0,
                                          initial_state=initial_state, return_final_state=True,
                                          segment_ids=ids, chunk_size=CHUNK,
                                          implementation=implementation)

    check_against_reference(
        fn, functools.partial(generalized_delta_rule_np, scale=1.0, segment_ids=ids), inputs,
        grad_names=tuple(inputs), check_grads=_grads_checked(implementation),
        name=f"generalized_delta_rule {implementation}")


# ---------------------------------------------------------------------------
# mLSTM: the stabilised cell (built on linear_attention) against the unstabilised paper cell
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["recurrent", "chunked", "auto"])
def test_mlstm_cell(implementation):
    inputs = _draw(6, {"q": (B, T, H, K), "k": (B, T, H, K), "v": (B, T, H, V),
                       "i_pre": (B, T, H), "f_pre": (B, T, H), "C0": (B, H, K, V), "n0": (B, H, K)},
                   {"f_pre": lambda f: 2.0 * f + 1.0})

    def fn(q, k, v, i_pre, f_pre, C0, n0):
        state = xlstm.MLSTMState(C=C0, n=n0, m=jnp.zeros((B, H)))  # m = 0: C̃ = C
        h, final = xlstm.mlstm_cell(q, k, v, i_pre, f_pre, state=state, chunk_size=CHUNK,
                                    implementation=implementation)
        unscale = jnp.exp(final.m)  # back from the stabilised frame: C = C̃ e^m
        return h, final.C * unscale[..., None, None], final.n * unscale[..., None]

    # Gradients through the chunked form, which training runs (mlstm's own
    # forms are compared with each other in tests/mixers/test_mixers_common.py).
    check_against_reference(fn, mlstm_np, inputs, grad_names=tuple(inputs),
                            check_grads=implementation == "chunked",
                            name=f"mlstm {implementation}")
