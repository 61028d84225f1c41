"""The LM backbone: shapes and values per pattern, causality, cached decoding,
scanned layers, packed segments, Mixture-of-Depths, config validation."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.layers.mlp import GatedMLP, SwiGLU, swiglu_reference
from effarch.models import LM, LMConfig, stack_layer_params, unstack_layer_params
from effarch.models.lm import layer_lower_bounds
from effarch.models.config import attention_layout
from effarch.testing import assert_relative_close, descent_losses

B, T, PREFIX = 2, 11, 5  # T awkward against the tiny mixers' chunk size 8

LAYOUTS = {
    "A": dict(pattern="A", n_layers=1),
    "M": dict(pattern="M", n_layers=1),
    "MA": dict(pattern="MA", n_layers=2),
    "ratio0.25": dict(attention_ratio=0.25, n_layers=4),
}


def _model(**overrides):
    cfg = LMConfig.preset("tiny", **overrides)
    lm = LM(config=cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (B, T), 0, cfg.vocab_size)
    variables = lm.init(jax.random.PRNGKey(1), tokens)
    return lm, variables, tokens


@pytest.fixture(scope="module", params=list(LAYOUTS), ids=list(LAYOUTS))
def tiny(request):
    lm, variables, tokens = _model(**LAYOUTS[request.param])
    logits, aux, cache = lm.apply(variables, tokens)
    return lm, variables, tokens, logits, aux, cache


def test_forward_shapes(tiny):
    lm, _, _, logits, aux, cache = tiny
    chex.assert_shape(logits, (B, T, lm.config.vocab_size))
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
    assert cache is None
    assert set(aux) == {"aux_loss"} and float(aux["aux_loss"]) == 0.0


def test_prefix_consistency(tiny):
    """Logits of a prefix equal the first positions of the full forward (causality)."""
    lm, variables, tokens, logits, _, _ = tiny
    prefix_logits, _, _ = lm.apply(variables, tokens[:, :PREFIX])
    assert_relative_close(prefix_logits, logits[:, :PREFIX], name="prefix logits")
    changed = tokens.at[:, PREFIX:].set((tokens[:, PREFIX:] + 1) % lm.config.vocab_size)
    changed_logits, _, _ = lm.apply(variables, changed)
    assert_relative_close(changed_logits[:, :PREFIX], logits[:, :PREFIX], name="logits before the change")


def test_cache_decode_matches_full_forward(tiny):
    """Prefill, then one token at a time (and one two-token step), equals one full call."""
    lm, variables, tokens, logits, _, _ = tiny
    cache = lm.init_cache(B, T)
    out, _, cache = lm.apply(variables, tokens[:, :PREFIX], cache=cache)
    pieces = [out]
    steps = [(t, t + 1) for t in range(PREFIX, T - 2)] + [(T - 2, T)]
    for start, stop in steps:
        out, _, cache = lm.apply(variables, tokens[:, start:stop], cache=cache)
        pieces.append(out)
    assert_relative_close(jnp.concatenate(pieces, axis=1), logits, name="decoded logits")


def test_scan_layers_matches_unscanned():
    lm, variables, tokens = _model(pattern="MA", n_layers=4)
    scanned = LM(config=dataclasses.replace(lm.config, scan_layers=True))
    assert scanned.config.period == 2
    stacked = stack_layer_params(variables, scanned.config)
    # The converted tree has exactly the structure and shapes scanned init produces.
    fresh = nn.unbox(jax.eval_shape(lambda: scanned.init(jax.random.PRNGKey(1), tokens)))
    chex.assert_trees_all_equal_shapes_and_dtypes(stacked, fresh)

    logits, _, _ = lm.apply(variables, tokens)
    scanned_logits, _, _ = scanned.apply(stacked, tokens)
    assert_relative_close(scanned_logits, logits, name="scanned logits")
    cache = scanned.init_cache(B, T)
    out, _, cache = scanned.apply(stacked, tokens[:, :PREFIX], cache=cache)
    step, _, _ = scanned.apply(stacked, tokens[:, PREFIX:PREFIX + 1], cache=cache)
    assert_relative_close(jnp.concatenate([out, step], 1), logits[:, :PREFIX + 1], name="scanned decode")
    chex.assert_trees_all_equal(unstack_layer_params(stacked, scanned.config), nn.unbox(variables))


@pytest.mark.slow
def test_scan_layers_gradients_match_unscanned():
    lm, variables, tokens = _model(pattern="MA", n_layers=4)
    scanned = LM(config=dataclasses.replace(lm.config, scan_layers=True))

    def loss(model, v):
        logits = model.apply(v, tokens)[0]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))

    grads = jax.grad(lambda v: loss(lm, v))(nn.unbox(variables))
    scanned_grads = jax.grad(lambda v: loss(scanned, v))(stack_layer_params(variables, scanned.config))
    assert_relative_close(unstack_layer_params(scanned_grads, scanned.config), grads, name="grads")


def test_segment_ids_packing_equals_separate_sequences():
    lm, variables, tokens = _model(pattern="MA", n_layers=2)
    half = PREFIX  # two segments of PREFIX tokens packed into one row
    packed_tokens = tokens[:, : 2 * half]
    segment_ids = jnp.repeat(jnp.arange(2, dtype=jnp.int32)[None], B, 0).repeat(half, axis=1)  # [B, 2*half]
    packed, _, _ = lm.apply(variables, packed_tokens, segment_ids=segment_ids)
    # The same segments as separate sequences, stacked on the batch axis: [2B, half].
    alone, _, _ = lm.apply(variables, jnp.concatenate([packed_tokens[:, :half], packed_tokens[:, half:]], 0))
    assert_relative_close(packed[:, :half], alone[:B], name="first segment")
    assert_relative_close(packed[:, half:], alone[B:], name="second segment")


def test_remat_and_untied_embeddings():
    lm, variables, tokens = _model(pattern="A", n_layers=1, remat=True, tie_embeddings=False)
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["embed"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["unembed"]) == ("embed", "vocab")
    assert tuple(specs["layer_0"]["mlp"]["gate"]["kernel"]) == ("embed", "mlp")
    plain = LM(config=dataclasses.replace(lm.config, remat=False))
    grad = lambda model: jax.grad(lambda v: jnp.sum(model.apply(v, tokens)[0] ** 2))(variables)  # noqa: E731
    assert_relative_close(grad(lm), grad(plain), name="remat grads")


def test_trains_a_few_steps():
    """Loss on one repeated batch falls under plain gradient descent."""
    lm, variables, tokens = _model(pattern="MA", n_layers=2)
    params = nn.unbox(variables)

    losses = descent_losses(lm, params, tokens)
    assert losses[-1] < losses[0] - 0.1, losses


# --- configuration ---------------------------------------------------------------


@pytest.mark.parametrize(
    "n_layers,ratio,expected",
    [(8, 0.25, "MMMAMMMA"), (4, 0.5, "MAMA"), (3, 0.0, "MMM"), (3, 1.0, "AAA"), (6, 0.34, "MMAMMA")],
    ids=["8x0.25", "4x0.5", "none", "all", "6x0.34"],
)
def test_attention_layout(n_layers, ratio, expected):
    assert attention_layout(n_layers, ratio) == expected


def test_pattern_tiles_and_layer_options():
    cfg = LMConfig.preset("tiny", pattern="MA", n_layers=4, layer_options={3: {"num_heads": 2}})
    assert cfg.layer_pattern == "MAMA"
    assert cfg.layer_specs[3].mixer.num_heads == 2 and cfg.layer_specs[1].mixer.num_heads == 4
    assert cfg.period == 4  # the override breaks the period-2 repetition
    assert cfg.mixer_entry("A")[0] == "attention"
    assert hash(cfg) == hash(LMConfig.preset("tiny", pattern="MA", n_layers=4, layer_options={3: {"num_heads": 2}}))
    assert LMConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(mixers={"M": ("no_such_mixer", {})}), r"unknown mixer 'no_such_mixer'; valid: .*attention.*mamba2"),
        (dict(pattern="MAM", n_layers=4), r"pattern='MAM' has length 3, which does not divide n_layers=4"),
        (dict(pattern="MA", attention_ratio=0.5), "set exactly one of them"),
        (dict(pattern="MZ"), r"pattern letter 'Z' has no mixer; known letters"),
        (dict(mixers={"A": ("attention", {"heads": 2})}), r"no option\(s\) \['heads'\]; valid: .*num_heads"),
        (dict(mlp="dense"), r"mlp='dense'; expected one of \('swiglu', 'geglu', 'moe', 'none'\)"),
        (dict(layer_options={5: {}}), r"layer_options has key 5; expected layer indices in \[0, n_layers=2\)"),
        (dict(mod_capacity=1.5), r"mod_capacity=1.5; expected None or a fraction in \(0, 1\]"),
        (dict(mixers={"A": "attention"}), r"mixers\['A'\]='attention'; expected \(mixer name, options dict\)"),
        (dict(mlp="moe", projection="bitlinear"), "use projection='dense' with MoE"),
        (dict(mlp="moe", moe_every=2, moe_offset=2), r"moe_offset=2; expected an int in \[0, moe_every=2\)"),
        (dict(mlp="moe", moe_every=4, moe_offset=3), r"moe_offset=3 and n_layers=2: no layer"),
        (dict(embed_scale=-1.0), r"embed_scale=-1.0; expected None or a positive float"),
        (dict(logits_softcap=0), r"logits_softcap=0; expected None or a positive float"),
        (dict(pad_token_id=256), r"pad_token_id=256; expected None or a token id in \[0, vocab_size=256\)"),
    ],
    ids=["unknown-mixer", "pattern-length", "pattern-and-ratio", "unknown-letter", "bad-option",
         "bad-mlp", "layer-index", "mod-capacity", "mixer-entry", "moe-bitlinear", "moe-offset",
         "no-moe-layer", "embed-scale", "softcap", "pad-token"],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        LMConfig.preset("tiny", **overrides)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_pad_token_lookup_gets_no_gradient(tie):
    """``pad_token_id``: the same outputs; the pad row's gradient loses exactly its lookup part."""
    lm, variables, tokens = _model(pattern="MA", n_layers=2, tie_embeddings=tie)
    tokens = tokens.at[:, ::2].set(7)
    padded = LM(config=dataclasses.replace(lm.config, pad_token_id=7))
    chex.assert_trees_all_equal(padded.apply(variables, tokens)[0], lm.apply(variables, tokens)[0])

    def grad(model):
        loss = lambda v: jnp.sum(model.apply(v, tokens)[0][:, :, 5:10] ** 2)  # logits of ids 5..9 (the pad, 7, too)
        return nn.unbox(jax.grad(loss)(variables)["params"]["embed"]["embedding"])

    plain, pad = grad(lm), grad(padded)
    others = jnp.arange(lm.config.vocab_size) != 7
    chex.assert_trees_all_close(pad[others], plain[others], rtol=1e-6, atol=1e-7)  # other rows unchanged
    if tie:  # the tied head still trains row 7: its head part is what is left (nonzero), the lookup part is gone
        assert float(jnp.max(jnp.abs(pad[7]))) > 0 and float(jnp.max(jnp.abs(pad[7] - plain[7]))) > 1e-4
    else:
        chex.assert_trees_all_equal(pad[7], jnp.zeros_like(pad[7]))
        assert float(jnp.max(jnp.abs(plain[7]))) > 0


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match=r"no preset 'huge'; valid: cpu-small, gpu-base, tiny"):
        LMConfig.preset("huge")


