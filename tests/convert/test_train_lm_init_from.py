"""experiments/train_lm.py --init_from: fine-tune a Hugging Face checkpoint (subword tokens) and save it back.

A tiny random Mamba-2 with a word-level tokenizer of its own is fine-tuned for a
few steps on random words, written back with --save_hf, and read by
transformers: its logits are the fine-tuned run's and differ from the
source's. A second run starts from the first run's --workdir and begins at the
loss the first ended near, not at a fresh model's. Slow: two subprocesses that
compile training.
"""

import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import _checkpoints  # noqa: E402

from effarch.models import LM  # noqa: E402
from effarch.testing import assert_relative_close  # noqa: E402
from effarch.train import load_run  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORDS = "the state of art a model reads writes tokens and its weights back".split()
FLAGS = ["--preset=tiny", "--steps=4", "--batch_size=2", "--seq_len=16", "--warmup_steps=1", "--log_every=1",
         "--eval_every=0", "--eval_batches=1", "--ckpt_every=0"]


def word_tokenizer():
    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="[EOS]")


def train_lm(cwd, *flags):
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "train_lm.py"), *FLAGS, *flags], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    return done


def losses(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("init_from")
    source = _checkpoints.hf_model("mamba2-untied")
    _checkpoints.save(source, tmp / "mamba2")
    word_tokenizer().save_pretrained(tmp / "mamba2")
    rng = np.random.default_rng(0)
    docs = tmp / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS, 200)))
    first = train_lm(tmp, f"--init_from={tmp / 'mamba2'}", f"--data={docs}", f"--workdir={tmp / 'first'}",
                     f"--save_hf={tmp / 'tuned'}")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = train_lm(tmp, f"--init_from={tmp / 'first'}", f"--data={docs}", f"--workdir={tmp / 'second'}")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return tmp, source, first, second


def test_fine_tuned_checkpoint_reads_back_in_transformers(runs):
    tmp, source, first, _ = runs
    assert "tokens (tokenizer" in first.stdout and f"saved the model as a Hugging Face checkpoint in {tmp / 'tuned'}" \
        in first.stdout
    tuned = transformers.AutoModelForCausalLM.from_pretrained(tmp / "tuned").eval()
    saved = load_run(tmp / "first")
    ids = _checkpoints.tokens()
    logits, *_ = LM(saved.model_config).apply({"params": saved.params}, jnp.asarray(ids))
    assert_relative_close(logits, _checkpoints.hf_logits(tuned, ids), name="tuned logits")
    assert not np.allclose(logits, _checkpoints.hf_logits(source, ids), atol=1e-4), "fine-tuning changed nothing"
    assert saved.model_config.vocab_size == _checkpoints.VOCAB


def test_a_run_starts_from_another_runs_weights(runs):
    tmp, _, _, second = runs
    assert f"from {tmp / 'first'}" in second.stdout
    first_losses, second_losses = losses(tmp / "first"), losses(tmp / "second")
    # The second run's first loss is the first run's trained model's, well below where the first began.
    assert second_losses[0] < first_losses[0] - 0.1, (first_losses, second_losses)


def test_bad_sources_name_the_value(tmp_path):
    done = train_lm(tmp_path, f"--init_from={tmp_path}")
    assert done.returncode != 0 and f"--init_from={tmp_path}: no config.json there" in done.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    done = train_lm(tmp_path, f"--save_hf={tmp_path / 'full'}")
    assert done.returncode != 0 and "exists and is not an empty folder" in done.stderr


def test_sample_reads_the_runs_tokenizer(runs):
    tmp = runs[0]
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "sample.py"), f"--workdir={tmp / 'first'}",
                           "--prompt=the state of", "--max_new_tokens=5", "--greedy", "--repeats=1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--- sample 1 of 1 (greedy) ---\nthe state of" in done.stdout
