"""The training loop on a toy LM: loss, microbatching, metrics, checkpoints, config guard."""

import importlib.util
import json
import math
import re
import shutil

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch import data, train
from toy_model import ToyConfig, ToyLM

SEQ = 32


@pytest.fixture(scope="module")
def corpus():
    docs = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n".encode() * (1 + i % 5) for i in range(200)]
    return data.split(data.from_documents(docs, [str(i) for i in range(200)]), 0.1)


def _trainer(workdir, corpus, model_config=ToyConfig(), init_params=None, **overrides):
    fields = dict(steps=24, batch_size=4, seq_len=SEQ, lr=1e-2, warmup_steps=2, log_every=4, eval_every=12,
                  eval_batches=2, ckpt_every=8, keep_checkpoints=2)
    config = train.TrainConfig(**{**fields, **overrides})
    train_split, held_out = corpus
    shape = dict(batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed)
    return train.Trainer.create(
        model=ToyLM(model_config), model_config=model_config, config=config,
        train_data=data.PackedText(train_split, **shape),
        eval_data=data.PackedText(held_out, **shape, shuffle=False), workdir=workdir, init_params=init_params,
    )


def test_cross_entropy_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, size=(2, 5))
    mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
    total, count = train.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(total, (nll * mask).sum(), rtol=1e-6)
    assert float(count) == mask.sum()


def test_gradient_accumulation_equals_the_full_batch(corpus):
    model = ToyLM(ToyConfig())
    batch = data.PackedText(corpus[0], batch_size=4, seq_len=SEQ, seed=0).batch(0)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch["tokens"])["params"])
    results = []
    for accum in (1, 4):
        config = train.TrainConfig(steps=10, batch_size=4, seq_len=SEQ, warmup_steps=1, grad_accum=accum)
        optimizer = train.make_optimizer(config)
        state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
        step = jax.jit(train.make_train_step(model, optimizer, config, train.learning_rate(config)))
        with train.make_mesh((1, 1, 1)):
            results.append(step(state, batch))
    for state, metrics in results[1:]:
        chex.assert_trees_all_close(state.params, results[0][0].params, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(metrics["loss"], results[0][1]["loss"], rtol=1e-6)
        np.testing.assert_allclose(metrics["grad_norm"], results[0][1]["grad_norm"], rtol=1e-5)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, corpus):
    """A finished 24-step run: its workdir and the records ``run`` returned."""
    workdir = tmp_path_factory.mktemp("full")
    trainer = _trainer(workdir, corpus)
    records = trainer.run()
    trainer.close()
    return workdir, records


def test_training_lowers_the_loss_and_writes_metrics_and_checkpoints(full_run):
    workdir, records = full_run
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert lines == records
    train_lines = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_lines] == [1, 4, 8, 12, 16, 20, 24]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "step_s", "aux_loss", "toy_scalar"} <= set(train_lines[0])
    assert all(r["time"].endswith("+00:00") for r in records)  # UTC timestamps on every line
    assert train_lines[-1]["loss"] < train_lines[0]["loss"] - 1.0
    assert math.isclose(train_lines[0]["loss"], math.log(256), rel_tol=0.05)  # near-uniform at init
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [12, 24]
    assert math.isclose(evals[-1]["eval_bpb"], evals[-1]["eval_loss"] / math.log(2))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["16", "24"]  # keep_checkpoints=2
    assert json.loads((workdir / "config.json").read_text())["model"]["d_model"] == 32
    if importlib.util.find_spec("tensorboardX") is not None:
        assert any(p.name.startswith("events.out.tfevents") for p in (workdir / "tb").iterdir())


def test_resuming_continues_where_the_checkpoint_left_off(tmp_path, full_run, corpus):
    # Pretend the run died after step 16's checkpoint: the later metrics lines stay, step 24's is gone.
    shutil.copytree(full_run[0], tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "checkpoints" / "24")
    resumed = _trainer(tmp_path, corpus)
    assert int(resumed.state.step) == 16
    records = resumed.run()
    resumed.close()
    assert [r["step"] for r in records] == [r["step"] for r in full_run[1]]
    for got, want in zip(records, full_run[1]):
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in want:
                np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=f"{key} at step {want['step']}")