def test_bad_tokens_raise():
    lm, variables, tokens = _model(pattern="A", n_layers=1)
    with pytest.raises(ValueError, match=r"tokens has shape \(2, 11\) and dtype float32; expected an integer"):
        lm.apply(variables, tokens.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"segment_ids has shape \(2, 3\); expected \[B,T\]"):
        lm.apply(variables, tokens, segment_ids=jnp.zeros((2, 3), jnp.int32))


# --- layers: SwiGLU and Mixture-of-Depths -----------------------------------------


def test_swiglu_matches_reference():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 12))
    mlp = SwiGLU(d_ff=20)
    variables = nn.unbox(mlp.init(jax.random.PRNGKey(1), x))
    p = variables["params"]
    ref = swiglu_reference(x, p["gate"]["kernel"], p["up"]["kernel"], p["down"]["kernel"])
    assert_relative_close(mlp.apply(variables, x), ref, name="swiglu")


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_mlp_with_biases_matches_reference(activation):
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 12))
    mlp = GatedMLP(d_ff=20, activation=activation, use_bias=True)
    variables = nn.unbox(mlp.init(jax.random.PRNGKey(1), x))
    p = jax.tree.map(lambda a: a + 0.1, variables["params"])  # nonzero biases
    ref = (ACTIVATION_REF[activation](x @ p["gate"]["kernel"] + p["gate"]["bias"])
           * (x @ p["up"]["kernel"] + p["up"]["bias"])) @ p["down"]["kernel"] + p["down"]["bias"]
    assert_relative_close(mlp.apply({"params": p}, x), ref, name=activation)


