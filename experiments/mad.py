r"""The six MAD synthetic tasks (Poli et al. 2024) for every effarch mixer and striped hybrids.

    python experiments/mad.py                                  # --preset cpu: ~40 min, one CPU thread
    python experiments/mad.py --preset paper --workdir runs/mad-paper       # MAD's protocol (GPU)
    python experiments/mad.py --preset smoke --workdir /tmp/mad-smoke       # seconds
    python experiments/mad.py --mixers attention,mamba2,mamba2+attention --tasks compression

MAD's protocol: width 128, two blocks ``mixer -> SwiGLU -> mixer -> SwiGLU``
(pre-norm residual), AdamW with a cosine schedule to 1e-6 (``min_lr_ratio =
1e-6 / lr``), the six settings lr in {1e-4, 5e-4, 1e-3} x weight decay in
{0, 0.1} trained side by side (``effarch.train.sweep.train_settings``), the best
setting's test accuracy reported per (task, mixer). A striped hybrid
``a+b`` has mixer ``a`` in the first block and ``b`` in the second. Recall tasks
train on every next token and score only the recall positions (mad-lab's
training vs test targets); compression is scored with MAD's autoencoder (the
sequence model encodes, its last hidden state is the code, a small MLP decodes
every position from it); memorization's test set probes the training map.

Outputs in ``--workdir``: ``results.jsonl`` (one row per (task, mixer); a rerun
skips the finished cells and retries cells recorded as errors), ``table.json``,
``table.md`` (accuracy per task and mixer, mean accuracy, mean rank) and
``heatmap.png``. See docs/results/mad.md for the cpu preset's results.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
import traceback
from typing import Any, Callable

from absl import app, flags

FLAGS = flags.FLAGS

TASKS = ("in-context-recall", "fuzzy-in-context-recall", "noisy-in-context-recall", "selective-copying",
         "compression", "memorization")

# Mixer options sized for width 128 (heads of 32 channels, modest state sizes, short
# convolutions where the paper's block has one); chunked forms use chunks of 32.
MIXER_OPTIONS: dict[str, dict[str, Any]] = {
    "attention": {"num_heads": 4, "chunk_size": 64},
    "linear_attention": {"num_heads": 4, "chunk_size": 32},
    "retnet": {"num_heads": 4, "chunk_size": 32},
    "gla": {"num_heads": 4, "chunk_size": 32},
    "hgrn2": {"expand_ratio": 64, "chunk_size": 32},
    "mamba": {"d_state": 16, "d_conv": 4, "expand": 2},
    "mamba2": {"d_state": 64, "head_dim": 32, "expand": 2, "d_conv": 4, "chunk_size": 32},
    "s4d": {"d_state": 64},
    "hyena": {"order": 2, "filter_order": 64},  # max_len is set to the task's length
    "mlstm": {"num_heads": 4, "chunk_size": 32},
    "rwkv6": {"head_size": 32, "decay_lora": 32, "mix_lora": 16, "chunk_size": 32},
    "rwkv7": {"head_size": 32, "decay_lora": 32, "iclr_lora": 32, "gate_lora": 64, "chunk_size": 32},
    "rglru": {"conv_kernel": 4},
    "deltanet": {"head_dim": 32, "conv_size": 4, "chunk_size": 32},
    "gated_deltanet": {"head_dim": 32, "conv_size": 4, "chunk_size": 32},
}

MAD_SETTINGS = tuple((lr, wd) for lr in (1e-4, 5e-4, 1e-3) for wd in (0.0, 0.1))

# Per preset: the training protocol, each task's knobs (passed to the generator) and
# the mixers run by default. ``steps`` None means MAD's epochs * num_train / batch_size.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        d_model=128, batch_size=128, epochs=200, steps=None, num_test=1280, settings=MAD_SETTINGS,
        target_accuracy=None, evals=20,
        tasks={t: {} for t in TASKS},  # the generators' defaults are MAD's baseline
        mixers=None,  # every registered mixer and the hybrids below
        hybrids=("mamba2+attention", "gated_deltanet+attention", "hyena+attention"),
    ),
    # ~40 CPU-minutes single-threaded (measured: 2,154 CPU s, 2,531 s wall); see docs/results/mad.md.
    # One setting (lr 3e-3, wd 0.1) for ~0.3 epochs: MAD's top lr is slow at this length.
    "cpu": dict(
        d_model=128, batch_size=32, epochs=None, num_test=256, settings=((3e-3, 0.1),),
        target_accuracy=0.99, evals=2,
        steps={"in-context-recall": 120, "fuzzy-in-context-recall": 120, "noisy-in-context-recall": 120,
               "selective-copying": 120, "compression": 150, "memorization": 150},
        # Run order (a partial sweep then has varied tasks); the table keeps MAD's order.
        tasks={
            "in-context-recall": dict(seq_len=64),
            "compression": dict(),
            "memorization": dict(),
            "selective-copying": dict(seq_len=64, num_tokens_to_copy=8),
            "noisy-in-context-recall": dict(seq_len=64),
            "fuzzy-in-context-recall": dict(seq_len=64),
        },
        mixers=("attention", "gla", "mamba2", "gated_deltanet", "hyena", "s4d"),
        hybrids=("mamba2+attention", "gated_deltanet+attention"),
    ),
    "smoke": dict(
        d_model=32, batch_size=8, epochs=None, num_test=16, settings=((1e-3, 0.0), (3e-3, 0.1)),
        target_accuracy=None, evals=1, steps=2,
        tasks={
            "in-context-recall": dict(seq_len=16, num_train=16),
            "compression": dict(seq_len=8, num_train=16),
        },
        mixers=("attention",),
        hybrids=("rglru+attention",),
    ),
}


def define_flags() -> None:
    """The command-line flags (defined only when run as a script, so importing this module beside
    another experiment script defines no clashing flags)."""
    flags.DEFINE_enum("preset", "cpu", sorted(PRESETS), "Protocol: smoke (seconds), cpu (~40 min), paper (MAD's).")
    flags.DEFINE_string("workdir", None, "Folder of every output (default runs/mad-<preset>); rerun to resume.")
    flags.DEFINE_list("mixers", None, "Mixers (registered names, or a+b striped hybrids); default: the preset's.")
    flags.DEFINE_list("tasks", None, f"Tasks among {', '.join(TASKS)}; default: the preset's.")
    flags.DEFINE_integer("seed", 0, "Seed of the data and the initial parameters.")


def default_mixers(preset: str) -> list[str]:
    """The mixers a preset runs: its list (or every registered mixer) and its hybrids."""
    from effarch import mixers  # pylint: disable=import-outside-toplevel

    spec = PRESETS[preset]
    pure = list(spec["mixers"]) if spec["mixers"] is not None else list(mixers.names())
    return pure + list(spec["hybrids"])


def mixer_layers(mixer: str, seq_len: int) -> list[tuple[str, dict[str, Any]]]:
    """``[(name, options)]`` per block: one entry (both blocks) or two for a hybrid ``a+b``."""
    from effarch import mixers  # pylint: disable=import-outside-toplevel

    names = mixer.split("+")
    if not 1 <= len(names) <= 2 or not all(names):
        raise ValueError(f"mixer {mixer!r}; expected a registered name or 'a+b' (a striped hybrid of two).")
    out = []
    for name in names:
        if name not in mixers.names():
            raise ValueError(f"mixer {name!r} is not registered; valid: {', '.join(mixers.names())}.")
        options = dict(MIXER_OPTIONS.get(name, {}))
        if name == "hyena":
            options["max_len"] = seq_len
        out.append((name, options))
    return out


def lm_config(mixer: str, vocab_size: int, seq_len: int, d_model: int):
    """MAD's backbone: two pre-norm blocks ``mixer -> SwiGLU`` (a hybrid: one mixer each)."""
    from effarch.models import LMConfig  # pylint: disable=import-outside-toplevel

    layers = mixer_layers(mixer, seq_len)
    letters = "PQ"[:len(layers)]
    return LMConfig(vocab_size=vocab_size, d_model=d_model, n_layers=2, pattern=letters, mlp="swiglu",
                    mixers={letter: layer for letter, layer in zip(letters, layers)}, max_len=seq_len)


