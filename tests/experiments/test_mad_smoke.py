"""experiments/mad.py: the smoke preset end to end, resumption, and error rows."""

import io
import json

import pytest

from effarch.testing import load_experiment

# Slow tier (`pytest -m slow`): 150 s on the loaded 2-core machine, most of it compiling the
# smoke preset's models; the default tier keeps experiments/mqar.py's smoke test.
pytestmark = pytest.mark.slow


mad = load_experiment("mad")

ROW_FIELDS = {"task", "mixer", "preset", "task_knobs", "protocol", "status", "accuracy", "best_lr",
              "best_weight_decay", "settings", "params", "state_bytes", "steps", "wall_s", "layers", "device",
              "versions", "commit", "date"}


def test_smoke_preset_writes_rows_table_and_heatmap_and_resumes(tmp_path):
    out = io.StringIO()
    rows = mad.run_sweep("smoke", tmp_path, stream=out)
    spec = mad.PRESETS["smoke"]
    cells = {(t, m) for t in spec["tasks"] for m in spec["mixers"] + spec["hybrids"]}
    assert {(r["task"], r["mixer"]) for r in rows} == cells and len(rows) == len(cells)
    for r in rows:
        assert r["status"] == "ok", r.get("traceback")
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert 0.0 <= r["accuracy"] <= 1.0
        assert len(r["settings"]) == len(spec["settings"])
        assert all(0.0 <= s["accuracy"] <= 1.0 for s in r["settings"])
        assert (r["best_lr"], r["best_weight_decay"]) in [tuple(s) for s in spec["settings"]]
        assert r["params"] > 0 and r["state_bytes"] > 0 and r["steps"] == spec["steps"]
    assert "[1/" in out.getvalue() and "ETA" in out.getvalue()

    table = json.loads((tmp_path / "table.json").read_text())
    assert table["tasks"] == [t for t in mad.TASKS if t in spec["tasks"]]
    assert {r["mixer"] for r in table["rows"]} == {m for _, m in cells}
    assert all(r["mean_rank"] is not None and 1.0 <= r["mean_rank"] <= len(table["rows"]) for r in table["rows"])
    markdown = (tmp_path / "table.md").read_text()
    assert "mean rank" in markdown and markdown.count("\n") == 2 + len(table["rows"])
    assert (tmp_path / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = io.StringIO()
    rows_again = mad.run_sweep("smoke", tmp_path, stream=again)
    assert len(rows_again) == len(rows), "a rerun must not retrain finished cells"
    assert f"{len(cells)} of {len(cells)} cells already" in again.getvalue()


def test_a_failing_cell_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    calls = []

    def boom(task, mixer, *args, **kwargs):
        calls.append((task, mixer))
        raise RuntimeError(f"no {mixer} today")

    monkeypatch.setattr(mad, "run_cell", boom)
    rows = mad.run_sweep("smoke", tmp_path, mixers=["attention", "attention+gated_deltanet"],
                         tasks=["compression"], stream=io.StringIO())
    assert len(calls) == 2 and [r["status"] for r in rows] == ["error", "error"]
    assert "RuntimeError: no attention today" in rows[0]["error"] and rows[0]["traceback"]
    table = json.loads((tmp_path / "table.json").read_text())
    assert all(r["errors"] == ["compression"] and r["mean_rank"] is None for r in table["rows"])
    assert "error" in (tmp_path / "table.md").read_text()
    # Error cells are retried on a rerun.
    mad.run_sweep("smoke", tmp_path, mixers=["attention"], tasks=["compression"], stream=io.StringIO())
    assert len(calls) == 3


def test_table_ranks_share_ties():
    rows = [{"task": t, "mixer": m, "status": "ok", "accuracy": a}
            for t, m, a in [("compression", "a", 0.5), ("compression", "b", 0.5), ("compression", "c", 0.1),
                            ("memorization", "a", 0.9), ("memorization", "b", 0.2), ("memorization", "c", 0.3)]]
    table = mad.table(rows)
    ranks = {r["mixer"]: r["mean_rank"] for r in table["rows"]}
    assert ranks == {"a": (1.5 + 1) / 2, "b": (1.5 + 3) / 2, "c": (3 + 2) / 2}
    assert [r["mixer"] for r in table["rows"]] == ["a", "b", "c"]
