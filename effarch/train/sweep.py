"""Sweeps of small models: several hyperparameter settings trained at once, run records, resumption.

The experiment scripts (``experiments/mqar.py``, ``mad.py``, ``scaling.py``,
``hybrid_ratio.py``) share this module:

    settings = [Setting(lr=1e-3, weight_decay=0.1), Setting(lr=1e-2, weight_decay=0.1)]
    result = train_settings(LM(config=cfg), settings, train=(x, y), test=(x_test, y_test),
                            batch_size=64, steps=2000, eval_every=200)
    result["best"]["accuracy"]          # best setting's held-out token accuracy

    log = ResultsLog(workdir / "results.jsonl", key_fields=("mixer", "d_model", "seq_len"))
    if not log.has(row_key):             # a killed sweep reruns only what has no row
        log.append({**row_key, **figures, **provenance()})

Every setting of a sweep cell starts from the same initial parameters and sees
the same batches in the same order; ``jax.vmap`` over the parameters and the
optimiser states (whose learning rate and weight decay are per setting) runs
them as one jitted step. Tasks are token classification: ``targets [N, T]`` hold
the token to predict after ``inputs[:, :t+1]`` and ``IGNORE`` where nothing is
asked, and only the labelled positions are scored (``LM(logit_positions=...)``),
so a large vocabulary with few labels costs little.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable, TextIO

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from effarch.train.optim import decay_mask

# Label of a position with nothing to predict (the PyTorch / Zoology convention).
IGNORE = -100


def _commit() -> str | None:
    """The git commit of the effarch checkout (with ``+dirty`` if it has changes), or None."""
    root = pathlib.Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def provenance() -> dict[str, Any]:
    """Where and how a result was made: device, versions, commit, command, date."""
    import flax  # pylint: disable=import-outside-toplevel
    import jaxlib  # pylint: disable=import-outside-toplevel

    from effarch import __version__  # pylint: disable=import-outside-toplevel

    devices = jax.devices()
    return {
        "device": f"{len(devices)} x {devices[0].device_kind}",
        "platform": devices[0].platform,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "versions": {"python": sys.version.split()[0], "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                     "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__,
                     "effarch": __version__},
        "commit": _commit(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


class ResultsLog:
    """``results.jsonl``: one JSON row per finished run, keyed by some of its fields.

    Rows are appended and flushed to disk as each run finishes, so a killed
    sweep keeps every finished row and :meth:`has` tells which runs remain.

    Args:
      path: the JSONL file (created with its folder on the first append).
      key_fields: the fields that identify a run (e.g. mixer, d_model, seq_len).
    """

    def __init__(self, path: str | pathlib.Path, key_fields: Sequence[str]):
        self.path = pathlib.Path(path)
        self.key_fields = tuple(key_fields)
        self._rows: list[dict[str, Any]] = []
        if self.path.exists():
            for number, line in enumerate(self.path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    self._rows.append(json.loads(line))
                except json.JSONDecodeError:
                    # A run killed mid-write leaves a partial last line; that run is redone.
                    if number != len(self.path.read_text().splitlines()):
                        raise ValueError(f"{self.path}:{number} is not JSON; fix or remove that line.") from None

    def key(self, row: Mapping[str, Any]) -> tuple:
        missing = [f for f in self.key_fields if f not in row]
        if missing:
            raise ValueError(f"row lacks key field(s) {missing}; every row needs {list(self.key_fields)}.")
        return tuple(json.dumps(row[f], sort_keys=True) for f in self.key_fields)

    def has(self, row_key: Mapping[str, Any]) -> bool:
        """Whether a row with these key fields' values is already recorded."""
        key = self.key(row_key)
        return any(self.key(r) == key for r in self._rows)

    def rows(self) -> list[dict[str, Any]]:
        """Every recorded row, in the order written."""
        return list(self._rows)

    def append(self, row: Mapping[str, Any]) -> None:
        """Records one finished run (flushed and synced before returning)."""
        self.key(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        if lines and not _is_json(lines[-1]):
            # Drop a partial line a killed writer left, so the file stays valid JSONL.
            self.path.write_text("".join(line + "\n" for line in lines[:-1]))
        with self.path.open("a") as f:
            f.write(json.dumps(dict(row), sort_keys=True, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._rows.append(json.loads(json.dumps(dict(row), default=_json_default)))


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def _json_default(value):
    if isinstance(value, (np.generic, jax.Array)):
        return np.asarray(value).item() if np.ndim(value) == 0 else np.asarray(value).tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


class Progress:
    """Progress of a sweep: runs done of the total, the current run, an ETA from the finished runs.

    Args:
      total: runs in the sweep.
      done: runs already recorded (skipped on resumption).
      stream: where lines go.
    """

    def __init__(self, total: int, done: int = 0, stream: TextIO = sys.stdout):
        self.total, self.done, self.stream = total, done, stream
        self._skipped = done
        self._start = time.perf_counter()
        self._run_start = self._start

    def start(self, name: str) -> None:
        self._run_start = time.perf_counter()
        self._print(f"[{self.done + 1}/{self.total}] {name} ...{self._eta()}")

    def finish(self, name: str, summary: str = "") -> None:
        self.done += 1
        took = time.perf_counter() - self._run_start
        self._print(f"[{self.done}/{self.total}] {name}: {summary} ({took:.0f} s){self._eta()}")

    def _eta(self) -> str:
        ran = self.done - self._skipped
        if ran == 0 or self.done >= self.total:
            return ""
        per_run = (time.perf_counter() - self._start) / ran
        return f"  ETA {_duration(per_run * (self.total - self.done))}"

    def _print(self, text: str) -> None:
        print(f"{datetime.datetime.now():%H:%M:%S} {text}", file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setting:
    """One optimiser setting of a sweep cell (AdamW, warmup then cosine decay).

    Attributes:
      lr: peak learning rate.
      weight_decay: AdamW decoupled weight decay (on parameters of rank >= 2).
    """

    lr: float
    weight_decay: float = 0.0

    def __post_init__(self):
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"Setting: lr={self.lr!r}; expected a positive float.")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"Setting: weight_decay={self.weight_decay!r}; expected a float >= 0.")


def label_positions(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The labelled positions of each row, padded to the row with most labels.

    Args:
      targets: ``int [N, T]``, ``IGNORE`` where nothing is asked.

    Returns:
      ``positions int32 [N, P]`` (0 in padding) and ``labels int32 [N, P]``
      (``IGNORE`` in padding), P the largest number of labels in a row.
    """
    targets = np.asarray(targets)
    if targets.ndim != 2:
        raise ValueError(f"targets has shape {targets.shape}; expected [N, T].")
    labelled = targets != IGNORE
    width = max(int(labelled.sum(axis=1).max(initial=0)), 1)
    # Stable sort puts the labelled positions first, in order.
    order = np.argsort(~labelled, axis=1, kind="stable")[:, :width]
    valid = np.take_along_axis(labelled, order, axis=1)
    positions = np.where(valid, order, 0).astype(np.int32)
    labels = np.where(valid, np.take_along_axis(targets, order, axis=1), IGNORE).astype(np.int32)
    return positions, labels


def _warmup_cosine(step, steps: int, warmup: int, min_ratio: float):
    """The schedule's multiplier of the peak learning rate at ``step``."""
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, (step + 1.0) / max(warmup, 1)) if warmup else 1.0
    progress = jnp.clip((step - warmup) / max(steps - warmup, 1), 0.0, 1.0)
    cosine = min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup, warm, cosine)


def _scored(model: nn.Module, params, tokens, positions, labels):
    """``(sum of -log p(label), correct count, label count, aux_loss)`` at the labelled positions."""
    logits, aux, _ = model.apply({"params": params}, tokens, logit_positions=positions)  # [B, P, V]
    mask = labels != IGNORE
    safe = jnp.where(mask, labels, 0)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == safe) & mask
    return jnp.sum(nll * mask), jnp.sum(correct), jnp.sum(mask), aux["aux_loss"]


