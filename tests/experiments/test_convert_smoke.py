"""experiments/convert.py --preset smoke: every stage's row and the plot appear; a rerun redoes nothing."""

import io
import json

import pytest

from effarch.testing import load_experiment

# Slow tier (`pytest -m slow`): 41 s on the 2-core machine at load ~3 (about 3 minutes for the full smoke
# preset's four targets), nearly all of it compiling the training, evaluation and decoding programs.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def convert():
    return load_experiment("convert")


def test_bad_flags_name_the_value(convert, tmp_path):
    with pytest.raises(ValueError, match=r"--targets='gla,rwkv7'; expected a comma-separated subset of "
                                         r"linear_attention,gla,gated_deltanet,mamba2"):
        convert.run("smoke", tmp_path, targets=["gla", "rwkv7"])
    with pytest.raises(ValueError, match=r"--kl_weight=-1.*>= 0"):
        convert.run("smoke", tmp_path, kl_weight=-1.0)
    with pytest.raises(ValueError, match=r"--preset='laptop'"):
        convert.run("laptop", tmp_path)
    with pytest.raises(ValueError, match=r"--layers='2'; expected distinct indices in 0 \.\. 1"):
        convert.run("smoke", tmp_path, layers="2")
    assert not (tmp_path / "results.jsonl").exists()


def test_smoke_preset_writes_rows_and_plot_then_resumes(convert, tmp_path):
    out = io.StringIO()
    rows = convert.run("smoke", tmp_path, targets=["linear_attention", "mamba2"], layers="0", stream=out)
    stages = [(r["target"], r["stage"]) for r in rows]
    assert stages == [("attention", "teacher")] + [(t, s) for t in ("linear_attention", "mamba2")
                                                   for s in convert.STAGES], out.getvalue()
    preset = convert.PRESETS["smoke"]
    by = {(r["target"], r["stage"]): r for r in rows}
    for row in rows:
        assert 0 < row["bits_per_byte"] < 9 and "device" in row and "commit" in row and "command" in row
    teacher = by[("attention", "teacher")]
    assert teacher["steps"] == preset.teacher_steps and teacher["cache_bytes"] > 0
    for target in ("linear_attention", "mamba2"):
        conv = by[(target, "converted")]
        assert conv["pattern"][0] != "A" and conv["pattern"][1] == "A"  # layer 1 stays attention
        assert conv["converted_layers"] == [0] and 0 < conv["new_params"] < conv["params"]
        assert conv["decode_ms_per_token"] > 0
        assert by[(target, "scratch")]["tokens"] == by[(target, "finetune")]["tokens"] > 0
        assert by[(target, "finetune")]["kl_weight"] == preset.kl_weight
    assert (tmp_path / "convert.png").stat().st_size > 1000
    table = convert.table(rows)
    assert "attention teacher" in table and "| mamba2 `MA` | 0 |" in table

    again = io.StringIO()
    rows_again = convert.run("smoke", tmp_path, targets=["linear_attention", "mamba2"], layers="0", stream=again)
    assert len(rows_again) == len(rows)
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(rows)
    assert f"{len(rows)} of {len(rows)} rows already" in again.getvalue()
    assert all(json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines())