# Written out: transformers' "silu" and "gelu_pytorch_tanh".
ACTIVATION_REF = {
    "silu": lambda a: a / (1 + jnp.exp(-a)),
    "gelu_tanh": lambda a: 0.5 * a * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3))),
}


def test_embed_scale_softcap_and_zero_centered_norms_are_reparametrisations():
    """Each option against a plain model with transformed parameters (untied, so the head is its own)."""
    options = dict(pattern="A", n_layers=1, tie_embeddings=False, mlp="geglu", mlp_bias=True)
    lm, variables, tokens = _model(**options, embed_scale=2.5, logits_softcap=0.5, norm_zero_centered=True)
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(len(path)), a.shape),
        nn.unbox(variables)["params"])
    logits, _, _ = lm.apply({"params": params}, tokens)
    plain_params = jax.tree_util.tree_map_with_path(
        lambda path, a: 1.0 + a if path[-1].key == "scale" else a, params)  # (1 + scale) as a plain scale
    plain_params["embed"]["embedding"] = 2.5 * params["embed"]["embedding"]
    plain = LM(config=LMConfig.preset("tiny", **options))
    plain_logits, _, _ = plain.apply({"params": plain_params}, tokens)
    assert_relative_close(logits, 0.5 * jnp.tanh(plain_logits / 0.5), name="logits")
    assert float(jnp.max(jnp.abs(logits))) <= 0.5


