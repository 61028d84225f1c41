"""RWKV-6 time mixing against the `rwkv` package's RWKV.att_one_v6_0 (BlinkDL's inference code, CPU).

The reference steps one token at a time and includes the block's pre-LayerNorm
and residual: it gets the raw input with a unit LayerNorm, effarch's layer the
normalised input, and the reference's output minus its input is compared.
Random weights, every parameter perturbed, float32.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("rwkv") is None:
    pytest.skip("the rwkv package is not installed (pip install rwkv==0.8.32)", allow_module_level=True)


def _rwkv6_module():
    """A private copy of rwkv.model loaded with RWKV_V7_ON off: with it on, the module's RWKV class
    (which holds the RWKV-6 code) is replaced by the RWKV-7 one."""
    spec = importlib.util.spec_from_file_location("_rwkv_model_v6", importlib.util.find_spec("rwkv.model").origin)
    module = importlib.util.module_from_spec(spec)
    saved = {k: os.environ.get(k) for k in ("RWKV_V7_ON", "RWKV_JIT_ON", "RWKV_CUDA_ON")}
    os.environ.update(RWKV_V7_ON="0", RWKV_JIT_ON="0", RWKV_CUDA_ON="0")
    try:
        spec.loader.exec_module(module)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return module


from effarch import mixers  # noqa: E402
from effarch.mixers.rwkv import RWKV6_MIXES  # noqa: E402
from effarch.testing import assert_relative_close  # noqa: E402

T, D, N = 11, 32, 8
H = D // N


def _perturbed(params, seed):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def test_rwkv6_time_mixing_matches_the_reference():
    layer = mixers.build("rwkv6", d_model=D, head_size=N, mix_lora=4, decay_lora=8, chunk_size=4,
                         implementation="chunked")
    x = np.asarray(jax.random.normal(jax.random.key(0), (T, D)), np.float32)
    normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)  # F.layer_norm
    params = _perturbed(layer.init(jax.random.key(1), jnp.asarray(normed)[None]), 2)
    y, _ = layer.apply(params, jnp.asarray(normed)[None])

    p = params["params"]
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32).copy())  # noqa: E731
    empty = torch.empty(0)
    maa = p["maa"]
    args = (
        torch.ones(D), torch.zeros(D),  # the block's LayerNorm: unit (the input is normalised above)
        t(p["ln_x"]["scale"]).flatten(), t(p["ln_x"]["bias"]).flatten(),
        t(p["maa_x"]), *(t(maa[RWKV6_MIXES.index(name)]) for name in ("w", "k", "v", "r", "g")),
        t(p["maa_lora_a"]["kernel"]),
        torch.stack([t(p[f"maa_lora_b_{name}"]["kernel"]) for name in ("w", "k", "v", "r", "g")]),
        t(p["decay_lora_a"]["kernel"]), t(p["decay_lora_b"]["kernel"]),
        t(p["time_decay"]).reshape(H, N, 1), t(p["time_faaaa"]).reshape(H, N, 1),
        t(p["key"]["kernel"]), t(p["value"]["kernel"]), t(p["receptance"]["kernel"]), t(p["gate"]["kernel"]),
        t(p["output"]["kernel"]),
        *([empty] * 20),  # the int8 quantisation scales, unused for float weights
    )
    reference = _rwkv6_module()
    shift, state = torch.zeros(D), torch.zeros(H, N, N)
    outputs = []
    with torch.no_grad():
        for step in range(T):
            row = torch.from_numpy(x[step].copy())
            out, shift, state = reference.RWKV.att_one_v6_0(None, row, shift, state, *args)
            outputs.append((out - row).numpy())
    assert_relative_close(y[0], np.stack(outputs), name="rwkv6 time mixing")

    cache = layer.init_cache(1, T)
    for step in range(T):
        _, cache = layer.apply(params, jnp.asarray(normed)[None, step:step + 1], cache)
    assert_relative_close(cache.state[0], state.numpy(), name="decoded final state")
