"""effarch.convert refuses what it cannot convert, names it, and writes nothing then."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import _checkpoints  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from effarch import convert  # noqa: E402
from effarch.convert import hf as hf_lib  # noqa: E402
from effarch.models import LMConfig  # noqa: E402

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An untied Mamba checkpoint (D 32, inner width 64, N 4, 2 layers), saved once."""
    return _checkpoints.save(_checkpoints.hf_model("mamba-untied"), tmp_path_factory.mktemp("mamba") / "hf")


@pytest.fixture
def folder(saved, tmp_path):
    """A copy of the checkpoint to break."""
    shutil.copytree(saved, tmp_path / "hf")
    return tmp_path / "hf"


def edit_tensors(folder, edit):
    tensors = dict(load_file(folder / WEIGHTS))
    edit(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def edit_config(folder, **fields):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_missing_tensor_is_named_with_its_shape(folder):
    edit_tensors(folder, lambda t: t.pop("backbone.layers.1.mixer.D"))
    with pytest.raises(ValueError, match=r"missing tensor backbone\.layers\.1\.mixer\.D \(expected shape \[64\]\)"):
        convert.from_hf(folder)


def test_extra_tensor_is_named(folder):
    edit_tensors(folder, lambda t: t.update({"backbone.layers.0.mixer.extra": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensor backbone\.layers\.0\.mixer\.extra \[3\]"):
        convert.from_hf(folder)


def test_wrong_shape_names_the_tensor_and_the_expected_shape(folder):
    edit_tensors(folder, lambda t: t.update({"backbone.layers.0.mixer.A_log": np.zeros((64, 5), np.float32)}))
    with pytest.raises(ValueError, match=r"tensor backbone\.layers\.0\.mixer\.A_log has shape \[64, 5\]; "
                                         r"expected \[64, 4\]"):
        convert.from_hf(folder)


def test_more_layers_in_the_config_than_in_the_file(folder):
    edit_config(folder, num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"missing tensor backbone\.layers\.2\.norm\.weight \(expected shape \[32\]\)"):
        convert.from_hf(folder)


def test_unknown_architecture_lists_the_supported_ones(folder):
    edit_config(folder, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(ValueError, match=r"architectures=\['LlamaForCausalLM'\].*MambaForCausalLM, Mamba2ForCausalLM"):
        convert.from_hf(folder)


@pytest.mark.parametrize("field, value", [("use_bias", True), ("use_conv_bias", False), ("hidden_act", "gelu")],
                         ids=["bias", "no_conv_bias", "gelu"])
def test_options_effarch_does_not_implement_are_refused(folder, field, value):
    edit_config(folder, **{field: value})
    with pytest.raises(ValueError, match=rf"{field}={value!r}; effarch implements MambaForCausalLM with {field}="):
        convert.from_hf(folder)


def test_mamba2_step_size_clamp_is_refused(tmp_path):
    tmp_path.joinpath("config.json").write_text(json.dumps(
        {"architectures": ["Mamba2ForCausalLM"], "hidden_size": 32, "num_heads": 4, "head_dim": 16,
         "time_step_limit": [0.0, 0.1]}))
    with pytest.raises(ValueError, match=r"time_step_limit=\[0\.0, 0\.1\]"):
        convert.from_hf(tmp_path)


def test_pickle_only_folder_says_so(saved, tmp_path):
    shutil.copy(saved / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin, which effarch does not read \(pickle\)"):
        convert.from_hf(tmp_path)


def test_tied_head_that_differs_from_the_embedding_is_refused(folder):
    edit_config(folder, tie_word_embeddings=True)
    with pytest.raises(ValueError, match=r"lm_head\.weight differs from backbone\.embeddings\.weight"):
        convert.from_hf(folder)


def test_overrides_that_change_the_architecture_are_refused(saved):
    with pytest.raises(ValueError, match=r"overrides \['d_model'\] would change the architecture"):
        convert.from_hf(saved, d_model=64)


def test_residual_in_fp32_is_read_overridable_and_written(saved, tmp_path):
    config, params = convert.from_hf(saved, dtype=jnp.bfloat16)
    assert config.residual_in_fp32  # MambaConfig's default, as transformers runs it
    off, _ = convert.from_hf(saved, residual_in_fp32=False)
    convert.to_hf(off, params, tmp_path / "off")
    assert json.loads((tmp_path / "off" / "config.json").read_text())["residual_in_fp32"] is False


# to_hf: nothing is written when it fails.


def assert_nothing_written(out):
    assert not out.exists()
    assert list(out.parent.iterdir()) == [], "a temporary folder was left behind"


@pytest.fixture
def model(saved):
    return convert.from_hf(saved)


@pytest.fixture
def out(tmp_path):
    parent = tmp_path / "parent"
    parent.mkdir()
    return parent / "out"


def layer0(params):
    return params["params"]["layer_0"]["mixer"]


def test_to_hf_missing_parameter(model, out):
    config, params = model
    del layer0(params)["D"]
    with pytest.raises(ValueError, match=r"params has no layer_0/mixer/D \(expected shape \[64\]\)"):
        convert.to_hf(config, params, out)
    assert_nothing_written(out)


def test_to_hf_extra_parameter(model, out):
    config, params = model
    layer0(params)["extra"] = jnp.zeros(3)
    with pytest.raises(ValueError, match=r"unexpected params entry layer_0/mixer/extra \[3\]"):
        convert.to_hf(config, params, out)
    assert_nothing_written(out)


def test_to_hf_wrong_shape(model, out):
    config, params = model
    layer0(params)["A_log"] = jnp.zeros((64, 5))
    with pytest.raises(ValueError, match=r"params layer_0/mixer/A_log has shape \[64, 5\]; expected \[64, 4\]"):
        convert.to_hf(config, params, out)
    assert_nothing_written(out)


@pytest.mark.parametrize("fields, message", [
    (dict(pattern="SG"), r"the layers use \['GLAConfig', 'MambaConfig'\]; a transformers layout exists"),
    (dict(pattern="SA"), r"JambaForCausalLM \(the layout of mamba and attention layers\) needs mamba "
                         r"dt_bc_norm=True; the layers have mamba dt_bc_norm=False"),
    (dict(mlp="swiglu"), r"mlp='swiglu', but MambaForCausalLM blocks have no MLP"),
    (dict(layer_options={1: {"d_state": 8}}), r"options differ \(2 distinct configs\)"),
    (dict(projection="bitlinear"), r"projection='bitlinear'; MambaForCausalLM has dense projections"),
    (dict(logits_softcap=30.0), r"logits_softcap=30.0, but MambaForCausalLM has logits_softcap=None"),
], ids=["gla", "attention_without_jamba_norms", "mlp", "per_layer_options", "bitlinear", "softcap"])
def test_to_hf_configs_without_a_layout(model, out, fields, message):
    config, params = model
    config = LMConfig(**{**{f: getattr(config, f) for f in ("vocab_size", "d_model", "n_layers", "mixers")},
                         "pattern": "S", "mlp": "none", **fields})
    with pytest.raises(ValueError, match=message):
        convert.to_hf(config, params, out)
    assert_nothing_written(out)


def test_to_hf_mamba2_needs_one_epsilon(model, out):
    config = LMConfig(vocab_size=61, d_model=32, n_layers=2, pattern="M", mlp="none", norm_eps=1e-5,
                      mixers={"M": ("mamba2", {"head_dim": 16, "norm_eps": 1e-6})})
    with pytest.raises(ValueError, match=r"gated norm has norm_eps=1e-06 and the block norms norm_eps=1e-05"):
        convert.to_hf(config, model[1], out)
    assert_nothing_written(out)


def test_to_hf_refuses_a_folder_with_files(model, out):
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"exists and is not an empty folder"):
        convert.to_hf(*model, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_to_hf_failing_while_writing_leaves_nothing(model, out, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_lib, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        convert.to_hf(*model, out)
    assert_nothing_written(out)


# RecurrentGemma and Jamba.


@pytest.fixture(scope="module")
def saved_rgemma(tmp_path_factory):
    """RecurrentGemma: D 32, 4 heads (head_dim 8), layers QQAQ."""
    return _checkpoints.save(_checkpoints.hf_model("rgemma-tied"), tmp_path_factory.mktemp("rgemma") / "hf")


@pytest.fixture(scope="module")
def saved_jamba(tmp_path_factory):
    """Jamba: D 32, F 40, 4 experts on layers 0 and 2, layers SASA."""
    return _checkpoints.save(_checkpoints.hf_model("jamba-moe"), tmp_path_factory.mktemp("jamba") / "hf")


def copy_of(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "hf")
    return tmp_path / "hf"


@pytest.mark.parametrize("fields, message", [
    (dict(block_types=["recurrent", "mlp"]), r"block_types has \['mlp'\]"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}), r"rope_type='linear'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.375}),
     r"rotates int\(head_dim \* factor\) = 3 of head_dim=8 channels"),
    (dict(hidden_activation="gelu"), r"hidden_activation='gelu'; effarch implements RecurrentGemmaForCausalLM with"),
], ids=["block_type", "rope_type", "odd_rotary", "exact_gelu"])
def test_recurrent_gemma_options_effarch_does_not_implement_are_refused(saved_rgemma, tmp_path, fields, message):
    folder = copy_of(saved_rgemma, tmp_path)
    edit_config(folder, **fields)
    with pytest.raises(ValueError, match=message):
        convert.from_hf(folder)


def test_jamba_missing_expert_tensor_is_named(saved_jamba, tmp_path):
    folder = copy_of(saved_jamba, tmp_path)
    edit_tensors(folder, lambda t: t.pop("model.layers.2.feed_forward.experts.3.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.2\.feed_forward\.experts\.3\.up_proj\.weight "
                                         r"\(expected shape \[40, 32\]\)"):
        convert.from_hf(folder)


def test_jamba_projection_biases_are_refused(saved_jamba, tmp_path):
    folder = copy_of(saved_jamba, tmp_path)
    edit_config(folder, mamba_proj_bias=True)
    with pytest.raises(ValueError, match=r"mamba_proj_bias=True; effarch implements JambaForCausalLM with"):
        convert.from_hf(folder)


def with_mixer(config, letter, **options):
    name, current = config.mixers[letter]
    return dataclasses.replace(config, mixers={**config.mixers, letter: (name, {**current, **options})})


@pytest.mark.parametrize("change, message", [
    (lambda c: with_mixer(c, "A", window=None), r"global \(window=None\), but RecurrentGemmaForCausalLM's attention "
                                                r"is local"),
    (lambda c: dataclasses.replace(c, logits_softcap=None), r"always soft-caps its logits"),
    (lambda c: dataclasses.replace(c, embed_scale=1.0), r"embed_scale=1.0, but RecurrentGemmaForCausalLM has "
                                                        r"embed_scale=5.65625"),
    (lambda c: dataclasses.replace(c, mlp="swiglu"), r"mlp='swiglu', but RecurrentGemmaForCausalLM has mlp='geglu'"),
    (lambda c: with_mixer(c, "A", num_heads=2, num_kv_heads=1, head_dim=8),
     r"the attention layers have head_dim=8, but RecurrentGemmaForCausalLM's is hidden_size // "
     r"num_attention_heads = 16"),
], ids=["global_attention", "no_softcap", "embed_scale", "swiglu", "head_dim"])
def test_to_hf_recurrent_gemma_configs_without_a_layout(saved_rgemma, out, change, message):
    config, params = convert.from_hf(saved_rgemma)
    with pytest.raises(ValueError, match=message):
        convert.to_hf(change(config), params, out)
    assert_nothing_written(out)


@pytest.mark.parametrize("change, message", [
    (lambda c: dataclasses.replace(c, moe={**dataclasses.asdict(c.moe), "capacity_factor": 1.25}),
     r"moe\.capacity_factor=1\.25, but JambaForCausalLM's MoE never drops a token"),
    (lambda c: with_mixer(c, "A", rotary_fraction=0.5), r"JambaForCausalLM's attention has no positional encoding"),
    (lambda c: dataclasses.replace(c, pattern="SAAS"), r"the attention layers are layers \[1, 2\], which no period "
                                                       r"and offset describe"),
    (lambda c: dataclasses.replace(c, mlp="geglu"),
     r"mlp='geglu', but JambaForCausalLM blocks have a SwiGLU or MoE MLP"),
    (lambda c: with_mixer(c, "S", dt_bc_norm_eps=1e-3), r"dt_bc_norm_eps=0\.001 and the block norms norm_eps=1e-05"),
], ids=["capacity", "rotary", "attention_layers", "geglu", "two_epsilons"])
def test_to_hf_jamba_configs_without_a_layout(saved_jamba, out, change, message):
    config, params = convert.from_hf(saved_jamba)
    with pytest.raises(ValueError, match=message):
        convert.to_hf(change(config), params, out)
    assert_nothing_written(out)


# Qwen3-Next.


@pytest.fixture(scope="module")
def saved_qwen3_next(tmp_path_factory):
    """Qwen3-Next: D 32, layers DDDA, MoE on layers 1 and 3."""
    return _checkpoints.save(_checkpoints.hf_model("qwen3next-moe"), tmp_path_factory.mktemp("qwen3next") / "hf")


def test_qwen3_next_explicit_dense_layers_are_refused(saved_qwen3_next, tmp_path):
    folder = copy_of(saved_qwen3_next, tmp_path)
    edit_config(folder, mlp_only_layers=[1])
    with pytest.raises(ValueError, match=r"mlp_only_layers=\[1\]; effarch places its MoE layers by "
                                         r"decoder_sparse_step only"):
        convert.from_hf(folder)


def test_qwen3_next_multi_token_prediction_tensors_are_ignored(saved_qwen3_next, tmp_path):
    folder = copy_of(saved_qwen3_next, tmp_path)
    edit_tensors(folder, lambda t: t.update({"mtp.fc.weight": np.ones((32, 64), np.float32)}))
    config, params = convert.from_hf(folder)
    expected_config, expected_params = convert.from_hf(saved_qwen3_next)
    assert config == expected_config
    jax.tree.map(np.testing.assert_array_equal, params, expected_params)


@pytest.mark.parametrize("change, message", [
    (lambda c: dataclasses.replace(c, moe={**dataclasses.asdict(c.moe), "shared_d_ff": None}),
     r"moe\.shared_d_ff=None, but Qwen3NextForCausalLM's MoE layers have a shared expert"),
    (lambda c: dataclasses.replace(c, moe_offset=0), r"moe_every=2 with moe_offset=0, but Qwen3NextForCausalLM's MoE "
                                                     r"layers are those with \(i \+ 1\) % decoder_sparse_step == 0"),
    (lambda c: with_mixer(c, "A", output_gate=False), r"the attention layers have output_gate=False, but "
                                                      r"Qwen3NextForCausalLM's have output_gate=True"),
    (lambda c: dataclasses.replace(c, norm_zero_centered=False), r"norm_zero_centered=False, but Qwen3NextForCausalLM"),
], ids=["no_shared_expert", "moe_offset", "no_output_gate", "plain_norms"])
def test_to_hf_qwen3_next_configs_without_a_layout(saved_qwen3_next, out, change, message):
    config, params = convert.from_hf(saved_qwen3_next)
    with pytest.raises(ValueError, match=message):
        convert.to_hf(change(config), params, out)
    assert_nothing_written(out)
