"""mLSTM specifics: the max-stabilised cell equals the paper's unstabilised one.

The generic interface checks are in test_mixers_common.py. Here the cell is
compared, values and gradients, with the unstabilised recurrence of xLSTM
(section 2.3) where that is finite, and with a float64 evaluation where the
unstabilised form overflows in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.mixers import xlstm
from effarch.testing import assert_relative_close

B, T, H, K, V = 2, 9, 2, 5, 3
CHUNK = 4
SEGMENTS = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1], [0] * T])


def _inputs(seed=0, input_gate_shift=0.0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(keys[0], (B, T, H, K))
    k = jax.random.normal(keys[1], (B, T, H, K))
    v = jax.random.normal(keys[2], (B, T, H, V))
    i_pre = jax.random.normal(keys[3], (B, T, H)) + input_gate_shift
    f_pre = 2.0 * jax.random.normal(keys[4], (B, T, H)) + 1.0
    return q, k, v, i_pre, f_pre


def unstabilised(q, k, v, i_pre, f_pre, C0, n0, segment_ids=None, xp=jnp):
    """xLSTM's mLSTM (section 2.3) step by step, no stabiliser (overflows for large input gates)."""
    ids = np.zeros((B, T), int) if segment_ids is None else np.asarray(segment_ids)
    C, n, outs = C0, n0, []
    for t in range(T):
        if t > 0:
            keep = (ids[:, t] == ids[:, t - 1]).astype(np.float64)
            C, n = C * keep[:, None, None, None], n * keep[:, None, None]
        f = 1.0 / (1.0 + xp.exp(-f_pre[:, t]))
        i = xp.exp(i_pre[:, t])
        C = f[..., None, None] * C + i[..., None, None] * k[:, t, :, :, None] * v[:, t, :, None, :]
        n = f[..., None] * n + i[..., None] * k[:, t]
        qt = q[:, t] / np.sqrt(K)
        num = xp.einsum("bhkv,bhk->bhv", C, qt)
        den = xp.maximum(xp.abs(xp.einsum("bhk,bhk->bh", n, qt)), 1.0)
        outs.append(num / den[..., None])
    return xp.stack(outs, axis=1), C, n


def test_stabilised_cell_equals_unstabilised_where_finite():
    """Chunked form, several chunks, from a non-zero state (the other forms: test_mixers_common)."""
    q, k, v, i_pre, f_pre = _inputs()
    C0 = jax.random.normal(jax.random.PRNGKey(7), (B, H, K, V))
    n0 = jax.random.normal(jax.random.PRNGKey(8), (B, H, K))
    state = xlstm.MLSTMState(C=C0, n=n0, m=jnp.zeros((B, H)))  # m = 0: C̃ = C

    def ours(q, k, v, i_pre, f_pre, C0, n0):
        h, final = xlstm.mlstm_cell(q, k, v, i_pre, f_pre, state=xlstm.MLSTMState(C0, n0, state.m),
                                    chunk_size=CHUNK, implementation="chunked")
        scale = jnp.exp(final.m)  # back from the stabilised frame: C = C̃ e^m
        return h, final.C * scale[..., None, None], final.n * scale[..., None]

    def reference(*args):
        return unstabilised(*args)

    args = (q, k, v, i_pre, f_pre, C0, n0)
    assert_relative_close(ours(*args), reference(*args), name="mlstm (h, C, n)")
    probe = jnp.cos(jnp.arange(B * T * H * V, dtype=jnp.float32)).reshape(B, T, H, V)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a)[0] * probe), tuple(range(7))))(*args)
    grads_ref = jax.jit(jax.grad(lambda *a: jnp.sum(reference(*a)[0] * probe), tuple(range(7))))(*args)
    assert_relative_close(grads, grads_ref, name="mlstm grads")


def test_packed_segments_restart_memory_and_stabiliser():
    q, k, v, i_pre, f_pre = _inputs(1)
    h, _ = xlstm.mlstm_cell(q, k, v, i_pre, f_pre, segment_ids=SEGMENTS, chunk_size=CHUNK)
    zeros_c, zeros_n = jnp.zeros((B, H, K, V)), jnp.zeros((B, H, K))
    h_ref, _, _ = unstabilised(q, k, v, i_pre, f_pre, zeros_c, zeros_n, SEGMENTS)
    assert_relative_close(h, h_ref, name="mlstm packed")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_large_input_gates_stay_finite_and_exact(dtype):
    """exp(ĩ) with ĩ ~ 100 overflows float32; the stabilised cell matches a float64 evaluation.

    The reference sees the same (rounded) q, k, v as the cell: the ratio
    ``C^T q / n^T q`` is ill-conditioned, so it would amplify input rounding.
    """
    q, k, v, i_pre, f_pre = _inputs(2, input_gate_shift=100.0)
    assert not np.all(np.isfinite(np.asarray(unstabilised(q, k, v, i_pre, f_pre, 0.0, 0.0)[0])))
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    h, _ = xlstm.mlstm_cell(q, k, v, i_pre, f_pre, chunk_size=CHUNK)
    as64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    h_ref, _, _ = unstabilised(*map(as64, (q, k, v, i_pre, f_pre)), np.zeros((B, H, K, V)),
                               np.zeros((B, H, K)), xp=np)
    assert_relative_close(h, h_ref, dtype, name="mlstm large gates")


def test_stabiliser_is_the_running_max_recurrence():
    _, _, _, i_pre, f_pre = _inputs(3)
    log_f = jax.nn.log_sigmoid(f_pre)
    m0 = jnp.array([[0.5, -2.0], [3.0, 0.0]])
    m = xlstm.stabilizer(log_f, i_pre, m0, SEGMENTS)
    prev, expected = np.asarray(m0), []
    starts = np.asarray(SEGMENTS[:, 1:] != SEGMENTS[:, :-1])
    for t in range(T):
        if t > 0:
            prev = np.where(starts[:, t - 1, None], xlstm.M_INIT, prev)
        prev = np.maximum(np.asarray(log_f[:, t]) + prev, np.asarray(i_pre[:, t]))
        expected.append(prev)
    np.testing.assert_allclose(np.asarray(m), np.stack(expected, axis=1), rtol=1e-6, atol=1e-6)
