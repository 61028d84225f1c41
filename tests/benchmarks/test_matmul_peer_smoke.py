"""benchmarks/matmul_peer.py end to end at tiny shapes: rows for every matmul, positive times, the JSON."""

import json
import math
import os
import sys

import pytest

pytest.importorskip("torch")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import matmul_peer  # noqa: E402


def test_rows_and_json(tmp_path, monkeypatch):
    monkeypatch.setattr(matmul_peer, "SHAPES", {"in_proj": (32, 16, 24), "head": (32, 16, 64)})
    out = tmp_path / "mm.json"
    matmul_peer.main(["--out", str(out), "--repeats", "2"])
    saved = json.loads(out.read_text())
    assert saved["environment"]["command"] and saved["threads"] == 1 and saved["torch"]
    assert [r["matmul"] for r in saved["results"]] == ["in_proj", "head"]
    for row in saved["results"]:
        for key in ("xla_fwd_ms", "torch_fwd_ms", "xla_bwd_ms", "torch_bwd_ms", "fwd_ratio", "bwd_ratio"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