def test_moe_every_alternates_dense_and_moe_layers():
    lm, variables, tokens = _model(pattern="A", n_layers=4, mlp="moe", moe_every=2, moe_offset=1,
                                   moe={"num_experts": 3, "top_k": 2, "capacity_factor": None})
    cfg = lm.config
    assert [spec.mlp for spec in cfg.layer_specs] == ["swiglu", "moe", "swiglu", "moe"]
    assert cfg.period == 2
    params = nn.unbox(variables)["params"]
    assert set(params["layer_0"]["mlp"]) == {"gate", "up", "down"} and "router" in params["layer_1"]["mlp"]
    # Zero routers give uniform probabilities: a load-balancing loss of exactly 1 in each MoE layer,
    # so the mean over the MoE layers (not over all four) is 1.
    for i in (1, 3):
        params[f"layer_{i}"]["mlp"]["router"] = jnp.zeros_like(params[f"layer_{i}"]["mlp"]["router"])
    _, aux, _ = lm.apply({"params": params}, tokens)
    np.testing.assert_allclose(aux["moe_aux_loss"], 1.0, rtol=1e-6)
    assert float(aux["moe_dropped_fraction"]) == 0.0
    scanned = LM(config=dataclasses.replace(cfg, scan_layers=True))
    stacked = stack_layer_params({"params": params}, scanned.config)
    assert_relative_close(scanned.apply(stacked, tokens)[0], lm.apply({"params": params}, tokens)[0],
                          name="scanned")