def _sincos(length: int, dim: int):
    """MAD's ``posemb_sincos_1d`` decoder position table ``[length, dim]``."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    omega = 1.0 / (10000 ** (jnp.arange(dim // 2) / (dim // 2 - 1)))
    angles = jnp.arange(length)[:, None] * omega[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)


def autoencoder_class():
    """MAD's compression backbone (mad-lab ``mad/model/auto_encoder.py``) around effarch blocks."""
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from effarch.layers.norms import RMSNorm  # pylint: disable=import-outside-toplevel
    from effarch.models import LM  # pylint: disable=import-outside-toplevel
    from effarch.models.config import LMConfig  # pylint: disable=import-outside-toplevel
    from effarch.models.lm import Block  # pylint: disable=import-outside-toplevel

    class CompressionAutoEncoder(nn.Module):
        """Encode with the blocks, keep the last position's state, decode each position from it.

        ``logit_positions`` are the positions to reconstruct (the LM contract of
        ``train_settings``); the decoder adds a sin-cos embedding of each position to
        the code, then RMSNorm, Dense, GELU, RMSNorm, Dense, GELU, RMSNorm, Dense(vocab).
        """

        config: LMConfig

        @nn.compact
        def __call__(self, tokens, segment_ids=None, cache=None, logit_positions=None):
            cfg = self.config
            x = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=nn.initializers.normal(0.02), name="embed")(tokens)
            for i, spec in enumerate(cfg.layer_specs):
                x, _, _ = Block(cfg, spec, name=f"layer_{i}")(x, None, None)
            code = x[:, -1]  # [B, D]
            if logit_positions is None:
                logit_positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
            h = code[:, None, :] + _sincos(cfg.max_len, cfg.d_model)[logit_positions]  # [B, P, D]
            dense = lambda name: nn.Dense(cfg.d_model, kernel_init=nn.initializers.normal(0.02), name=name)
            h = nn.gelu(dense("decode_1")(RMSNorm(name="decode_norm_1")(h)), approximate=False)
            h = nn.gelu(dense("decode_2")(RMSNorm(name="decode_norm_2")(h)), approximate=False)
            logits = nn.Dense(cfg.vocab_size, kernel_init=nn.initializers.normal(0.02), name="unembed")(
                RMSNorm(name="unembed_norm")(h))
            return logits.astype(jnp.float32), {"aux_loss": jnp.zeros((), jnp.float32)}, None

        @nn.nowrap
        def init_cache(self, batch_size, max_len=None, dtype=jnp.float32):
            return LM(config=self.config).init_cache(batch_size, max_len, dtype)

    return CompressionAutoEncoder


