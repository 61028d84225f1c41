"""Attention mixer: GQA/MQA head mapping, windows, softcap, q/k/v convolutions, cache size, option checks."""

import jax
import jax.numpy as jnp
import pytest

from effarch import mixers
from effarch.testing import assert_relative_close

D = 16
X = jax.random.normal(jax.random.PRNGKey(0), (2, 10, D))


def _apply(mixer, params, x=X):
    return jax.jit(mixer.apply)(params, x)[0]


def test_mqa_equals_mha_with_shared_key_value_heads():
    mqa = mixers.build("attention", d_model=D, num_heads=4, num_kv_heads=1)
    mha = mixers.build("attention", d_model=D, num_heads=4)
    params = mqa.init(jax.random.PRNGKey(1), X)
    tiled = jax.tree.map(lambda x: x, params)
    for name in ("k_proj", "v_proj"):
        tiled["params"][name]["kernel"] = jnp.tile(params["params"][name]["kernel"], (1, 4))  # [D, 4 * Dh]
    assert_relative_close(_apply(mqa, params), _apply(mha, tiled), name="MQA vs tiled MHA")


def test_window_at_least_the_sequence_is_global_attention():
    local = mixers.build("attention", d_model=D, num_heads=2, window=10)
    full = mixers.build("attention", d_model=D, num_heads=2)
    params = full.init(jax.random.PRNGKey(1), X)
    assert_relative_close(_apply(local, params), _apply(full, params), name="window=T")
    narrow = mixers.build("attention", d_model=D, num_heads=2, window=3)
    assert float(jnp.max(jnp.abs(_apply(narrow, params) - _apply(full, params)))) > 1e-3


def test_large_softcap_is_no_softcap():
    capped = mixers.build("attention", d_model=D, num_heads=2, softcap=1e6)
    plain = mixers.build("attention", d_model=D, num_heads=2)
    params = plain.init(jax.random.PRNGKey(1), X)
    assert_relative_close(_apply(capped, params), _apply(plain, params), name="softcap")


def test_out_bias_is_added_to_the_output():
    biased = mixers.build("attention", d_model=D, num_heads=2, out_bias=True)
    plain = mixers.build("attention", d_model=D, num_heads=2)
    params = biased.init(jax.random.PRNGKey(1), X)
    bias = jax.random.normal(jax.random.PRNGKey(2), (D,))
    params["params"]["o_proj"]["bias"] = bias
    without = {"params": {**params["params"], "o_proj": {"kernel": params["params"]["o_proj"]["kernel"]}}}
    assert_relative_close(_apply(biased, params), _apply(plain, without) + bias, name="out_bias")


def test_output_gate_scales_each_channel_by_a_sigmoid_of_its_projection():
    gated = mixers.build("attention", d_model=D, num_heads=2, output_gate=True)
    plain = mixers.build("attention", d_model=D, num_heads=2)
    params = gated.init(jax.random.PRNGKey(1), X)
    p = params["params"]
    inner = {"params": {**{k: v for k, v in p.items() if k != "g_proj"}, "o_proj": {"kernel": jnp.eye(D)}}}
    heads = _apply(plain, inner)  # the heads' outputs, before o_proj
    expected = (heads * jax.nn.sigmoid(X @ p["g_proj"]["kernel"])) @ p["o_proj"]["kernel"]
    assert_relative_close(_apply(gated, params), expected, name="output gate")


def test_zero_centered_qk_norm_is_a_reparametrisation():
    zero = mixers.build("attention", d_model=D, num_heads=2, qk_norm=True, qk_norm_zero_centered=True,
                        qk_norm_eps=1e-5)
    plain = mixers.build("attention", d_model=D, num_heads=2, qk_norm=True, qk_norm_eps=1e-5)
    params = zero.init(jax.random.PRNGKey(1), X)
    offsets = {n: {"scale": 0.3 * jax.random.normal(jax.random.PRNGKey(i), (8,))}
               for i, n in enumerate(("q_norm", "k_norm"))}
    params = {"params": {**params["params"], **offsets}}
    shifted = {"params": {**params["params"], **{n: {"scale": 1.0 + v["scale"]} for n, v in offsets.items()}}}
    assert_relative_close(_apply(zero, params), _apply(plain, shifted), name="(1 + scale)")


