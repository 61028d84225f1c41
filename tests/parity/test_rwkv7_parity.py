"""RWKV-7 time mixing, two layers with the value residual, against the `rwkv` package's RWKV_x070_TMix_one.

The `rwkv` pip package (BlinkDL's inference code, CPU path) steps one token at a
time; effarch's two layers run the whole sequence (chunked generalised delta rule)
with the first layer handing ``v_first`` to the second. Random weights, every
parameter perturbed (the zero-initialised LoRAs included), float32.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
os.environ.setdefault("RWKV_V7_ON", "1")
os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")
rwkv_model = pytest.importorskip("rwkv.model")

from effarch import mixers  # noqa: E402
from effarch.testing import assert_relative_close  # noqa: E402

T, D, N = 11, 32, 8
H = D // N
RANK = 8


def _layer(index):
    return mixers.build("rwkv7", d_model=D, head_size=N, decay_lora=RANK, iclr_lora=RANK, gate_lora=RANK,
                        value_lora=RANK, value_residual=True, layer_ratio=float(index), num_layers=2,
                        chunk_size=4, implementation="chunked")


def _perturbed(params, seed):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def _reference_args(p, first):
    """The layer's parameters in RWKV_x070_TMix_one's order, as torch tensors."""
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32).copy())  # noqa: E731
    mix = p["x_mix"]
    empty = torch.empty(0)
    values = (empty, empty, empty) if first else (t(p["v0"]), t(p["value_lora_a"]["kernel"]),
                                                  t(p["value_lora_b"]["kernel"]))
    return (*(t(mix[i]) for i in range(6)),
            t(p["w0"]), t(p["decay_lora_a"]["kernel"]), t(p["decay_lora_b"]["kernel"]),
            t(p["a0"]), t(p["iclr_lora_a"]["kernel"]), t(p["iclr_lora_b"]["kernel"]),
            *values,
            t(p["gate_lora_a"]["kernel"]), t(p["gate_lora_b"]["kernel"]),
            t(p["k_k"]), t(p["k_a"]), t(p["r_k"]).flatten(),
            t(p["receptance"]["kernel"]), t(p["key"]["kernel"]), t(p["value"]["kernel"]), t(p["output"]["kernel"]),
            t(p["ln_x"]["scale"]).flatten(), t(p["ln_x"]["bias"]).flatten())


def test_two_rwkv7_layers_with_the_value_residual_match_the_reference():
    x0 = jax.random.normal(jax.random.key(0), (1, T, D))
    x1 = jax.random.normal(jax.random.key(1), (1, T, D))
    first, second = _layer(0), _layer(1)
    p0 = _perturbed(first.init(jax.random.key(2), x0, value_residual=(None,)), 3)
    y0, _, v_first = first.apply(p0, x0, value_residual=(None,))
    p1 = _perturbed(second.init(jax.random.key(4), x1, value_residual=(v_first,)), 5)
    y1, _, _ = second.apply(p1, x1, value_residual=(v_first,))

    args0, args1 = _reference_args(p0["params"], True), _reference_args(p1["params"], False)
    prev0, prev1 = torch.zeros(D), torch.zeros(D)
    state0, state1 = torch.zeros(H, N, N), torch.zeros(H, N, N)
    ref0, ref1 = [], []
    with torch.no_grad():
        for step in range(T):
            a = torch.from_numpy(np.asarray(x0[0, step]).copy())
            b = torch.from_numpy(np.asarray(x1[0, step]).copy())
            out0, prev0, state0, vf = rwkv_model.RWKV_x070_TMix_one(0, H, N, a, prev0, torch.empty(0), state0, *args0)
            out1, prev1, state1, _ = rwkv_model.RWKV_x070_TMix_one(1, H, N, b, prev1, vf, state1, *args1)
            ref0.append(out0.numpy())
            ref1.append(out1.numpy())
    assert_relative_close(y0[0], np.stack(ref0), name="layer 0 (hands v_first on)")
    assert_relative_close(y1[0], np.stack(ref1), name="layer 1 (mixes v_first in)")

    # Decoding token by token from effarch's caches gives the same last outputs and states.
    cache0, cache1 = first.init_cache(1, T), second.init_cache(1, T)
    for step in range(T):
        s0, cache0, vf_step = first.apply(p0, x0[:, step:step + 1], cache0, value_residual=(None,))
        s1, cache1, _ = second.apply(p1, x1[:, step:step + 1], cache1, value_residual=(vf_step,))
    assert_relative_close(s1[0, 0], ref1[-1], name="decoded last output")
    assert_relative_close(jnp.swapaxes(cache1.state[0], -1, -2), state1.numpy(), name="decoded final state")