def train_settings(
    model: nn.Module,
    settings: Sequence[Setting],
    *,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    batch_size: int,
    steps: int,
    eval_every: int,
    seed: int = 0,
    target_accuracy: float | None = 0.99,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    grad_clip: float = 1.0,
    eval_batch_size: int | None = None,
    select: str = "accuracy",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Trains one model under every setting at once; returns held-out accuracy per setting.

    Args:
      model: a flax module with the LM contract and ``logit_positions``
        (``effarch.models.LM``).
      settings: the optimiser settings, trained side by side from one initialisation.
      train, test: ``(inputs, targets)`` int ``[N, T]`` each; targets ``IGNORE``
        where unscored.
      batch_size: rows per step (every setting sees the same rows).
      steps: optimiser updates; rows are drawn epoch by epoch, reshuffled each epoch.
      eval_every: test accuracy every this many steps (and at the end).
      seed: initial parameters and data order.
      target_accuracy: stop once a setting's test accuracy reaches this (None: never).
      warmup_steps, min_lr_ratio: linear warmup, then cosine decay to ``lr * min_lr_ratio``.
      b1, b2, grad_clip: AdamW moments and global-norm clipping (0: none).
      eval_batch_size: rows per evaluation batch (default ``batch_size``).
      select: which setting is ``"best"``: highest best test ``"accuracy"``, or
        lowest final test ``"loss"`` (language modelling).
      log: called with a line at each evaluation.

    Returns:
      ``{"settings": [{"lr", "weight_decay", "accuracy", "best_accuracy", "loss"}],
      "best": the selected setting, "steps": updates run,
      "stopped_early": bool, "curve": [{"step", "accuracy": [per setting]}],
      "params": parameter count, "wall_s"}``.
    """
    if not settings:
        raise ValueError("settings is empty; pass at least one Setting(lr=...).")
    if select not in ("accuracy", "loss"):
        raise ValueError(f"select={select!r}; expected 'accuracy' or 'loss'.")
    for name, value in (("batch_size", batch_size), ("steps", steps), ("eval_every", eval_every)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}; expected a positive int.")
    train_x, train_y = (np.asarray(a) for a in train)
    test_x, test_y = (np.asarray(a) for a in test)
    for name, (x, y) in (("train", (train_x, train_y)), ("test", (test_x, test_y))):
        if x.ndim != 2 or x.shape != y.shape:
            raise ValueError(f"{name} inputs {x.shape} and targets {y.shape}; expected two equal [N, T] shapes.")
    if batch_size > len(train_x):
        raise ValueError(f"batch_size={batch_size} exceeds the {len(train_x)} training rows.")
    start = time.perf_counter()
    train_pos, train_lab = label_positions(train_y)
    test_pos, test_lab = label_positions(test_y)
    lrs = jnp.asarray([s.lr for s in settings], jnp.float32)
    wds = jnp.asarray([s.weight_decay for s in settings], jnp.float32)
    count = len(settings)

    key = jax.random.key(seed)
    # Jitted: op-by-op initialisation of a small model costs as much as compiling its training step.
    init = jax.jit(lambda key, tokens, positions: model.init(key, tokens, logit_positions=positions)["params"])
    params = nn.unbox(init(key, jnp.asarray(train_x[:1]), jnp.asarray(train_pos[:1])))
    num_params = int(sum(math.prod(p.shape) for p in jax.tree.leaves(params)))
    params = jax.tree.map(lambda p: jnp.broadcast_to(p, (count, *p.shape)), params)
    optimizer = optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=0.0, b1=b1, b2=b2,
                                                      mask=decay_mask)
    opt_state = jax.vmap(optimizer.init)(params)

    def one_step(params, opt_state, lr, wd, tokens, positions, labels, step):
        def loss_fn(p):
            nll, _, n, aux_loss = _scored(model, p, tokens, positions, labels)
            return nll / jnp.maximum(n, 1) + aux_loss

        loss, grads = jax.value_and_grad(loss_fn)(params)
        if grad_clip:
            norm = optax.global_norm(grads)
            grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, grad_clip / (norm + 1e-6)), grads)
        rate = lr * _warmup_cosine(step, steps, warmup_steps, min_lr_ratio)
        opt_state.hyperparams["learning_rate"] = rate
        opt_state.hyperparams["weight_decay"] = wd
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    train_step = jax.jit(jax.vmap(one_step, in_axes=(0, 0, 0, 0, None, None, None, None)), donate_argnums=(0, 1))

    def one_eval(params, tokens, positions, labels):
        nll, correct, n, _ = _scored(model, params, tokens, positions, labels)
        return nll, correct, n

    eval_step = jax.jit(jax.vmap(one_eval, in_axes=(0, None, None, None)))
    eval_rows = eval_batch_size or batch_size

    def evaluate(params):
        nll, correct, total = np.zeros(count), np.zeros(count), 0.0
        for lo in range(0, len(test_x), eval_rows):
            idx = np.arange(lo, lo + eval_rows) % len(test_x)  # pad the last batch by wrapping ...
            lab = np.where((np.arange(lo, lo + eval_rows) < len(test_x))[:, None], test_lab[idx], IGNORE)  # ... unscored
            s, c, n = eval_step(params, jnp.asarray(test_x[idx]), jnp.asarray(test_pos[idx]), jnp.asarray(lab))
            nll, correct, total = nll + np.asarray(s), correct + np.asarray(c), total + float(n[0])
        return correct / max(total, 1.0), nll / max(total, 1.0)

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_x))
    cursor = 0
    curve, best_acc = [], np.zeros(count)
    acc = loss = np.zeros(count)
    stopped_early, step = False, 0
    while step < steps:
        if cursor + batch_size > len(order):
            order, cursor = rng.permutation(len(train_x)), 0
        rows = order[cursor:cursor + batch_size]
        cursor += batch_size
        params, opt_state, _ = train_step(params, opt_state, lrs, wds, jnp.asarray(train_x[rows]),
                                          jnp.asarray(train_pos[rows]), jnp.asarray(train_lab[rows]), step)
        step += 1
        if step % eval_every == 0 or step == steps:
            acc, loss = evaluate(params)
            best_acc = np.maximum(best_acc, acc)
            curve.append({"step": step, "accuracy": acc.round(4).tolist()})
            if log is not None:
                log(f"step {step}/{steps}: accuracy " + " ".join(f"{a:.3f}" for a in acc)
                    + "; loss " + " ".join(f"{v:.3f}" for v in loss))
            if target_accuracy is not None and acc.max() >= target_accuracy:
                stopped_early = step < steps
                break
    rows_out = [
        {"lr": s.lr, "weight_decay": s.weight_decay, "accuracy": float(acc[i]), "best_accuracy": float(best_acc[i]),
         "loss": float(loss[i])}
        for i, s in enumerate(settings)
    ]
    def finite_loss(r):
        return r["loss"] if math.isfinite(r["loss"]) else math.inf

    if select == "loss":
        best = min(rows_out, key=finite_loss)
    else:
        best = max(rows_out, key=lambda r: (r["best_accuracy"], -finite_loss(r)))
    return {"settings": rows_out, "best": best, "steps": step, "stopped_early": stopped_early, "curve": curve,
            "params": num_params, "wall_s": time.perf_counter() - start}


def state_bytes(mixer_or_model: Any, *, batch_size: int = 1, max_len: int) -> int:
    """Bytes of the decode cache per sequence (``init_cache`` leaves), e.g. a mixer's recurrent state."""
    cache = mixer_or_model.init_cache(batch_size, max_len, jnp.float32)
    total = sum(int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(cache))
    return total // batch_size


def text_examples(data: np.ndarray, *, seq_len: int, num_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Next-token examples from a token stream: ``num_rows`` windows of ``seq_len + 1`` tokens.

    Windows start at distinct multiples of ``seq_len + 1`` drawn at random (so
    they never overlap); every position is labelled with the next token.

    Args:
      data: ``[N]`` token stream (e.g. ``Corpus.data``, bytes).
      seq_len: tokens T per row.
      num_rows: rows wanted; at most ``len(data) // (seq_len + 1)``.
      seed: which windows.

    Returns:
      ``inputs, targets`` int32 ``[num_rows, seq_len]``, targets the inputs shifted by one.
    """
    data = np.asarray(data)
    available = len(data) // (seq_len + 1)
    if num_rows > available:
        raise ValueError(
            f"num_rows={num_rows} windows of seq_len + 1 = {seq_len + 1} tokens do not fit in {len(data)} "
            f"tokens (at most {available}); use fewer rows, shorter rows or a larger corpus."
        )
    starts = np.random.default_rng(seed).choice(available, size=num_rows, replace=False) * (seq_len + 1)
    windows = data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)  # [num_rows, T + 1]
    return windows[:, :-1], windows[:, 1:]