class JitInit:
    """A flax module whose ``init`` runs jitted; ``apply`` and the rest pass through.

    ``train_settings`` initialises with ``model.init`` op by op; on CPU that costs as
    much as compiling the training step (tens of seconds per cell), jitted it is a
    fraction of it.
    """

    def __init__(self, module):
        self.module = module

    def init(self, key, tokens, **kwargs):
        import jax  # pylint: disable=import-outside-toplevel

        return jax.jit(lambda k, t, kw: self.module.init(k, t, **kw))(key, tokens, kwargs)

    def apply(self, *args, **kwargs):
        return self.module.apply(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.module, name)


def task_data(task: str, knobs: dict[str, Any], num_test: int, seed: int):
    """``(train, test, vocab_size, seq_len)`` for a task: MAD's train/test conventions."""
    import inspect  # pylint: disable=import-outside-toplevel

    from effarch.data import synthetic  # pylint: disable=import-outside-toplevel

    fn = synthetic.MAD_TASKS[task]
    params = inspect.signature(fn).parameters
    knobs = dict(knobs)
    num_train = knobs.pop("num_train", params["num_examples"].default)
    train_kw, test_kw = dict(knobs), dict(knobs)
    if "dense_targets" in params:  # mad-lab trains on every next token, scores the recall positions
        train_kw["dense_targets"] = True
    if "split" in params:  # fuzzy recall: test keys are all k_motif_size long
        train_kw["split"], test_kw["split"] = "train", "test"
    # memorization: the map depends on mapping_seed only, so the test set probes the training map.
    train = fn(2 * seed + 1, num_train, **train_kw)
    test = fn(2 * seed + 2, num_test, **test_kw)
    vocab_size = knobs.get("vocab_size", params["vocab_size"].default)
    seq_len = train[0].shape[1]
    return train, test, vocab_size, seq_len


