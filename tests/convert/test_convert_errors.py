"""effarch.convert refuses what it cannot convert, names it, and writes nothing then."""

import json
import shutil

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
    with pytest.raises(ValueError, match=rf"{field}={value!r}; effarch's mamba mixer implements only"):
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


def test_low_precision_compute_warns_about_the_residual_stream(saved, caplog):
    convert.from_hf(saved, dtype=jnp.bfloat16)
    assert "residual_in_fp32=true, but effarch's residual stream is in the compute dtype (bfloat16)" in caplog.text


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
    (dict(pattern="SA"), r"the layers use \['AttentionConfig', 'MambaConfig'\]; a transformers layout exists"),
    (dict(mlp="swiglu"), r"mlp='swiglu', but MambaForCausalLM blocks have no MLP"),
    (dict(layer_options={1: {"d_state": 8}}), r"options differ \(2 distinct configs\)"),
    (dict(projection="bitlinear"), r"projection='bitlinear'; MambaForCausalLM has dense projections"),
], ids=["attention", "mlp", "per_layer_options", "bitlinear"])
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
