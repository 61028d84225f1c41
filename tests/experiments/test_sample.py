"""experiments/sample.py and effarch.train.load_run on a tiny run made by the Trainer that train_lm.py uses."""

import dataclasses
import io
import logging
import pathlib
import re
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

from effarch import data, train
from effarch.models import LM, LMConfig
from effarch.testing import load_experiment

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 2
TEXT = "def main(argv):\n    return len(argv) + 1\n\n"


@pytest.fixture(scope="module")
def sample():
    return load_experiment("sample")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """``(workdir, model config, train config, final params)`` of a 2-step run checkpointed at steps 1 and 2."""
    docs = [TEXT.encode() * (i + 5) for i in range(20)]
    corpus = data.from_documents(docs, [f"doc{i}" for i in range(20)])
    model_config = LMConfig.preset("tiny", n_layers=1, pattern="A")
    config = train.TrainConfig(steps=STEPS, batch_size=2, seq_len=16, warmup_steps=1, log_every=1,
                               eval_batches=0, ckpt_every=1)
    workdir = tmp_path_factory.mktemp("tiny_run") / "run"
    trainer = train.Trainer.create(
        model=LM(config=model_config), model_config=model_config, config=config,
        train_data=data.PackedText(corpus, batch_size=2, seq_len=16, seed=0), eval_data=None, workdir=workdir,
    )
    trainer.run()
    trainer.close()
    return workdir, model_config, config, jax.device_get(trainer.state.params)


def test_load_run_returns_the_saved_configs_and_params(tiny_run, caplog):
    workdir, model_config, config, params = tiny_run
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")  # orbax warns when a restore lacks shardings; none may appear
        saved = train.load_run(workdir)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert saved.step == STEPS
    assert saved.model_config == model_config and saved.train_config == config
    assert jax.tree.structure(saved.params) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(saved.params), jax.tree.leaves(params)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)

    first = train.load_run(workdir, step=1)
    assert first.step == 1
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(params)))