def task_knobs(task: str, knobs: dict[str, Any]) -> dict[str, Any]:
    """Every knob of a task's generator as used (the defaults filled in), for the results row."""
    import inspect  # pylint: disable=import-outside-toplevel

    from effarch.data import synthetic  # pylint: disable=import-outside-toplevel

    params = inspect.signature(synthetic.MAD_TASKS[task]).parameters
    out = {name: p.default for name, p in params.items()
           if name not in ("seed", "dense_targets", "split") and p.default is not inspect.Parameter.empty}
    out["num_train"] = out.pop("num_examples")
    out.update(knobs)
    return out


def run_cell(task: str, mixer: str, spec: dict[str, Any], seed: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Trains one (task, mixer) cell under every setting; returns its results row (status ok)."""
    from effarch.models import LM  # pylint: disable=import-outside-toplevel
    from effarch.train.sweep import Setting, state_bytes, train_settings  # pylint: disable=import-outside-toplevel

    knobs = spec["tasks"][task]
    train, test, vocab_size, seq_len = task_data(task, knobs, spec["num_test"], seed)
    cfg = lm_config(mixer, vocab_size, seq_len, spec["d_model"])
    model = autoencoder_class()(config=cfg) if task == "compression" else LM(config=cfg)
    num_train = len(train[0])
    if spec["steps"] is None:
        steps = max(1, spec["epochs"] * num_train // spec["batch_size"])
    else:
        steps = spec["steps"][task] if isinstance(spec["steps"], dict) else spec["steps"]
    settings = [Setting(lr=lr, weight_decay=wd) for lr, wd in spec["settings"]]
    min_lr = 1e-6
    # One schedule floor for all settings: lr * min_lr_ratio ends at 1e-6 for the largest lr.
    ratio = min_lr / max(lr for lr, _ in spec["settings"])
    cpu_start = time.process_time()
    result = train_settings(JitInit(model), settings, train=train, test=test, batch_size=spec["batch_size"], steps=steps,
                            eval_every=max(1, steps // spec["evals"]), seed=seed,
                            target_accuracy=spec["target_accuracy"], warmup_steps=0, min_lr_ratio=ratio,
                            eval_batch_size=min(len(test[0]), 256), log=log)
    best = max(result["settings"], key=lambda s: (s["accuracy"], -s["loss"] if math.isfinite(s["loss"]) else -math.inf))
    return {
        "status": "ok",
        "accuracy": best["accuracy"],
        "best_lr": best["lr"],
        "best_weight_decay": best["weight_decay"],
        "best_accuracy_any_eval": max(s["best_accuracy"] for s in result["settings"]),
        "settings": result["settings"],
        "params": result["params"],
        "state_bytes": state_bytes(LM(config=cfg), max_len=seq_len),
        "steps": result["steps"],
        "max_steps": steps,
        "stopped_early": result["stopped_early"],
        "epochs_seen": result["steps"] * spec["batch_size"] / num_train,
        "curve": result["curve"],
        "model": "autoencoder" if task == "compression" else "lm",
        "layers": [[n, o] for n, o in mixer_layers(mixer, seq_len)],
        "train_wall_s": result["wall_s"],
        "train_cpu_s": time.process_time() - cpu_start,
    }


def protocol(preset: str) -> dict[str, Any]:
    """The preset's training protocol as recorded in every row."""
    spec = PRESETS[preset]
    return {k: spec[k] for k in ("d_model", "batch_size", "epochs", "steps", "num_test", "target_accuracy", "evals")} | {
        "settings": [list(s) for s in spec["settings"]], "min_lr": 1e-6, "optimizer": "adamw", "schedule": "cosine",
        "blocks": "mixer -> swiglu -> mixer -> swiglu"}


def run_sweep(preset: str, workdir: str | pathlib.Path, mixers: list[str] | None = None,
              tasks: list[str] | None = None, seed: int = 0, stream=sys.stdout) -> list[dict[str, Any]]:
    """Runs every (task, mixer) cell without a finished row, then writes the table and heat map.

    Returns the rows of the results log (every cell, old and new).
    """
    from effarch.train.sweep import Progress, ResultsLog, provenance  # pylint: disable=import-outside-toplevel

    spec = PRESETS[preset]
    workdir = pathlib.Path(workdir)
    mixers = list(mixers) if mixers else default_mixers(preset)
    tasks = list(tasks) if tasks else list(spec["tasks"])
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"task {task!r}; valid: {', '.join(TASKS)}.")
        if task not in spec["tasks"]:
            spec = {**spec, "tasks": {**spec["tasks"], task: PRESETS["paper"]["tasks"][task]}}
    for mixer in mixers:
        mixer_layers(mixer, 64)  # validates the names before anything runs
    log = ResultsLog(workdir / "results.jsonl", key_fields=("task", "mixer"))
    current = json.loads(json.dumps(protocol(preset)))
    other = {json.dumps([r.get("preset"), r.get("protocol")], sort_keys=True) for r in log.rows()} \
        - {json.dumps([preset, current], sort_keys=True)}
    if other:
        raise ValueError(f"{workdir} holds results of another preset or protocol ({sorted(other)[0][:200]}); use "
                         f"another --workdir for preset {preset!r}.")

    def finished(task, mixer):
        rows = [r for r in log.rows() if r["task"] == task and r["mixer"] == mixer]
        return bool(rows) and rows[-1].get("status") == "ok"

    cells = [(t, m) for t in tasks for m in mixers]
    done = sum(finished(t, m) for t, m in cells)
    progress = Progress(len(cells), done, stream=stream)
    if done:
        print(f"{done} of {len(cells)} cells already in {log.path}; running the other {len(cells) - done}.",
              file=stream, flush=True)
    for task, mixer in cells:
        if finished(task, mixer):
            continue
        name = f"{task} x {mixer}"
        progress.start(name)
        start = time.perf_counter()
        row = {"task": task, "mixer": mixer, "preset": preset, "seed": seed,
               "task_knobs": task_knobs(task, spec["tasks"][task]), "protocol": protocol(preset)}
        try:
            row.update(run_cell(task, mixer, spec, seed, log=lambda line: print(f"    {line}", file=stream,
                                                                                 flush=True)))
            summary = f"accuracy {row['accuracy']:.3f} (lr {row['best_lr']:g}, wd {row['best_weight_decay']:g}), " \
                      f"{row['steps']} steps, {row['train_cpu_s']:.0f} CPU s"
        except Exception as err:  # pylint: disable=broad-except
            row.update({"status": "error", "error": f"{type(err).__name__}: {err}",
                        "traceback": traceback.format_exc()[-4000:]})
            summary = f"ERROR {type(err).__name__}: {str(err)[:200]}"
        row["wall_s"] = time.perf_counter() - start
        row.update(provenance())
        log.append(row)
        progress.finish(name, summary)
        write_outputs(log.rows(), workdir, preset)
    write_outputs(log.rows(), workdir, preset)
    return log.rows()