@pytest.mark.parametrize("residual_in_fp32", [False, True])
def test_residual_stream_dtype(residual_in_fp32):
    lm, variables, tokens = _model(pattern="A", n_layers=1, dtype=jnp.bfloat16, residual_in_fp32=residual_in_fp32)
    (logits, _, _), state = lm.apply(variables, tokens, capture_intermediates=True, mutable=["intermediates"])
    block_out = state["intermediates"]["layer_0"]["__call__"][0][0]
    assert block_out.dtype == (jnp.float32 if residual_in_fp32 else jnp.bfloat16)
    assert logits.dtype == jnp.float32


def test_mod_model_routes_and_refuses_cache():
    lm, variables, tokens = _model(pattern="A", n_layers=2, mod_capacity=0.5, mod_every=2)
    assert [spec.mod for spec in lm.config.layer_specs] == [False, True]
    logits, aux, _ = lm.apply(variables, tokens)
    chex.assert_shape(logits, (B, T, lm.config.vocab_size))
    np.testing.assert_allclose(aux["mod_fraction"], 6 / 11, rtol=1e-6)  # ceil(0.5 * 11) tokens
    router_grad = jax.grad(lambda v: jnp.sum(lm.apply(v, tokens)[0] ** 2))(variables)
    assert np.any(nn.unbox(router_grad)["params"]["layer_1"]["router"]["kernel"] != 0)
    with pytest.raises(ValueError, match="Mixture-of-Depths layers cannot decode from a cache"):
        lm.init_cache(B, T)


def test_layer_mlp_sets_one_layers_mlp_kind():
    cfg = LMConfig.preset("tiny", n_layers=4, pattern="MA", layer_mlp={3: "none", 0: "geglu"})
    assert [spec.mlp for spec in cfg.layer_specs] == ["geglu", "swiglu", "swiglu", "none"]
    assert LMConfig.from_dict(cfg.to_dict()) == cfg
    lm = LM(cfg)
    params = lm.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    assert "mlp" not in params["layer_3"] and "mlp_norm" not in params["layer_3"]
    assert "mlp" in params["layer_2"]
    logits, _, _ = lm.apply({"params": params}, jnp.zeros((1, 8), jnp.int32))
    assert logits.shape == (1, 8, cfg.vocab_size)
    with pytest.raises(ValueError, match=r"layer_mlp\[1\]='relu'; expected one of"):
        LMConfig.preset("tiny", layer_mlp={1: "relu"})
    with pytest.raises(ValueError, match="layer_mlp has key 5"):
        LMConfig.preset("tiny", layer_mlp={5: "none"})


def _decoded_token_by_token(lm, variables, tokens):
    """Logits ``[B,T,V]`` of feeding ``tokens`` one at a time through the decode caches."""
    step = jax.jit(lambda v, token, cache: lm.apply(v, token, cache=cache))  # one compile for every step
    cache = lm.init_cache(tokens.shape[0], tokens.shape[1])
    steps = []
    for t in range(tokens.shape[1]):
        out, _, cache = step(variables, tokens[:, t:t + 1], cache)
        steps.append(out)
    return jnp.concatenate(steps, 1)