def test_load_run_errors_name_the_workdir_and_the_saved_steps(tiny_run, tmp_path):
    workdir = tiny_run[0]
    with pytest.raises(FileNotFoundError, match="'.*/absent' does not exist"):
        train.load_run(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        train.load_run(tmp_path)
    (tmp_path / "config.json").write_text((workdir / "config.json").read_text())
    with pytest.raises(ValueError, match="has no checkpoint yet.*ckpt_every=1"):
        train.load_run(tmp_path)
    with pytest.raises(ValueError, match=re.escape("step=7 has no checkpoint") + ".*" + re.escape("[1, 2]")):
        train.load_run(workdir, step=7)


def greedy_options(sample, workdir):
    return sample.SampleOptions(workdir=str(workdir), prompt="def main(", max_new_tokens=40, greedy=True, repeats=3)


def test_greedy_sampling_repeats_and_reports_prefill_and_decode_speeds(sample, tiny_run):
    outputs, reports = [], []
    for _ in range(2):
        out = io.StringIO()
        reports.append(sample.run(greedy_options(sample, tiny_run[0]), stream=out))
        outputs.append(out.getvalue())
    assert reports[0].samples == reports[1].samples and len(reports[0].samples) == 1
    text = outputs[0]
    assert f"at step {STEPS}" in text and "--- sample 1 of 1 (greedy) ---\ndef main(" in text
    assert re.search(r"^prefill: [\d,]+ tokens/s \(1 x 10 prompt tokens", text, re.MULTILINE), text
    # On a machine too busy to time generate apart from its prefill, the decode line says so.
    assert re.search(r"^decode: ([\d,]+ tokens/s \(1 x 39 tokens one step at a time|n/a \(generate took no longer)",
                     text, re.MULTILINE), text
    assert reports[0].prefill_tokens_per_s > 0


def test_speeds_are_the_tokens_over_the_timed_seconds(sample, tiny_run, monkeypatch):
    seconds = [0.010, 0.050]  # prefill, then generate (prefill and 39 decode steps)

    def timed(fn, repeats):
        return fn(), 1.0, seconds.pop(0)

    monkeypatch.setattr(sample, "timed", timed)
    out = io.StringIO()
    report = sample.run(greedy_options(sample, tiny_run[0]), stream=out)
    assert report.prefill_tokens_per_s == pytest.approx(10 / 0.010)
    assert report.decode_tokens_per_s == pytest.approx(39 / 0.040)
    lines = out.getvalue().splitlines()
    assert "prefill: 1,000 tokens/s (1 x 10 prompt tokens in one call, 10.00 ms)" in lines
    assert "decode: 975 tokens/s (1 x 39 tokens one step at a time, 40.0 ms: generate's 50.0 ms less the prefill's)" \
        in lines


RUN = {"workdir": "runs/x"}


@pytest.mark.parametrize("fields, message", [
    ({}, "--workdir=None, --hf=None; give exactly one"),
    ({**RUN, "hf": "h"}, "give exactly one"),
    ({"hf": "h", "step": 3}, "--step=3 with --hf"),
    ({**RUN, "top_p": 1.5}, re.escape("--top_p=1.5; expected a float in (0, 1]")),
    ({**RUN, "top_p": 0.0}, re.escape("--top_p=0.0; expected a float in (0, 1]")),
    ({**RUN, "temperature": 0.0}, "--temperature=0.0; expected a float > 0"),
    ({**RUN, "top_k": 0}, "--top_k=0; expected an int >= 1"),
    ({**RUN, "max_new_tokens": 0}, "--max_new_tokens=0; expected an int >= 1"),
    ({**RUN, "num_samples": 0}, "--num_samples=0; expected an int >= 1"),
    ({**RUN, "exit_threshold": 1.5}, re.escape("--exit_threshold=1.5; expected a float in [-1, 1]")),
    ({**RUN, "exit_measure": "entropy"}, "--exit_measure='entropy'; expected one of max_prob, margin, saturation"),
], ids=["no-source", "two-sources", "step-with-hf", "top_p-above-1", "top_p-0", "temperature-0", "top_k-0",
        "no-new-tokens", "no-samples", "exit-threshold", "exit-measure"])
def test_bad_options_name_the_value_and_the_right_form(sample, fields, message):
    with pytest.raises(ValueError, match=message):
        sample.SampleOptions(**fields)


@pytest.mark.parametrize("fields, message", [
    ({"prompt": "x" * 120, "max_new_tokens": 20}, re.escape("121 tokens") + ".*" + re.escape("141 in all")
     + ".*max_len=128.*" + re.escape("--max_new_tokens=7")),
    ({"prompt": "x" * 130, "max_new_tokens": 1}, "the prompt alone is 131 >= 128 tokens: shorten it"),
    ({"top_k": 300, "max_new_tokens": 1}, "--top_k=300; expected at most the model's vocab_size=256"),
], ids=["prompt-plus-new-too-long", "prompt-too-long", "top_k-above-vocab"])
def test_inputs_the_model_cannot_take_are_refused_before_sampling(sample, tiny_run, fields, message):
    with pytest.raises(ValueError, match=message):
        sample.run(sample.SampleOptions(workdir=str(tiny_run[0]), **fields), stream=io.StringIO())


def test_script_exits_with_the_message_for_a_missing_workdir(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "sample.py"), f"--workdir={tmp_path}/none"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"sample.py: workdir '{tmp_path}/none' does not exist; expected the --workdir "
                                   "of a training run (a folder holding config.json and checkpoints/).")



def test_early_exit_needs_a_model_with_exits(sample, tiny_run):
    options = dataclasses.replace(greedy_options(sample, tiny_run[0]), exit_threshold=0.5)
    with pytest.raises(ValueError, match="the model has no early exits"):
        sample.run(options, stream=io.StringIO())


def test_early_exit_sampling_reports_the_layers_used(sample, tmp_path):
    corpus = data.from_documents([TEXT.encode() * (i + 5) for i in range(20)], [f"doc{i}" for i in range(20)])
    model_config = LMConfig.preset("tiny", n_layers=2, pattern="MA", early_exit=(0,))
    config = train.TrainConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=1, eval_batches=0, ckpt_every=2)
    trainer = train.Trainer.create(model=LM(config=model_config), model_config=model_config, config=config,
                                   train_data=data.PackedText(corpus, batch_size=2, seq_len=16, seed=0),
                                   eval_data=None, workdir=tmp_path / "run")
    trainer.run()
    trainer.close()
    out = io.StringIO()
    options = dataclasses.replace(greedy_options(sample, tmp_path / "run"), exit_threshold=-1.0, repeats=1)
    sample.run(options, stream=out)
    # Threshold -1 passes at the first exit: every token after the first uses one layer of two.
    assert "--- early exit (max_prob > -1.0): 1.00 of 2 layers per token; 100% after layer 0, 0% after layer 1 ---" \
        in out.getvalue().splitlines()
