"""benchmarks/early_exit.py end to end on a 2-step run with one exit: the JSON's rows and their invariants.

No timing assertions: only that times are positive and finite, that threshold 1.0
uses every layer and scores what the model without exits scores, and that the
static rows' depths are the exits' depths. Slow tier (`pytest -m slow`): 32 s on the
loaded 2-core machine, most of it training and compiling the tiny run.
"""

import json
import math
import os
import sys

import pytest

from effarch import data, train
from effarch.models import LM, LMConfig

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import early_exit as bench  # noqa: E402

pytestmark = pytest.mark.slow

TEXT = b"def main(argv):\n    return len(argv) + 1\n\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    config = LMConfig.preset("tiny", n_layers=2, pattern="MA", early_exit=(0,))
    docs = [TEXT * (i + 5) for i in range(40)]
    corpus = data.from_documents(docs, [f"doc{i}" for i in range(40)])
    train_config = train.TrainConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=1, log_every=1,
                                     eval_batches=0, ckpt_every=1, max_corpus_bytes=300_000)
    workdir = tmp_path_factory.mktemp("run") / "run"
    trainer = train.Trainer.create(model=LM(config=config), model_config=config, config=train_config,
                                   train_data=data.PackedText(corpus, batch_size=2, seq_len=16, seed=0),
                                   eval_data=None, workdir=workdir)
    trainer.run()
    trainer.close()
    out = tmp_path_factory.mktemp("out")
    bench.main(["--workdir", str(workdir), "--out", str(out), "--smoke", "--prompt_len", "4",
                "--measures", "max_prob,saturation"])
    with open(out / "early_exit.json") as f:
        return out, json.load(f)


def test_files_and_provenance(report):
    out, result = report
    assert sorted(os.listdir(out)) == ["early_exit.json", "early_exit.png"]
    env = result["environment"]
    assert env["command"] and env["jax"] and env["device"]
    assert result["setup"]["step"] == 2 and result["setup"]["model"]["early_exit"] == [0]


def test_rows_keep_their_invariants(report):
    _, result = report
    rows = result["results"]
    static = [r for r in rows if r["kind"] == "static exit"]
    assert [r["mean_layers"] for r in static] == [1.0, 2.0]
    full = next(r for r in rows if r["kind"] == "full model")
    exits = [r for r in rows if r["kind"] == "early exit"]
    assert {r["measure"] for r in exits} == {"max_prob", "saturation"}
    for r in exits:
        assert math.isfinite(r["bpb"]) and r["ms_per_token"] > 0 and 1.0 <= r["mean_layers"] <= 2.0
        assert math.isclose(sum(r["exit_fraction"]), 1.0, rel_tol=1e-6)
        if r["threshold"] == 1.0:
            assert r["mean_layers"] == 2.0 and r["gen_mean_layers"] == 2.0
            assert math.isclose(r["bpb"], full["bpb"], rel_tol=1e-4)


def test_bad_flags_name_the_value(report, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--measures", "entropy"])
    assert "--measures='entropy'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="has no early exits|does not exist"):
        bench.main(["--workdir", "/nonexistent/run", "--smoke"])