def test_hgrn2_learned_lower_bounds_follow_the_hgrn2_model():
    """Zero logits: a uniform softmax over L layers, so layer i's bound is i / L (HGRN-2's cumsum minus layer 0)."""
    cfg = LMConfig.preset("tiny", n_layers=4, pattern="HHAH")
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    lm = LM(cfg)
    variables = nn.unbox(lm.init(jax.random.key(1), tokens))
    assert variables["params"]["hgrn2_lower_bounds"].shape == (4, cfg.d_model)
    fixed_cfg = LMConfig.preset("tiny", n_layers=4, pattern="HHAH",
                                layer_options={0: {"lower_bound": 0.0}, 1: {"lower_bound": 0.25},
                                               3: {"lower_bound": 0.75}})
    fixed_params = {k: v for k, v in variables["params"].items() if k != "hgrn2_lower_bounds"}
    want, _, _ = LM(fixed_cfg).apply({"params": fixed_params}, tokens)
    got, _, _ = lm.apply(variables, tokens)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
    # Random logits: the bounds are the numpy formula, and decoding token by token equals the full forward.
    logits = np.random.default_rng(0).normal(size=(4, cfg.d_model)).astype(np.float32)
    variables["params"]["hgrn2_lower_bounds"] = jnp.asarray(logits)
    shares = np.exp(logits) / np.exp(logits).sum(0)
    bounds = layer_lower_bounds(cfg, variables["params"])
    assert bounds[2] is None
    for i in (0, 1, 3):
        np.testing.assert_allclose(bounds[i], np.cumsum(shares, 0)[i] - shares[0], rtol=1e-5, atol=1e-7)
    full, _, _ = lm.apply(variables, tokens)
    # Under jit too (layer 0's bound must stay exactly 0, not round below it: its log would be NaN).
    chex.assert_trees_all_close(jax.jit(lm.apply)(variables, tokens)[0], full, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(_decoded_token_by_token(lm, variables, tokens), full, rtol=1e-4, atol=1e-4)
    scanned = LMConfig.preset("tiny", n_layers=4, pattern="HHAH", scan_layers=True)
    stacked = stack_layer_params(variables, scanned)
    out, _, _ = LM(scanned).apply(stacked, tokens)
    chex.assert_trees_all_close(out, full, rtol=1e-5, atol=1e-5)


def test_rwkv7_value_residual_across_the_stack():
    cfg = LMConfig.preset("tiny", n_layers=4, pattern="AVDV")
    specs = cfg.layer_specs
    assert [getattr(s.mixer, "value_residual", None) for s in specs] == [None, True, None, True]
    assert (specs[1].mixer.layer_ratio, specs[3].mixer.layer_ratio, specs[1].mixer.num_layers) == (1 / 3, 1.0, 4)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    lm = LM(cfg)
    variables = lm.init(jax.random.key(1), tokens)
    assert "v0" not in variables["params"]["layer_1"]["mixer"] and "v0" in variables["params"]["layer_3"]["mixer"]
    full, _, _ = lm.apply(variables, tokens)
    chex.assert_trees_all_close(_decoded_token_by_token(lm, variables, tokens), full, rtol=1e-4, atol=1e-4)
    # Layer 3 reads layer 1's values: changing layer 1's value projection changes layer 3's input beyond
    # what the residual stream carries, so a model without the residual differs.
    plain = LMConfig.preset("tiny", n_layers=4, pattern="AVDV", mixers={"V": ("rwkv7", {"value_residual": False})})
    plain_params = {k: v for k, v in nn.unbox(variables)["params"].items()}
    plain_params["layer_3"] = {**plain_params["layer_3"], "mixer": {
        k: v for k, v in plain_params["layer_3"]["mixer"].items() if not k.startswith(("v0", "value_lora"))}}
    other, _, _ = LM(plain).apply({"params": plain_params}, tokens)
    assert not np.allclose(other, full, atol=1e-4)
    with pytest.raises(ValueError, match=r"layers \[1, 3\] are RWKV-7 with value_residual=True.*scan_layers=False"):
        LMConfig.preset("tiny", n_layers=4, pattern="AVDV", scan_layers=True)
