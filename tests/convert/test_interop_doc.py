"""docs/interop.md's Python runs as written: load, generate, fine-tune, save back, reload in transformers.

The checkpoint is a tiny random Mamba-2 with a word-level tokenizer of its
own, the corpus random words, and the training sizes the doc's one line of
sizes replaced by tiny ones. Slow (about a minute of CPU: training compiles).
"""

import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import _checkpoints  # noqa: E402

from effarch.models import LM  # noqa: E402
from effarch.testing import assert_relative_close  # noqa: E402

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "interop.md"
SIZES = "STEPS, BATCH_SIZE, SEQ_LEN = 1000, 8, 1024"
TINY_SIZES = "STEPS, BATCH_SIZE, SEQ_LEN = 3, 2, 16"
WORDS = "the state of art a model reads writes tokens and its weights back".split()


def python_code() -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL))


def word_tokenizer(words):
    """A whitespace word-level tokenizer: id 0 for unknown words, then ``words``."""
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


@pytest.mark.slow
def test_interop_doc_runs_as_written(tmp_path, monkeypatch):
    code = python_code()
    assert SIZES in code, f"{DOC} no longer sets its sizes in the line {SIZES!r}"
    monkeypatch.chdir(tmp_path)
    source = _checkpoints.hf_model("mamba2-untied")
    _checkpoints.save(source, tmp_path / "mamba2")
    word_tokenizer(WORDS).save_pretrained(tmp_path / "mamba2")
    rng = np.random.default_rng(0)
    (tmp_path / "corpus.txt").write_text(" ".join(rng.choice(WORDS, 2000)))

    namespace: dict = {}
    exec(compile(code.replace(SIZES, TINY_SIZES), str(DOC), "exec"), namespace)  # pylint: disable=exec-used

    ids = _checkpoints.tokens()
    tuned_params = {"params": namespace["trainer"].state.params}
    logits, *_ = LM(namespace["config"]).apply(tuned_params, jnp.asarray(ids))
    assert_relative_close(logits, _checkpoints.hf_logits(namespace["tuned"], ids), name="tuned logits")
    assert not np.allclose(logits, _checkpoints.hf_logits(source, ids)), "fine-tuning changed nothing"
