"""effarch.train.sweep: vmapped settings against a plain optax loop, run records, label positions."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effarch.models import LM, LMConfig
from effarch.train import sweep
from effarch.train.optim import decay_mask

IGNORE = sweep.IGNORE


def _task(n=96, t=12, vocab=8, seed=0):
    """Copy the token three steps back at the last four positions; other positions unlabelled."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, vocab, (n, t)).astype(np.int32)
    y = np.full((n, t), IGNORE, np.int32)
    y[:, -4:] = x[:, -7:-3]
    return x, y


def _config(vocab=8):
    return LMConfig(vocab_size=vocab, d_model=16, n_layers=1, pattern="A", mlp="none", max_len=32,
                    mixers={"A": ("attention", {"num_heads": 2})})


def test_label_positions_match_a_loop():
    targets = np.full((4, 7), IGNORE, np.int32)
    targets[0, [1, 5]] = [3, 4]
    targets[2, [0, 2, 6]] = [1, 2, 5]
    positions, labels = sweep.label_positions(targets)
    assert positions.shape == labels.shape == (4, 3)
    for row in range(4):
        expected = [t for t in range(7) if targets[row, t] != IGNORE]
        n = len(expected)
        np.testing.assert_array_equal(positions[row, :n], expected)
        np.testing.assert_array_equal(labels[row, :n], targets[row, expected])
        assert (labels[row, n:] == IGNORE).all()


def test_logit_positions_select_the_full_logits():
    cfg = _config()
    model = LM(config=cfg)
    tokens = jnp.asarray(_task(n=3)[0])
    params = model.init(jax.random.key(0), tokens)
    full, _, _ = model.apply(params, tokens)
    positions = jnp.asarray([[0, 5, 11], [2, 2, 3], [11, 10, 9]])
    picked, _, _ = model.apply(params, tokens, logit_positions=positions)
    np.testing.assert_allclose(picked, jnp.take_along_axis(full, positions[..., None], axis=1), atol=1e-6)
    with pytest.raises(ValueError, match="logit_positions has shape"):
        model.apply(params, tokens, logit_positions=positions[0])


def test_each_vmapped_setting_equals_a_plain_optax_run():
    """Two settings trained side by side reach what a plain, separate optax.adamw loop reaches."""
    x, y = _task()
    cfg = _config()
    model = LM(config=cfg)
    settings = [sweep.Setting(lr=3e-3, weight_decay=0.1), sweep.Setting(lr=1e-2, weight_decay=0.0)]
    steps, batch = 6, 16
    result = sweep.train_settings(model, settings, train=(x, y), test=(x, y), batch_size=batch, steps=steps,
                                  eval_every=steps, target_accuracy=None, grad_clip=0.0, warmup_steps=2)

    # The reference: one setting at a time, full logits, optax's own schedule, the same batches.
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    batches = [order[i * batch:(i + 1) * batch] for i in range(steps)]
    for setting, row in zip(settings, result["settings"]):
        params = model.init(jax.random.key(0), jnp.asarray(x[:1]))["params"]
        tx = optax.adamw(lambda s, lr=setting.lr: _reference_rate(s, lr, steps, 2),
                         weight_decay=setting.weight_decay, mask=decay_mask)
        opt = tx.init(params)

        def loss_fn(p, xb, yb):
            logits, _, _ = model.apply({"params": p}, xb)
            mask = yb != IGNORE
            logp = jax.nn.log_softmax(logits, -1)
            nll = -jnp.take_along_axis(logp, jnp.where(mask, yb, 0)[..., None], -1)[..., 0]
            return jnp.sum(nll * mask) / jnp.sum(mask)

        for rows in batches:
            grads = jax.grad(loss_fn)(params, jnp.asarray(x[rows]), jnp.asarray(y[rows]))
            updates, opt = tx.update(grads, opt, params)
            params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(loss_fn(params, jnp.asarray(x), jnp.asarray(y)), row["loss"], rtol=2e-4)
    assert result["steps"] == steps and result["params"] > 0
    assert result["best"] in result["settings"]


def _reference_rate(step, lr, steps, warmup):
    """Linear warmup over ``warmup`` steps (reaching lr at the last), then cosine to 0, written out."""
    step = jnp.asarray(step, jnp.float32)
    warm = lr * (step + 1) / warmup
    progress = jnp.clip((step - warmup) / (steps - warmup), 0, 1)
    return jnp.where(step < warmup, warm, lr * 0.5 * (1 + jnp.cos(jnp.pi * progress)))


def test_learns_the_copy_task_and_stops_early():
    x, y = _task(n=512, t=12)
    result = sweep.train_settings(LM(config=_config()), [sweep.Setting(lr=1e-2)], train=(x[:448], y[:448]),
                                  test=(x[448:], y[448:]), batch_size=32, steps=600, eval_every=50,
                                  target_accuracy=0.95)
    assert result["best"]["best_accuracy"] >= 0.95
    assert result["stopped_early"] and result["steps"] < 600


def test_bad_arguments_name_the_value():
    x, y = _task(n=8)
    model = LM(config=_config())
    with pytest.raises(ValueError, match="batch_size=16 exceeds the 8"):
        sweep.train_settings(model, [sweep.Setting(lr=1e-3)], train=(x, y), test=(x, y), batch_size=16, steps=1,
                             eval_every=1)
    with pytest.raises(ValueError, match="lr=-1"):
        sweep.Setting(lr=-1)
    with pytest.raises(ValueError, match="select='best'"):
        sweep.train_settings(model, [sweep.Setting(lr=1e-3)], train=(x, y), test=(x, y), batch_size=4, steps=1,
                             eval_every=1, select="best")


def test_results_log_resumes_and_drops_a_partial_last_line(tmp_path):
    path = tmp_path / "results.jsonl"
    log = sweep.ResultsLog(path, key_fields=("mixer", "d_model"))
    log.append({"mixer": "attention", "d_model": 64, "accuracy": np.float32(0.5)})
    with path.open("a") as f:
        f.write('{"mixer": "mamba2", "d_mo')  # a writer killed mid-line
    reopened = sweep.ResultsLog(path, key_fields=("mixer", "d_model"))
    assert reopened.has({"mixer": "attention", "d_model": 64})
    assert not reopened.has({"mixer": "mamba2", "d_model": 64})
    reopened.append({"mixer": "mamba2", "d_model": 64, "accuracy": 0.25})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["mixer"] for r in rows] == ["attention", "mamba2"] and rows[0]["accuracy"] == 0.5
    with pytest.raises(ValueError, match=r"lacks key field\(s\) \['d_model'\]"):
        reopened.append({"mixer": "gla"})


def test_text_examples_are_shifted_disjoint_windows():
    data = np.arange(1000) % 251
    inputs, targets = sweep.text_examples(data, seq_len=9, num_rows=50, seed=3)
    assert inputs.shape == targets.shape == (50, 9)
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    starts = {int(np.flatnonzero(data == row[0])[0]) for row in inputs}  # values repeat only every 251
    assert len(starts) == 50
    with pytest.raises(ValueError, match="num_rows=101"):
        sweep.text_examples(data, seq_len=9, num_rows=101, seed=0)


def test_provenance_and_state_bytes():
    record = sweep.provenance()
    assert {"device", "versions", "commit", "command", "date"} <= set(record)
    cfg = _config()
    # Attention's cache: keys and values, [max_len, heads, head_dim] each, float32, plus a length counter.
    assert sweep.state_bytes(LM(config=cfg), max_len=32) >= 2 * 32 * 16 * 4
