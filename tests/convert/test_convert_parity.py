"""transformers checkpoints through effarch.convert: same logits, same greedy tokens, and back.

Each case is a tiny ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` with random
weights saved by ``save_pretrained``; the effarch model read by ``from_hf``
must give its logits (relative RMS <= 2e-3, float32) and its greedy tokens,
and ``to_hf`` must write a folder transformers reads back to the same model.
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

from effarch import convert  # noqa: E402
from effarch.models import LM, LMConfig, generate, stack_layer_params  # noqa: E402
from effarch.testing import assert_relative_close  # noqa: E402

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


def test_config_is_read_from_config_json(converted):
    hf = converted.hf.config
    cfg = converted.config
    spec = cfg.layer_specs[0].mixer
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers) == (hf.vocab_size, hf.hidden_size, hf.num_hidden_layers)
    assert cfg.mlp == "none" and cfg.tie_embeddings == hf.tie_word_embeddings
    assert cfg.norm_eps == hf.layer_norm_epsilon
    assert (spec.d_state, spec.d_conv, spec.expand) == (hf.state_size, hf.conv_kernel, hf.expand)
    if hf.model_type == "mamba":
        assert spec.rank == hf.time_step_rank
    else:
        assert (spec.num_heads, spec.head_dim, spec.ngroups) == (hf.num_heads, hf.head_dim, hf.n_groups)
        assert spec.norm_eps == hf.layer_norm_epsilon


def test_logits_match_transformers(converted):
    assert_relative_close(converted.logits, converted.hf_logits, name=f"{converted.case} logits")


@pytest.mark.parametrize("case", ["mamba-tied", "mamba2-untied"])
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
    logits = _checkpoints.hf_logits(reloaded, converted.tokens)
    np.testing.assert_array_equal(logits, converted.hf_logits)  # the same weights, bit for bit
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