def table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy per (mixer, task) from the latest row of each cell, mean accuracy and mean rank."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        latest[(r["task"], r["mixer"])] = r
    tasks = [t for t in TASKS if any(k[0] == t for k in latest)]
    mixers = list(dict.fromkeys(k[1] for k in latest))
    acc = {m: {t: (latest[(t, m)]["accuracy"] if (t, m) in latest and latest[(t, m)].get("status") == "ok"
                   else None) for t in tasks} for m in mixers}
    ranks: dict[str, dict[str, float]] = {m: {} for m in mixers}
    for t in tasks:
        scored = sorted(((acc[m][t], m) for m in mixers if acc[m][t] is not None), reverse=True)
        i = 0
        while i < len(scored):  # tied accuracies share the mean of their ranks
            j = i
            while j + 1 < len(scored) and scored[j + 1][0] == scored[i][0]:
                j += 1
            for k in range(i, j + 1):
                ranks[scored[k][1]][t] = (i + j) / 2 + 1
            i = j + 1
    out = []
    for m in mixers:
        values = [v for v in acc[m].values() if v is not None]
        out.append({"mixer": m, "accuracy": acc[m], "rank": ranks[m],
                    "mean_accuracy": sum(values) / len(values) if values else None,
                    "mean_rank": sum(ranks[m].values()) / len(ranks[m]) if ranks[m] else None,
                    "errors": [t for t in tasks if (t, m) in latest and latest[(t, m)].get("status") != "ok"]})
    out.sort(key=lambda r: (r["mean_rank"] is None, r["mean_rank"] or 0.0, -(r["mean_accuracy"] or 0.0)))
    return {"tasks": tasks, "rows": out}


