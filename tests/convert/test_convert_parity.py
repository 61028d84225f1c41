"""transformers checkpoints through effarch.convert: same logits, same greedy tokens, and back.

Each case is a tiny ``MambaForCausalLM``, ``Mamba2ForCausalLM``,
``RecurrentGemmaForCausalLM``, ``JambaForCausalLM`` or ``Qwen3NextForCausalLM`` with random weights
saved by ``save_pretrained``; the effarch model read by ``from_hf`` must give
its logits (relative RMS <= 2e-3, float32) and its greedy tokens, and
``to_hf`` must write a folder transformers reads back to the same model.
"""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import _checkpoints  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from effarch import convert  # noqa: E402
from effarch.convert.architectures import rg_embed_scale  # noqa: E402
from effarch.models import LM, LMConfig, generate, stack_layer_params  # noqa: E402
from effarch.testing import assert_relative_close, relative_rmse  # noqa: E402

NEW_TOKENS = 16
PROMPT = 5


class Converted:
    """One case: the transformers model, its folder, and what effarch made of it."""

    def __init__(self, case, folder):
        self.case = case
        self.hf = _checkpoints.hf_model(case)
        self.folder = _checkpoints.save(self.hf, folder)
        self.config, self.params = convert.from_hf(folder)
        self.tokens = _checkpoints.tokens()
        self.hf_logits = _checkpoints.hf_logits(self.hf, self.tokens)
        self.logits, *_ = jax.jit(LM(self.config).apply)(self.params, jnp.asarray(self.tokens))


@pytest.fixture(scope="module", params=list(_checkpoints.CASES))
def converted(request, tmp_path_factory):
    return Converted(request.param, tmp_path_factory.mktemp(request.param) / "hf")


def check_mamba_family(cfg, hf):
    spec = cfg.layer_specs[0].mixer
    assert cfg.mlp == "none" and cfg.norm_eps == hf.layer_norm_epsilon and cfg.residual_in_fp32 == hf.residual_in_fp32
    assert (spec.d_state, spec.d_conv, spec.expand) == (hf.state_size, hf.conv_kernel, hf.expand)
    if hf.model_type == "mamba":
        assert spec.rank == hf.time_step_rank and not spec.dt_bc_norm
    else:
        assert (spec.num_heads, spec.head_dim, spec.ngroups) == (hf.num_heads, hf.head_dim, hf.n_groups)
        assert spec.norm_eps == hf.layer_norm_epsilon


def by_mixer(cfg, name):
    return [spec.mixer for spec in cfg.layer_specs if type(spec.mixer).__name__ == name]