def test_a_workdir_with_another_config_is_refused_and_left_untouched(tmp_path, full_run, corpus):
    shutil.copytree(full_run[0], tmp_path, dirs_exist_ok=True)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "tb" not in p.parts}
    with pytest.raises(ValueError) as error:
        _trainer(tmp_path, corpus, model_config=ToyConfig(d_model=48), lr=5e-3)
    message = str(error.value)
    assert "config.model.d_model: saved 32, now 48" in message
    assert "config.train.lr: saved 0.01, now 0.005" in message
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "tb" not in p.parts}
    assert after == before
    # Bookkeeping fields may change on resumption: this restores step 24.
    resumed = _trainer(tmp_path, corpus, log_every=2, eval_every=6)
    assert int(resumed.state.step) == 24
    resumed.close()


def test_data_of_the_wrong_shape_is_refused(tmp_path, corpus):
    with pytest.raises(ValueError, match=r"train_data yields \[4,32\] batches; expected \[batch_size,seq_len\] = \[4,16\]"):
        config = train.TrainConfig(steps=4, batch_size=4, seq_len=16, warmup_steps=1)
        train.Trainer.create(model=ToyLM(ToyConfig()), model_config=ToyConfig(), config=config,
                             train_data=data.PackedText(corpus[0], batch_size=4, seq_len=32, seed=0),
                             eval_data=None, workdir=tmp_path)


def _event_files(workdir):
    return sorted(p.name for p in (workdir / "tb").iterdir()) if (workdir / "tb").is_dir() else []


def test_a_finished_run_trains_nothing_and_writes_no_new_events(tmp_path, full_run, corpus, caplog):
    shutil.copytree(full_run[0], tmp_path, dirs_exist_ok=True)
    events = _event_files(tmp_path)
    metrics = (tmp_path / "metrics.jsonl").read_text()
    rerun = _trainer(tmp_path, corpus)
    with caplog.at_level("INFO", logger="effarch.train"):
        records = rerun.run()
    rerun.close()
    assert "already finished: step 24 of 24" in caplog.text
    assert records == full_run[1]
    assert (tmp_path / "metrics.jsonl").read_text() == metrics
    assert _event_files(tmp_path) == events


def test_a_run_that_fails_in_its_first_step_leaves_no_workdir(tmp_path, corpus):
    workdir = tmp_path / "run"
    trainer = _trainer(workdir, corpus)
    assert (workdir / "config.json").exists()

    def out_of_memory(state, batch):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")

    trainer.train_step = out_of_memory
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        trainer.run()
    assert not workdir.exists()


def test_a_run_refused_at_creation_leaves_the_folder_it_found(tmp_path, corpus, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")

    def no_mesh(spec):
        raise ValueError(f"mesh {spec} needs 8 devices; found 1")

    # Fails after config.json is written: it must be taken back.
    monkeypatch.setattr(train.loop.sharding, "make_mesh", no_mesh)
    with pytest.raises(ValueError, match="needs 8 devices"):
        _trainer(tmp_path, corpus)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    with pytest.raises(ValueError, match="needs 8 devices"):
        _trainer(tmp_path / "new", corpus)
    assert not (tmp_path / "new").exists()


def test_init_params_start_a_fresh_run_and_are_checked(tmp_path, corpus):
    first = _trainer(tmp_path / "a", corpus, steps=4, ckpt_every=4, eval_batches=0)
    first.run()
    trained = jax.device_get(first.state.params)
    first.close()
    second = _trainer(tmp_path / "b", corpus, init_params=trained, steps=4, eval_batches=0)
    chex.assert_trees_all_equal(jax.device_get(second.state.params), trained)
    assert int(second.state.step) == 0
    second.close()
    path, leaf = jax.tree_util.tree_flatten_with_path(trained)[0][0]
    name = jax.tree_util.keystr(path)
    wrong = jax.tree_util.tree_map_with_path(
        lambda p, x: np.zeros((*x.shape, 2), x.dtype) if jax.tree_util.keystr(p) == name else x, trained)
    with pytest.raises(ValueError, match=rf"init_params{re.escape(name)} has shape"):
        _trainer(tmp_path / "c", corpus, init_params=wrong, eval_batches=0)
    assert not (tmp_path / "c").exists()  # nothing left behind by a run that never started
    with pytest.raises(ValueError, match="init_params do not match the model: missing"):
        _trainer(tmp_path / "d", corpus, init_params={"other": np.zeros(3)}, eval_batches=0)