SHORT = {"in-context-recall": "recall", "fuzzy-in-context-recall": "fuzzy recall",
         "noisy-in-context-recall": "noisy recall", "selective-copying": "selective copy",
         "compression": "compression", "memorization": "memorization"}


def markdown(tab: dict[str, Any]) -> str:
    """The table as markdown: one row per mixer (by mean rank), one column per task."""
    head = ["mixer"] + [SHORT[t] for t in tab["tasks"]] + ["mean acc", "mean rank"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in tab["rows"]:
        cells = [f"`{r['mixer']}`"]
        for t in tab["tasks"]:
            v = r["accuracy"][t]
            cells.append("error" if t in r["errors"] else "—" if v is None else f"{v:.3f}")
        cells.append("—" if r["mean_accuracy"] is None else f"{r['mean_accuracy']:.3f}")
        cells.append("—" if r["mean_rank"] is None else f"{r['mean_rank']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def heatmap(tab: dict[str, Any], path: pathlib.Path, title: str) -> bool:
    """Writes the accuracy heat map (mixers by mean rank x tasks); False without matplotlib."""
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
        import numpy as np  # pylint: disable=import-outside-toplevel
    except ImportError:
        return False
    tasks, rows = tab["tasks"], tab["rows"]
    cols = [SHORT[t] for t in tasks] + ["mean"]
    data = np.array([[np.nan if r["accuracy"][t] is None else r["accuracy"][t] for t in tasks]
                     + [np.nan if r["mean_accuracy"] is None else r["mean_accuracy"]] for r in rows], float)
    fig, ax = plt.subplots(figsize=(1.25 * len(cols) + 3, 0.45 * len(rows) + 2))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgray")
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            text = "err" if j < len(tasks) and tasks[j] in rows[i]["errors"] else (
                "" if np.isnan(data[i, j]) else f"{data[i, j]:.2f}")
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="black" if not np.isnan(data[i, j]) and data[i, j] > 0.6 else "white")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    labels = [f"{r['mixer']} ({r['mean_rank']:.1f})" if r["mean_rank"] is not None else r["mixer"] for r in rows]
    ax.set_yticks(range(len(rows)), labels)
    ax.set_xlabel("MAD task")
    ax.set_ylabel("mixer (mean rank), best first")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="test accuracy (best setting)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(rows: list[dict[str, Any]], workdir: pathlib.Path, preset: str) -> dict[str, Any]:
    """``table.json``, ``table.md`` and ``heatmap.png`` from the results rows."""
    tab = table(rows)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "table.json").write_text(json.dumps({"preset": preset, **tab}, indent=1) + "\n")
    (workdir / "table.md").write_text(markdown(tab))
    settings = len(PRESETS[preset]["settings"])
    which = "one optimiser setting" if settings == 1 else f"best of {settings} optimiser settings"
    heatmap(tab, workdir / "heatmap.png", f"MAD tasks, {preset} preset: test accuracy ({which})")
    return tab


def main(argv):
    del argv
    workdir = pathlib.Path(FLAGS.workdir or f"runs/mad-{FLAGS.preset}")
    start = time.perf_counter()
    run_sweep(FLAGS.preset, workdir, FLAGS.mixers, FLAGS.tasks, FLAGS.seed)
    print(f"\n{(workdir / 'table.md').read_text()}\nwall {time.perf_counter() - start:.0f} s; "
          f"results {workdir / 'results.jsonl'}, table {workdir / 'table.md'}, heat map {workdir / 'heatmap.png'}",
          flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