def check_recurrent_gemma(cfg, hf):
    letters = {"linear_attention": "Q", "sliding_attention": "A"}
    assert cfg.layer_pattern == "".join(letters[t] for t in hf.layers_block_type)
    assert cfg.embed_scale == rg_embed_scale(hf.hidden_size) == float(torch.tensor(hf.hidden_size**0.5,
                                                                                 dtype=torch.bfloat16))
    assert (cfg.logits_softcap, cfg.norm_eps, cfg.norm_zero_centered) == (hf.logits_soft_cap, hf.rms_norm_eps, True)
    assert (cfg.mlp, cfg.mlp_width, cfg.mlp_bias) == ("geglu", hf.intermediate_size // 2, True)
    lru, attention = by_mixer(cfg, "RGLRUConfig")[0], by_mixer(cfg, "AttentionConfig")[0]
    assert (lru.width, lru.num_heads, lru.conv_kernel) == (hf.lru_width, hf.num_attention_heads, hf.conv1d_width)
    assert (attention.num_heads, attention.kv_heads, attention.dim_per_head) == (
        hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim)
    assert (attention.window, attention.use_bias, attention.out_bias) == (hf.attention_window_size,
                                                                          hf.attention_bias, True)
    rope = hf.rope_parameters
    assert (attention.rotary_base, attention.rotary_fraction) == (rope["rope_theta"], rope["partial_rotary_factor"])


def check_jamba(cfg, hf):
    letters = {"mamba": "S", "attention": "A"}
    assert cfg.layer_pattern == "".join(letters[t] for t in hf.layers_block_type)
    assert [spec.mlp for spec in cfg.layer_specs] == ["moe" if e > 1 else "swiglu" for e in hf.layers_num_experts]
    assert (cfg.mlp_width, cfg.norm_eps, cfg.embed_scale, cfg.logits_softcap) == (hf.intermediate_size,
                                                                                   hf.rms_norm_eps, None, None)
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.capacity_factor) == (hf.num_experts, hf.num_experts_per_tok,
                                                                             None)
    mamba, attention = by_mixer(cfg, "MambaConfig")[0], by_mixer(cfg, "AttentionConfig")[0]
    assert (mamba.d_state, mamba.d_conv, mamba.expand, mamba.rank) == (hf.mamba_d_state, hf.mamba_d_conv,
                                                                      hf.mamba_expand, hf.mamba_dt_rank)
    assert mamba.dt_bc_norm and mamba.dt_bc_norm_eps == hf.rms_norm_eps
    assert (attention.num_heads, attention.kv_heads, attention.rotary_fraction) == (
        hf.num_attention_heads, hf.num_key_value_heads, 0.0)
    assert attention.dim_per_head == getattr(hf, "head_dim", hf.hidden_size // hf.num_attention_heads)


def check_qwen3_next(cfg, hf):
    letters = {"linear_attention": "D", "full_attention": "A"}
    assert cfg.layer_pattern == "".join(letters[t] for t in hf.layer_types)
    moe_layers = [(i + 1) % hf.decoder_sparse_step == 0 for i in range(hf.num_hidden_layers)]
    assert [spec.mlp for spec in cfg.layer_specs] == ["moe" if m else "swiglu" for m in moe_layers]
    assert (cfg.mlp_width, cfg.norm_eps, cfg.norm_zero_centered) == (hf.intermediate_size, hf.rms_norm_eps, True)
    moe = cfg.moe
    assert (moe.num_experts, moe.top_k, moe.d_ff, moe.shared_d_ff, moe.normalize_gates, moe.capacity_factor) == (
        hf.num_experts, hf.num_experts_per_tok, hf.moe_intermediate_size, hf.shared_expert_intermediate_size,
        hf.norm_topk_prob, None)
    deltanet, attention = by_mixer(cfg, "GatedDeltaNetConfig")[0], by_mixer(cfg, "AttentionConfig")[0]
    assert (deltanet.heads, deltanet.value_heads, deltanet.head_dim, deltanet.value_dim, deltanet.conv_size) == (
        hf.linear_num_key_heads, hf.linear_num_value_heads, hf.linear_key_head_dim, hf.linear_value_head_dim,
        hf.linear_conv_kernel_dim)
    assert (attention.num_heads, attention.kv_heads, attention.dim_per_head) == (
        hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim)
    assert attention.output_gate and attention.qk_norm and attention.qk_norm_zero_centered
    assert attention.rotary_fraction == hf.rope_parameters["partial_rotary_factor"]


CONFIG_CHECKS = {"mamba": check_mamba_family, "mamba2": check_mamba_family,
                 "recurrent_gemma": check_recurrent_gemma, "jamba": check_jamba, "qwen3_next": check_qwen3_next}


def test_config_is_read_from_config_json(converted):
    hf = converted.hf.config
    cfg = converted.config
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers) == (hf.vocab_size, hf.hidden_size, hf.num_hidden_layers)
    assert cfg.tie_embeddings == hf.tie_word_embeddings
    CONFIG_CHECKS[hf.model_type](cfg, hf)


def test_logits_match_transformers(converted):
    print(f"{converted.case}: logits relative RMS {relative_rmse(converted.logits, converted.hf_logits):.1e}")
    assert_relative_close(converted.logits, converted.hf_logits, name=f"{converted.case} logits")


