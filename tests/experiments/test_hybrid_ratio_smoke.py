"""experiments/hybrid_ratio.py --preset smoke: rows and plots appear, a rerun skips finished rows."""

import io
import json

import pytest

from effarch.testing import load_experiment

# Slow tier (`pytest -m slow`): 144 s on the loaded 2-core machine, most of it compiling the
# smoke preset's models; the default tier keeps experiments/mqar.py's smoke test.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hybrid_ratio():
    return load_experiment("hybrid_ratio")


def test_layer_patterns(hybrid_ratio):
    pattern = hybrid_ratio.layer_pattern
    assert pattern(16, 2, "even") == "MMMMMMMAMMMMMMMA"
    assert pattern(16, 2, "first") == "AAMMMMMMMMMMMMMM"
    assert pattern(16, 2, "last", "D") == "DDDDDDDDDDDDDDAA"
    assert pattern(16, 2, "middle") == "MMMMMMMAAMMMMMMM"
    assert pattern(16, 0, "even") == "M" * 16 and pattern(16, 16, "even") == "A" * 16
    assert hybrid_ratio.num_attention(16, hybrid_ratio.parse_fraction("1/16")) == 1


def test_smoke_preset_writes_rows_and_plots_then_resumes(hybrid_ratio, tmp_path):
    out = io.StringIO()
    rows = hybrid_ratio.run("smoke", tmp_path, stream=out)
    preset = hybrid_ratio.PRESETS["smoke"]
    expected = len(preset.fractions) * len(hybrid_ratio.TASKS)
    assert len(rows) == expected, out.getvalue()
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    for row in rows:
        assert row["params"] > 0 and row["d_ff"] > 0 and row["steps"] == 2 and "device" in row
        assert ("bits_per_byte" in row) == (row["task"] == "lm")
        assert 0.0 <= row.get("accuracy", 0.0) <= 1.0
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == expected and all(json.loads(line) for line in lines)
    for name in ("hybrid_ratio.png", "hybrid_placement.png"):
        assert (tmp_path / name).stat().st_size > 1000

    again = io.StringIO()
    rows_again = hybrid_ratio.run("smoke", tmp_path, stream=again)
    assert len(rows_again) == expected
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == expected
    assert f"{expected} of {expected} runs already" in again.getvalue()
