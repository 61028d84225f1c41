"""check_or_write_config: a run saved before a config class gained a field still resumes."""

import json

import pytest

from effarch.models import LMConfig
from effarch.train import TrainConfig, check_or_write_config

MODEL = LMConfig(d_model=32, n_layers=2, pattern="MA")
TRAIN = TrainConfig(steps=4, batch_size=2, seq_len=16, warmup_steps=1)
MAY_DIFFER = {"train": TrainConfig.RESUMABLE_CHANGES}


def save_without(workdir, drop):
    """Writes the run's config.json, then removes ``drop`` (paths like ``("model", "moe", "d_ff")``) from it."""
    check_or_write_config(workdir, {"model": MODEL, "train": TRAIN}, may_differ=MAY_DIFFER, write=True)
    path = workdir / "config.json"
    saved = json.loads(path.read_text())
    for *parents, field in drop:
        node = saved
        for key in parents:
            node = node[key]
        del node[field]
    path.write_text(json.dumps(saved))


def check(workdir, model):
    check_or_write_config(workdir, {"model": model, "train": TRAIN}, may_differ=MAY_DIFFER, write=False)


@pytest.mark.parametrize("drop", [[("model", "max_len")], [("model", "moe", "d_ff")],
                                  [("model", "moe")], [("model", "layer_options"), ("train", "seed")]],
                         ids=["field", "nested_field", "nested_config", "factory_and_train"])
def test_a_field_absent_from_the_saved_config_counts_as_its_default(tmp_path, drop):
    save_without(tmp_path, drop)
    check(tmp_path, MODEL)  # the current values are the defaults: resumes


def test_an_absent_field_whose_current_value_is_not_the_default_is_named(tmp_path):
    save_without(tmp_path, [("model", "max_len"), ("model", "moe", "top_k")])
    changed = LMConfig(d_model=32, n_layers=2, pattern="MA", max_len=64, moe={"top_k": 1})
    with pytest.raises(ValueError) as error:
        check(tmp_path, changed)
    assert "config.model.max_len: saved 2048, now 64" in str(error.value)
    assert "config.model.moe.top_k: saved 2, now 1" in str(error.value)


def test_an_absent_required_field_still_differs(tmp_path):
    save_without(tmp_path, [("model", "d_model")])
    with pytest.raises(ValueError, match=r"config\.model\.d_model: saved '<absent>', now 32"):
        check(tmp_path, MODEL)