def test_embedding_gradient_matches_transformers_with_the_pad_token_in_the_input(converted):
    """Every third input token is 0, the pad token of the RecurrentGemma and Jamba configs.

    Their torch embeddings (and Qwen3-Next's) drop the pad token's lookup gradient
    (``nn.Embedding(padding_idx=pad_token_id)``); from_hf carries ``pad_token_id``
    so effarch's gradient of the same loss matches, row 0 included (a tied head
    still trains that row on both sides). Mamba's embedding has no padding_idx.
    """
    hf_config = converted.hf.config
    padded_types = ("recurrent_gemma", "jamba", "qwen3_next")
    expected_pad = hf_config.pad_token_id if hf_config.model_type in padded_types else None
    assert converted.config.pad_token_id == expected_pad
    tokens = converted.tokens.copy()
    tokens[:, ::3] = 0
    targets = np.roll(tokens, -1, axis=1)
    model = converted.hf
    model.zero_grad(set_to_none=True)
    logits = model(torch.from_numpy(tokens.astype(np.int64))).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), torch.from_numpy(targets.astype(np.int64)).flatten()
                                      ).backward()
    torch_grad = model.get_input_embeddings().weight.grad.numpy()
    model.zero_grad(set_to_none=True)
    lm = LM(converted.config)

    def loss(params):
        logits, *_ = lm.apply(params, jnp.asarray(tokens))
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1))

    grad = jax.jit(jax.grad(loss))(converted.params)["params"]["embed"]["embedding"]
    assert_relative_close(grad, torch_grad, name=f"{converted.case} embedding gradient")
    assert_relative_close(grad[0], torch_grad[0], name=f"{converted.case} embedding gradient, row 0")


@pytest.mark.parametrize("case", ["mamba-tied", "mamba2-untied", "rgemma-tied", "jamba-moe", "qwen3next-moe"])
def test_greedy_generation_matches_transformers(case, tmp_path):
    hf = _checkpoints.hf_model(case)
    config, params = convert.from_hf(_checkpoints.save(hf, tmp_path / "hf"))
    prompt = _checkpoints.tokens(seed=1, length=PROMPT)
    ours = generate(LM(config), params, jnp.asarray(prompt), max_new_tokens=NEW_TOKENS,
                    key=jax.random.PRNGKey(0), greedy=True)
    np.testing.assert_array_equal(np.asarray(ours), _checkpoints.hf_greedy(hf, prompt, NEW_TOKENS))


def test_to_hf_round_trip_reads_back_in_transformers(converted, tmp_path):
    out = tmp_path / "back"
    convert.to_hf(converted.config, converted.params, out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(converted.hf)
    # The same weights, bit for bit (logits can differ in the last bit: a Qwen3-Next model loaded by
    # from_pretrained, even from its own save_pretrained, does not reproduce the one built in memory).
    original = converted.hf.state_dict()
    weights = reloaded.state_dict()
    assert set(weights) == set(original)
    for name, value in weights.items():
        torch.testing.assert_close(value, original[name], rtol=0, atol=0, msg=name)
    logits = _checkpoints.hf_logits(reloaded, converted.tokens)
    assert_relative_close(converted.logits, logits, name=f"{converted.case} logits after to_hf")
    # ... and effarch reads its own output back to the same config and parameters.
    config, params = convert.from_hf(out)
    assert config == converted.config
    jax.tree.map(np.testing.assert_array_equal, params, converted.params)


def test_tied_checkpoints_have_no_head_tensor(converted, tmp_path):
    out = tmp_path / "back"
    convert.to_hf(converted.config, converted.params, out)
    with safe_open(out / "model.safetensors", framework="np") as f:
        names = set(f.keys())
    assert ("lm_head.weight" in names) == (not converted.config.tie_embeddings)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] == converted.config.tie_embeddings
    assert ("unembed" in converted.params["params"]) == (not converted.config.tie_embeddings)


