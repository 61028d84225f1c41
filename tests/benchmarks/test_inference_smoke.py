"""benchmarks/inference.py end to end on a tiny setting: the JSON's shape and sane values.

No timing assertions: only that times are positive and finite, and that the
recurrent model's decode cache does not grow with the context while the
Transformer's grows linearly.
"""

import json
import math
import os
import sys

import pytest

# Slow tier (`pytest -m slow`): 92 s on the loaded 2-core machine, most of it compiling the
# smoke preset's models; the default tier keeps experiments/mqar.py's smoke test.
pytestmark = pytest.mark.slow

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import inference  # noqa: E402

MODELS = ("transformer", "mamba2")
CONTEXTS = (8, 16)
BATCHES = (1, 2)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("inference")
    inference.main(["--preset", "smoke", "--out", str(out), "--models", ",".join(MODELS), "--n_layers", "1",
                    "--contexts", ",".join(map(str, CONTEXTS)), "--batches", ",".join(map(str, BATCHES)),
                    "--decode_steps", "2", "--repeats", "1"])
    with open(out / "inference.json") as f:
        return out, json.load(f)


def test_files_and_header(report):
    out, data = report
    assert sorted(os.listdir(out)) == ["inference.json", "inference.png"]
    env = data["environment"]
    for key in ("device", "platform", "jax", "flax", "command", "commit"):
        assert key in env
    assert data["preset"] == "smoke"
    assert data["peak_method"]
    assert set(data["configs"]) == set(MODELS)


def test_one_row_per_model_batch_context(report):
    rows = report[1]["results"]
    keys = sorted((r["model"], r["batch"], r["context"]) for r in rows)
    assert keys == sorted((m, b, c) for m in MODELS for b in BATCHES for c in CONTEXTS)
    for r in rows:
        assert r["status"] == "ok", r
        assert r["decode_ms_per_token"] > 0 and math.isfinite(r["decode_ms_per_token"])
        assert r["decode_tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["decode_ms_per_token"])
        assert r["cache_bytes"] > 0
        assert r["max_len"] >= r["context"]
        if r["batch"] == 1:  # prefill is timed at batch 1
            assert r["prefill_ms"] > 0 and math.isfinite(r["prefill_ms"])
        assert r["peak_method"] == report[1]["peak_method"]


def _cache(rows, model, batch, context):
    (row,) = [r for r in rows if (r["model"], r["batch"], r["context"]) == (model, batch, context)]
    return row["cache_bytes"]


def test_cache_bytes_scale_as_expected(report):
    rows = report[1]["results"]
    lo, hi = CONTEXTS
    for batch in BATCHES:
        # Recurrent state: independent of the context.
        assert _cache(rows, "mamba2", batch, lo) == _cache(rows, "mamba2", batch, hi)
        # KV cache: linear in the context (up to the scalar position counters).
        t_lo, t_hi = _cache(rows, "transformer", batch, lo), _cache(rows, "transformer", batch, hi)
        assert t_hi - t_lo == pytest.approx(t_lo * (hi - lo) / lo, rel=0.05)
    for model in MODELS:  # every cache is per sequence: linear in the batch
        assert _cache(rows, model, 2, hi) == pytest.approx(2 * _cache(rows, model, 1, hi), rel=0.05)


def test_summary_and_allocated_vs_filled(report):
    data = report[1]
    summary = data["summary"]
    assert set(summary[f"cache_bytes_over_transformer_at_{CONTEXTS[-1]}"]) == set(MODELS)
    assert summary[f"cache_bytes_over_transformer_at_{CONTEXTS[-1]}"]["transformer"] == 1.0
    allocated = data["allocated_vs_filled"]
    assert [r["model"] for r in allocated] == ["transformer", "transformer"]  # only models with attention
    assert allocated[0]["filled"] == allocated[1]["filled"] == CONTEXTS[0]
    assert allocated[0]["max_len"] < allocated[1]["max_len"]
    assert allocated[0]["cache_bytes_allocated"] < allocated[1]["cache_bytes_allocated"]
    assert all(r["decode_ms_per_token"] > 0 for r in allocated)


def test_over_budget_is_a_row_not_a_gap(tmp_path):
    result = inference.main(["--preset", "smoke", "--out", str(tmp_path), "--models", "mamba2", "--n_layers", "1",
                             "--contexts", "8", "--batches", "1", "--decode_steps", "1", "--repeats", "1",
                             "--max_gib", "1e-6"])
    (row,) = result["rows"]
    assert row["status"] == inference.DOES_NOT_FIT and "max_gib" in row["reason"]
    assert row["decode_ms_per_token"] is None