def _with_taps(params, taps):
    """``params`` with every q/k/v convolution's kernel ``[W, width]`` set to ``taps`` (oldest first) per channel."""
    p = dict(params["params"])
    for name in ("conv_q", "conv_k", "conv_v"):
        width = p[name]["kernel"].shape[1]
        p[name] = {"kernel": jnp.tile(jnp.asarray(taps, jnp.float32)[:, None], (1, width))}
    return {"params": p}


def test_qkv_conv_with_identity_taps_is_plain_attention():
    conv = mixers.build("attention", d_model=D, num_heads=4, num_kv_heads=2, qkv_conv_size=3)
    plain = mixers.build("attention", d_model=D, num_heads=4, num_kv_heads=2)
    params = conv.init(jax.random.PRNGKey(1), X)
    assert params["params"]["conv_q"]["kernel"].shape == (3, 16)  # [taps, H * K]
    assert params["params"]["conv_k"]["kernel"].shape == (3, 8)  # [taps, Hkv * K]
    projections = {"params": {k: v for k, v in params["params"].items() if not k.startswith("conv_")}}
    assert_relative_close(_apply(conv, _with_taps(params, [0.0, 0.0, 1.0])), _apply(plain, projections),
                          name="identity taps")


def test_qkv_conv_mixes_each_projection_with_its_predecessors():
    """Taps (1, 0.5, 0.25) on q, k, v: the same as plain attention over x_t + 0.5 x_{t-1} + 0.25 x_{t-2}.

    The projections are linear without bias, so convolving their outputs equals
    projecting the convolved input; the first tokens see zeros before the sequence.
    """
    conv = mixers.build("attention", d_model=D, num_heads=2, qkv_conv_size=3)
    plain = mixers.build("attention", d_model=D, num_heads=2)
    params = conv.init(jax.random.PRNGKey(1), X)
    projections = {"params": {k: v for k, v in params["params"].items() if not k.startswith("conv_")}}
    shifted = lambda n: jnp.pad(X, ((0, 0), (n, 0), (0, 0)))[:, : X.shape[1]]
    mixed = X + 0.5 * shifted(1) + 0.25 * shifted(2)
    assert_relative_close(_apply(conv, _with_taps(params, [0.25, 0.5, 1.0])), _apply(plain, projections, mixed),
                          name="taps (0.25, 0.5, 1) oldest first")


def test_local_attention_cache_is_the_window():
    local = mixers.build("attention", d_model=D, num_heads=4, num_kv_heads=2, window=8)
    cache = local.init_cache(3, 10_000, jnp.bfloat16)
    assert cache.k.shape == (3, 8, 2, 4) and cache.k.dtype == jnp.bfloat16
    assert mixers.build("attention", d_model=D, num_heads=4).init_cache(1, 64).k.shape == (1, 64, 4, 4)


@pytest.mark.parametrize(
    "options,message",
    [({"num_heads": 4, "num_kv_heads": 3}, "num_kv_heads=3 must divide num_heads=4"),
     ({"num_heads": 3}, "num_heads=3 must divide d_model=16"),
     ({"window": 0}, "window=0"),
     ({"softcap": -1.0}, "softcap=-1.0"),
     ({"qkv_conv_size": 0}, "qkv_conv_size=0")],
    ids=["kv_heads", "heads", "window", "softcap", "qkv_conv"])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        mixers.build("attention", d_model=D, **options)


@pytest.mark.parametrize("chunks", [(3, 1), (3, 2), (1, 5)], ids=["prompt3-step1", "prompt3-step2", "prompt1-step5"])
def test_cache_past_max_len_is_a_sliding_window_of_max_len(chunks):
    """A ring of 8 slots, decoded for 23 tokens in one-token steps or larger calls, wraps around.

    The independent reference is a full-sequence call (no cache) of the same weights with window=8.
    """
    prompt, step = chunks
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 23, D))
    full = mixers.build("attention", d_model=D, num_heads=4, num_kv_heads=2, chunk_size=4)
    params = full.init(jax.random.PRNGKey(1), x)
    reference = _apply(mixers.build("attention", d_model=D, num_heads=4, num_kv_heads=2, window=8), params, x)
    cache = full.init_cache(2, 8)
    apply = jax.jit(full.apply)
    outputs, t = [], 0
    while t < x.shape[1]:
        n = prompt if t == 0 else step
        y, cache = apply(params, x[:, t:t + n], cache=cache)
        outputs.append(y)
        t += n
    assert int(cache.position) == 23
    assert_relative_close(jnp.concatenate(outputs, axis=1)[:, :23], reference, name="ring cache vs window=8")