def test_sharded_checkpoint_reads_like_one_file(tmp_path):
    hf = _checkpoints.hf_model("mamba2-untied")
    one = _checkpoints.save(hf, tmp_path / "one")
    sharded = _checkpoints.save(hf, tmp_path / "sharded", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    config_one, params_one = convert.from_hf(one)
    config_sharded, params_sharded = convert.from_hf(sharded)
    assert config_one == config_sharded
    jax.tree.map(np.testing.assert_array_equal, params_sharded, params_one)


def random_params(config, seed):
    """Generic values for every parameter of ``config``'s model (norm scales near 1), without compiling init."""
    shapes = jax.eval_shape(LM(config).init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    rng = np.random.default_rng(seed)

    def value(path, leaf):
        centre = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(centre + 0.3 * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(value, nn.unbox(shapes))


def test_an_effarch_model_saved_by_to_hf_runs_in_transformers(tmp_path):
    """The other direction first: an effarch-initialised Mamba-2 model, saved from the scanned layout."""
    config = LMConfig(vocab_size=_checkpoints.VOCAB, d_model=32, n_layers=2, pattern="M", mlp="none",
                      tie_embeddings=False, norm_eps=1e-5,
                      mixers={"M": ("mamba2", dict(d_state=8, head_dim=16, ngroups=2, chunk_size=8))})
    ids = _checkpoints.tokens(seed=2)
    params = random_params(config, seed=3)
    logits, *_ = jax.jit(LM(config).apply)(params, jnp.asarray(ids))
    scanned = dataclasses.replace(config, scan_layers=True)
    stacked = stack_layer_params(params, scanned)
    convert.to_hf(scanned, stacked, tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(reloaded).__name__ == "Mamba2ForCausalLM"
    assert_relative_close(logits, _checkpoints.hf_logits(reloaded, ids), name="effarch -> transformers logits")
    again, again_params = convert.from_hf(tmp_path / "hf", scan_layers=True)
    assert again.layer_specs == scanned.layer_specs  # the same mixers (options spelt out in full)
    assert dataclasses.replace(again, mixers=config.mixers) == scanned
    jax.tree.map(np.testing.assert_array_equal, again_params, stacked)


def test_bfloat16_parameters_are_written_as_bfloat16(tmp_path):
    hf = _checkpoints.hf_model("mamba-untied")
    config, params = convert.from_hf(_checkpoints.save(hf, tmp_path / "hf"), param_dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    convert.to_hf(config, params, tmp_path / "bf16")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    expected = {name: value.to(torch.bfloat16) for name, value in hf.state_dict().items()}
    for name, value in reloaded.state_dict().items():
        assert value.dtype == torch.bfloat16, name
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def test_recurrent_gemma_saved_by_to_hf_runs_in_transformers(tmp_path):
    """An effarch-initialised RecurrentGemma: the LMConfig fields that make one, written from the scanned layout."""
    d = 32
    config = LMConfig(vocab_size=_checkpoints.VOCAB, d_model=d, n_layers=6, pattern="QQA", mlp="geglu", d_ff=40,
                      mlp_bias=True, norm_zero_centered=True, embed_scale=rg_embed_scale(d), logits_softcap=4.0,
                      mixers={"Q": ("rglru", dict(lru_width=40, num_heads=4, conv_kernel=4)),
                              "A": ("attention", dict(num_heads=4, num_kv_heads=1, window=5, rotary_fraction=0.5,
                                                      out_bias=True))})
    ids = _checkpoints.tokens(seed=2)
    params = random_params(config, seed=3)
    logits, *_ = jax.jit(LM(config).apply)(params, jnp.asarray(ids))
    scanned = dataclasses.replace(config, scan_layers=True)
    convert.to_hf(scanned, stack_layer_params(params, scanned), tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(reloaded).__name__ == "RecurrentGemmaForCausalLM"
    assert reloaded.config.block_types == ["recurrent", "recurrent", "attention"]
    assert_relative_close(logits, _checkpoints.hf_logits(reloaded, ids), name="effarch -> transformers logits")


def test_jamba_saved_by_to_hf_runs_in_transformers(tmp_path):
    """An effarch-initialised Jamba: MoE every other layer, attention every fourth, no positions."""
    config = LMConfig(vocab_size=_checkpoints.VOCAB, d_model=32, n_layers=4, pattern="SSAS", d_ff=24, norm_eps=1e-5,
                      mlp="moe", moe_every=2, moe_offset=1,
                      moe=dict(num_experts=3, top_k=2, capacity_factor=None, aux_loss_weight=0.01),
                      tie_embeddings=False,
                      mixers={"S": ("mamba", dict(d_state=4, dt_bc_norm=True, dt_bc_norm_eps=1e-5)),
                              "A": ("attention", dict(num_heads=4, num_kv_heads=2, rotary_fraction=0.0))})
    ids = _checkpoints.tokens(seed=2)
    params = random_params(config, seed=4)
    logits, *_ = jax.jit(LM(config).apply)(params, jnp.asarray(ids))
    convert.to_hf(config, params, tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf = reloaded.config
    assert hf.layers_block_type == ["mamba", "mamba", "attention", "mamba"]
    assert hf.layers_num_experts == [1, 3, 1, 3] and hf.router_aux_loss_coef == 0.01
    assert_relative_close(logits, _checkpoints.hf_logits(reloaded, ids), name="effarch -> transformers logits")
    again, again_params = convert.from_hf(tmp_path / "hf")  # options spelt out (dt_rank=2 for None)
    jax.tree.map(np.testing.assert_array_equal, again_params, params)
    np.testing.assert_array_equal(jax.jit(LM(again).apply)(again_params, jnp.asarray(ids))[0], logits)


def test_jamba_fused_experts_read_like_one_tensor_per_expert(tmp_path):
    """transformers 5's in-memory spelling (experts.gate_up_proj [E, 2F, D], experts.down_proj [E, D, F])."""
    hf = _checkpoints.hf_model("jamba-moe")
    per_expert = _checkpoints.save(hf, tmp_path / "per_expert")
    tensors = load_file(per_expert / "model.safetensors")
    e = hf.config.num_experts
    for i in range(hf.config.num_hidden_layers):
        ff = f"model.layers.{i}.feed_forward.experts."
        if f"{ff}0.gate_proj.weight" not in tensors:
            continue
        pop = lambda name: np.stack([tensors.pop(f"{ff}{j}.{name}.weight") for j in range(e)])  # noqa: E731
        tensors[f"{ff}gate_up_proj"] = np.concatenate([pop("gate_proj"), pop("up_proj")], axis=1)
        tensors[f"{ff}down_proj"] = pop("down_proj")
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((per_expert / "config.json").read_text())
    save_file(tensors, fused / "model.safetensors", metadata={"format": "pt"})
    config, params = convert.from_hf(fused)
    assert config == convert.from_hf(per_expert)[0]
    jax.tree.map(np.testing.assert_array_equal, params, convert.from_hf(per_expert)[1])
    # transformers reads the fused file as the same model: the spelling is its own.
    ids = _checkpoints.tokens()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(fused).eval()
    np.testing.assert_array_equal(_checkpoints.hf_logits(reloaded, ids), _checkpoints.hf_logits(hf, ids))


def test_qwen3_next_saved_by_to_hf_runs_in_transformers(tmp_path):
    """An effarch-initialised Qwen3-Next: gated DeltaNet thrice, gated attention, MoE with a shared expert."""
    eps = 1e-6
    config = LMConfig(vocab_size=_checkpoints.VOCAB, d_model=32, n_layers=4, pattern="DDDA", d_ff=24, norm_eps=eps,
                      norm_zero_centered=True, tie_embeddings=False, mlp="moe",
                      moe=dict(num_experts=3, top_k=2, capacity_factor=None, d_ff=8, normalize_gates=True,
                               shared_d_ff=12),
                      mixers={"D": ("gated_deltanet", dict(head_dim=8, num_heads=2, num_v_heads=4, expand_v=1,
                                                           norm_eps=eps)),
                              "A": ("attention", dict(num_heads=4, num_kv_heads=1, head_dim=8, rotary_fraction=0.25,
                                                      qk_norm=True, qk_norm_eps=eps, qk_norm_zero_centered=True,
                                                      output_gate=True))})
    ids = _checkpoints.tokens(seed=2)
    params = random_params(config, seed=5)
    logits, *_ = jax.jit(LM(config).apply)(params, jnp.asarray(ids))
    convert.to_hf(config, params, tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(reloaded).__name__ == "Qwen3NextForCausalLM"
    assert_relative_close(logits, _checkpoints.hf_logits(reloaded, ids), name="effarch -> transformers logits")
