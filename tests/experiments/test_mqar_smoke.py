"""experiments/mqar.py end to end on its smoke preset: rows, plots, resumption, error rows."""

import io
import json

import pytest

from effarch.testing import load_experiment


@pytest.fixture(scope="module")
def mqar():
    return load_experiment("mqar")


def test_smoke_sweep_writes_rows_and_plots_and_resumes(mqar, tmp_path):
    out = io.StringIO()
    rows = mqar.run_sweep("smoke", tmp_path, stream=out)
    preset = mqar.PRESETS["smoke"]
    cells = len(preset.mixers) * len(preset.d_models) * len(preset.tasks)
    assert len(rows) == cells
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == cells
    for row in map(json.loads, lines):
        assert row["status"] == "ok", row.get("error")
        for field in ("mixer", "mixer_name", "mixer_options", "d_model", "seq_len", "num_kv_pairs", "vocab_size",
                      "best_lr", "accuracy", "settings", "params", "state_bytes", "steps", "stopped_early",
                      "wall_s", "device", "versions", "commit", "command", "date"):
            assert field in row, field
        assert 0.0 <= row["accuracy"] <= 1.0
        assert len(row["settings"]) == len(preset.lrs)
        assert all(0.0 <= s["accuracy"] <= 1.0 for s in row["settings"])
        assert row["best_lr"] in preset.lrs
        assert row["state_bytes"] > 0 and row["params"] > 0 and 1 <= row["steps"] <= preset.steps
    # Attention's state is its KV cache: keys and values of every position, float32.
    attention = next(json.loads(line) for line in lines if json.loads(line)["mixer"] == "attention")
    assert attention["state_bytes"] >= 2 * attention["seq_len"] * attention["d_model"] * 4
    for name in ("accuracy_vs_d_model.png", "accuracy_vs_state.png", "table.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "[2/2]" in out.getvalue()

    # A second run finds every cell done: no row added, and it says so.
    again = io.StringIO()
    rows = mqar.run_sweep("smoke", tmp_path, stream=again)
    assert len(rows) == cells
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == cells
    assert f"skipped {cells} finished cell(s)" in again.getvalue()


def test_a_failing_cell_is_recorded_and_the_sweep_goes_on(mqar, tmp_path, monkeypatch):
    def flaky(key, *args, **kwargs):  # no training: the failure handling is under test
        if key["mixer"] == "attention":
            raise RuntimeError("boom")
        return {"status": "ok", "accuracy": 0.5, "final_accuracy": 0.5, "best_lr": 1e-3, "settings": [],
                "params": 1, "state_bytes": 8, "model_state_bytes": 16, "steps": 1, "max_steps": 1,
                "stopped_early": False, "curve": [], "wall_s": 0.0}

    monkeypatch.setattr(mqar, "run_cell", flaky)
    out = io.StringIO()
    rows = mqar.run_sweep("smoke", tmp_path, stream=out)
    by_mixer = {r["mixer"]: r for r in rows}
    assert by_mixer["attention"]["status"] == "error" and "boom" in by_mixer["attention"]["error"]
    assert by_mixer["based"]["status"] == "ok"
    assert "1 cell(s) failed" in out.getvalue()
