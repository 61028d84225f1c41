"""benchmarks/peer_train.py end to end on the smoke preset: the rows, and parity with transformers.

No timing assertions: only that times are positive and finite. What makes
the comparison one of the same computation is asserted: on the same batch
with the same weights both sides report the same loss (relative 1e-4), the
same loss again after one clipped AdamW update each, and the same prefill
logits.
"""

import json
import math
import os
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

# Slow tier (`pytest -m slow`), like the other benchmark smoke tests: 24 s on the idle 2-core machine,
# ~50 s at load 6, most of it compiling the two train steps.
pytestmark = pytest.mark.slow

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import peer_train  # noqa: E402

LOSS_RTOL = 1e-4


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("peer_train") / "peer_train.json"
    peer_train.main(["--preset", "smoke", "--out", str(path)])
    with open(path) as f:
        return json.load(f)


def test_header(report):
    env = report["environment"]
    for key in ("device", "platform", "command", "commit"):
        assert key in env
    assert set(report["versions"]) == {"jax", "torch", "transformers"}
    assert report["preset"] == "smoke"
    assert report["threads"]["torch"] == report["threads"]["xla"] == peer_train.xla_cpu_threads()
    for when in ("before", "after"):
        assert len(report["load_average"][when]) == 3


def test_one_row_per_arch_size_mode(report):
    rows = report["results"]
    sizes = peer_train.PRESETS["smoke"]["sizes"]
    assert sorted((r["arch"], r["size"], r["mode"]) for r in rows) == sorted(
        (a, s, m) for a in peer_train.ARCHS for s in sizes for m in peer_train.MODES)
    for r in rows:
        for side in ("effarch", "torch"):
            assert r[f"{side}_ms"] > 0 and math.isfinite(r[f"{side}_ms"])
            assert r[f"{side}_tokens_per_s"] == pytest.approx(r["batch"] * r["seq_len"] * 1e3 / r[f"{side}_ms"])
            assert len(r[f"{side}_times_ms"]) == peer_train.PRESETS["smoke"]["repeats"]
        assert r["ratio"] == pytest.approx(r["effarch_tokens_per_s"] / r["torch_tokens_per_s"])
        assert r["params"] > 0


@pytest.mark.parametrize("arch", peer_train.ARCHS)
def test_both_sides_compute_the_same_loss(report, arch):
    (row,) = [r for r in report["results"] if r["arch"] == arch and r["mode"] == "train"]
    assert math.isfinite(row["loss_effarch"])
    assert row["loss_effarch"] == pytest.approx(row["loss_torch"], rel=LOSS_RTOL)
    # One update later: the gradients, the clipping and AdamW agree as well.
    assert row["loss_after_update_effarch"] != row["loss_effarch"]
    assert row["loss_after_update_effarch"] == pytest.approx(row["loss_after_update_torch"], rel=LOSS_RTOL)


@pytest.mark.parametrize("arch", peer_train.ARCHS)
def test_both_sides_prefill_the_same_logits(report, arch):
    (row,) = [r for r in report["results"] if r["arch"] == arch and r["mode"] == "prefill"]
    assert row["prefill_logits_rel_rmse"] < 2e-3  # docs/design.md §5, float32
