r"""Multi-query associative recall (MQAR, Zoology: Arora et al., 2023): accuracy vs width and state.

    python experiments/mqar.py                              # --preset cpu: 6 cells, a 2-core CPU (docs/results/mqar.md)
    python experiments/mqar.py --preset paper --workdir runs/mqar-paper   # Zoology's figure 2, a GPU
    python experiments/mqar.py --preset smoke --workdir /tmp/mqar-smoke  # seconds
    python experiments/mqar.py --mixers attention,based --d_models 64,128
    python experiments/mqar.py --plot_only --workdir docs/results/mqar

A grid of mixers x d_model x (seq_len, KV pairs) x learning rate. Every model
is Zoology's: two mixer layers and nothing else (``mlp="none"``), each mixer at
its paper settings (a short convolution where the paper's block has one). The
learning rates of one grid cell train side by side from one initialisation
(``effarch.train.sweep.train_settings``) and stop once one of them reaches 99%
held-out accuracy; the best is reported.

Writes, in ``--workdir`` (default ``runs/mqar-<preset>``):
- ``results.jsonl``: one row per cell (mixer, options, sizes, best lr, accuracy
  of the best setting, every setting's accuracy, parameters, recurrent state
  bytes, steps, early stop, wall time, provenance). Rerunning the same
  command skips the cells that have a row, so a killed sweep resumes where it
  stopped. A cell that raises is recorded with ``status: "error"`` and the
  sweep goes on (``--retry_errors`` reruns those cells).
- ``accuracy_vs_d_model.png``: accuracy against d_model per mixer, one panel
  per (seq_len, KV pairs): the layout of Zoology's figure 2.
- ``accuracy_vs_state.png``: accuracy against recurrent state bytes (log x),
  every mixer on one axis: the recall/memory frontier.
- ``table.md``: the accuracy table.

State bytes are those of one mixer layer's decode cache at ``max_len =
seq_len`` (``sweep.state_bytes``, float32): attention's KV cache at that
length, Hyena's stored inputs, the recurrent mixers' fixed state (with their
short-convolution windows); the model holds two such layers.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any, Callable, TextIO

from absl import app, flags

FLAGS = flags.FLAGS

flags.DEFINE_enum("preset", "cpu", ["smoke", "cpu", "paper"], "Grid and training budget.")
flags.DEFINE_string("workdir", None, "Folder of every output (default runs/mqar-<preset>); rerun to resume.")
flags.DEFINE_list("mixers", None, "Mixers, comma separated (default: the preset's); see MIXERS.")
flags.DEFINE_list("d_models", None, "Widths, comma separated (default: the preset's).")
flags.DEFINE_list("tasks", None, "seq_len:kv_pairs pairs, comma separated, e.g. 64:4,128:16 (default: the preset's).")
flags.DEFINE_list("lrs", None, "Learning rates, comma separated (default: the preset's).")
flags.DEFINE_integer("steps", None, "Optimiser updates per cell (default: the preset's).")
flags.DEFINE_integer("vocab_size", None, "Token ids (default: the preset's).")
flags.DEFINE_integer("batch_size", None, "Rows per step (default: the preset's).")
flags.DEFINE_integer("seed", 0, "Seed of the data, the initial parameters and the data order.")
flags.DEFINE_bool("plot_only", False, "Only remake the plots and table from results.jsonl.")
flags.DEFINE_bool("retry_errors", False, "Rerun the cells recorded with status 'error'.")
flags.DEFINE_bool("verbose", False, "Print every evaluation of every cell.")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A sweep: the grid and how each cell trains.

    Attributes:
      mixers: mixer labels (keys of ``MIXERS``).
      d_models: widths.
      tasks: ``(seq_len, num_kv_pairs)`` pairs.
      lrs: peak learning rates, trained side by side in each cell.
      vocab_size: token ids (keys from one half, values from the other).
      num_train, num_test: examples per task (the same for every cell).
      batch_size: rows per step, per ``seq_len`` (a mapping) or one for all.
      steps: optimiser updates, or None for ``epochs`` epochs.
      epochs: passes over the training set when ``steps`` is None.
      eval_every: held-out accuracy every this many steps (and at the end).
      weight_decay: AdamW weight decay.
      warmup_steps: linear warmup before the cosine decay.
      random_non_queries: fill the query region's other positions with random
        tokens (``synthetic.mqar``'s default) instead of 0 (Zoology's figure 2).
    """

    mixers: tuple[str, ...]
    d_models: tuple[int, ...]
    tasks: tuple[tuple[int, int], ...]
    lrs: tuple[float, ...]
    vocab_size: int
    num_train: int
    num_test: int
    batch_size: int | Mapping[int, int]
    steps: int | None
    epochs: int | None = None
    eval_every: int = 100
    weight_decay: float = 0.1
    warmup_steps: int = 0
    random_non_queries: bool = False

    def batch(self, seq_len: int) -> int:
        return self.batch_size[seq_len] if isinstance(self.batch_size, Mapping) else self.batch_size

    def num_steps(self, seq_len: int) -> int:
        if self.steps is not None:
            return self.steps
        return self.epochs * (self.num_train // self.batch(seq_len))


def _logspace(lo: float, hi: float, num: int) -> tuple[float, ...]:
    return tuple(float(f"{10 ** (lo + (hi - lo) * i / (num - 1)):.3g}") for i in range(num))


PRESETS = {
    # Tests: two mixers, one tiny cell, a few seconds.
    "smoke": Preset(mixers=("attention", "based"), d_models=(16,), tasks=((16, 2),), lrs=(3e-3, 1e-2),
                    vocab_size=64, num_train=256, num_test=64, batch_size=32, steps=20, eval_every=10),
    # A 2-core CPU (docs/results/mqar.md): 16 pairs in 64 tokens, at two widths. Attention
    # learns it within 1,100 steps at d_model 32 (lr 1e-2) and 350 at 64 (lr 3.16e-3; 1e-2
    # stays on the plateau for 1,500 steps there), so 1,500 steps (96k examples, ~5 epochs)
    # and three learning rates. Mamba-2 (d_state 128) is left out to fit 30 minutes: at
    # about 0.7-1.0 s a step it alone would take 40 (add it with --mixers).
    "cpu": Preset(mixers=("conv_attention", "based", "hyena"),
                  d_models=(32, 64), tasks=((64, 16),), lrs=(3.16e-3, 1e-2, 3.16e-2),
                  vocab_size=256, num_train=20_000, num_test=1_000, batch_size=64, steps=1500, eval_every=50,
                  warmup_steps=20),
    # Zoology's figure 2 (iclr24_zoology_figure2/configs.py) on our mixers: a GPU.
    "paper": Preset(mixers=("attention", "hyena", "rwkv6", "s4d", "based", "mamba", "mamba2"),
                    d_models=(64, 128, 256, 512), tasks=((64, 4), (128, 8), (256, 16), (512, 64)),
                    lrs=_logspace(-4.0, -2.0, 4), vocab_size=8192, num_train=100_000, num_test=3_000,
                    batch_size={64: 512, 128: 512, 256: 256, 512: 128}, steps=None, epochs=64, eval_every=200),
}


def _register_conv_attention():
    """Registers ``zoology_attention``: Zoology's Hybrid [BaseConv(kernel 3), MHA] as one mixer.

    ``y = attention(in_proj(x) * short_conv(x))``: the gated short convolution
    (Zoology's ``BaseConv``) that Zoology's later MQAR configs put in front of
    attention (``arxiv24_based_figure2``), as the recurrent mixers here have one
    in front of their recurrence. Full sequences only (no decoding); its
    ``init_cache`` (the conv window and the KV cache) is what state bytes count.
    """
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from effarch import mixers as mixers_lib  # pylint: disable=import-outside-toplevel
    from effarch.layers.conv import ShortConv, init_conv_state  # pylint: disable=import-outside-toplevel
    from effarch.mixers.attention import Attention, AttentionConfig  # pylint: disable=import-outside-toplevel

    if "zoology_attention" in mixers_lib.names():
        return

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class ConvAttentionConfig(AttentionConfig):
        """Attention options plus ``conv_size``, the taps of the BaseConv in front."""

        conv_size: int = 3

    @mixers_lib.register("zoology_attention", ConvAttentionConfig)
    class ConvAttention(mixers_lib.Mixer):  # pylint: disable=unused-variable
        config: ConvAttentionConfig

        def _attention_config(self):
            fields = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(AttentionConfig)}
            return AttentionConfig(**fields)

        def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32):
            cfg = self.config
            attention = Attention(config=self._attention_config(), parent=None)
            return (init_conv_state(batch_size, cfg.conv_size, cfg.d_model, dtype),
                    attention.init_cache(batch_size, max_len, dtype))

        @nn.compact
        def __call__(self, x, cache=None, *, segment_ids=None):
            cfg = self.config
            if cache is not None:
                raise ValueError("zoology_attention: full sequences only (no cache) in this experiment.")
            conv, _ = ShortConv(kernel_size=cfg.conv_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                name="base_conv")(x, segment_ids=segment_ids)
            h = self.proj(cfg.d_model, "base_conv_proj", use_bias=True)(x) * conv
            return Attention(config=self._attention_config(), name="attention")(h, segment_ids=segment_ids)


# Mixer label -> (registered mixer, options at (d_model, seq_len)). Paper settings,
# sized so that the state grows with d_model as in the papers.
def _attention(d, t):
    # Zoology: MHA with one head (its dropout 0.1 we do not have).
    return "attention", {"num_heads": 1, "chunk_size": min(256, t)}


def _conv_attention(d, t):
    # Zoology's later MQAR configs: Hybrid [BaseConv(kernel 3), MHA(1 head)].
    return "zoology_attention", {"num_heads": 1, "conv_size": 3, "chunk_size": min(256, t)}


def _based(d, t):
    # Zoology figure 2: one head, Taylor feature map on feature_dim 8, a short
    # convolution in front (our conv is on q, k, v; Zoology's is a BaseConv layer).
    # Trained in the quadratic view (Zoology's train_view="quadratic"); same numbers as chunked.
    return "linear_attention", {"num_heads": 1, "feature_map": "taylor", "feature_dim": 8,
                                "use_short_conv": True, "chunk_size": min(64, t),
                                "implementation": "quadratic" if t <= 128 else "auto"}


def _mamba(d, t):
    return "mamba", {"d_state": 16, "d_conv": 4, "expand": 2}


def _mamba2(d, t):
    # The Mamba-2 paper's d_state 128, head_dim 64 (fewer heads at small widths).
    # The quadratic (attention-like) form of SSD is the fastest on a CPU at short lengths.
    return "mamba2", {"d_state": 128, "d_conv": 4, "expand": 2, "head_dim": min(64, 2 * d),
                      "chunk_size": min(64, t), "implementation": "quadratic" if t <= 128 else "auto"}


def _hyena(d, t):
    return "hyena", {"order": 2, "filter_order": 64, "short_filter_order": 3, "max_len": t}


def _gated_deltanet(d, t):
    return "gated_deltanet", {"head_dim": min(64, d), "expand_v": 2, "conv_size": 4, "chunk_size": min(64, t)}


def _gla(d, t):
    # The GLA paper's block (no short convolution): 4 heads, key width D/2.
    return "gla", {"num_heads": 4, "expand_k": 0.5, "expand_v": 1.0, "gate_low_rank_dim": 16,
                   "chunk_size": min(64, t)}


def _deltanet(d, t):
    return "deltanet", {"head_dim": min(64, d), "conv_size": 4, "chunk_size": min(64, t)}


def _rwkv6(d, t):
    return "rwkv6", {"head_size": min(64, d), "chunk_size": min(64, t)}


def _rwkv7(d, t):
    return "rwkv7", {"head_size": min(64, d), "chunk_size": min(64, t)}


def _retnet(d, t):
    return "retnet", {"num_heads": 4, "expand_v": 2.0, "chunk_size": min(64, t)}


def _s4d(d, t):
    return "s4d", {"d_state": 64, "init": "lin"}


def _hgrn2(d, t):
    return "hgrn2", {"expand_ratio": min(128, d), "chunk_size": min(64, t)}


def _mlstm(d, t):
    return "mlstm", {"num_heads": 4, "proj_factor": 2.0, "conv_kernel": 4, "chunk_size": min(64, t)}


def _rglru(d, t):
    return "rglru", {"conv_kernel": 4}


MIXERS: dict[str, Callable[[int, int], tuple[str, dict[str, Any]]]] = {
    "attention": _attention, "conv_attention": _conv_attention, "based": _based, "mamba": _mamba, "mamba2": _mamba2, "hyena": _hyena,
    "gated_deltanet": _gated_deltanet, "deltanet": _deltanet, "gla": _gla, "rwkv6": _rwkv6, "rwkv7": _rwkv7,
    "retnet": _retnet, "s4d": _s4d, "hgrn2": _hgrn2, "mlstm": _mlstm, "rglru": _rglru,
}

KEY_FIELDS = ("mixer", "mixer_options", "d_model", "seq_len", "num_kv_pairs", "vocab_size", "num_train", "seed")


def resolve(preset: str, *, mixers=None, d_models=None, tasks=None, lrs=None, steps=None, vocab_size=None,
            batch_size=None) -> Preset:
    """The named preset with the given overrides (None: keep the preset's)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}.")
    p = PRESETS[preset]
    changes = {}
    if mixers:
        unknown = [m for m in mixers if m not in MIXERS]
        if unknown:
            raise ValueError(f"unknown mixer(s) {unknown}; valid: {', '.join(MIXERS)}.")
        changes["mixers"] = tuple(mixers)
    if d_models:
        changes["d_models"] = tuple(int(d) for d in d_models)
    if tasks:
        changes["tasks"] = tuple(tuple(int(v) for v in str(t).split(":")) if isinstance(t, str) else tuple(t)
                                 for t in tasks)
        if any(len(t) != 2 for t in changes["tasks"]):
            raise ValueError(f"tasks={tasks!r}; expected seq_len:kv_pairs items such as 64:4.")
    if lrs:
        changes["lrs"] = tuple(float(v) for v in lrs)
    if steps:
        changes["steps"] = int(steps)
    if vocab_size:
        changes["vocab_size"] = int(vocab_size)
    if batch_size:
        changes["batch_size"] = int(batch_size)
    return dataclasses.replace(p, **changes)


def cell_key(mixer: str, d_model: int, seq_len: int, kv: int, p: Preset, seed: int) -> dict[str, Any]:
    _register_conv_attention()
    name, options = MIXERS[mixer](d_model, seq_len)
    return {"mixer": mixer, "mixer_name": name, "mixer_options": options, "d_model": d_model, "seq_len": seq_len,
            "num_kv_pairs": kv, "vocab_size": p.vocab_size, "num_train": p.num_train, "seed": seed}


def model_config(key: Mapping[str, Any]):
    """Zoology's model: two mixer layers, no MLP, tied embeddings."""
    from effarch.models import LMConfig  # pylint: disable=import-outside-toplevel

    return LMConfig(vocab_size=key["vocab_size"], d_model=key["d_model"], n_layers=2, pattern="Z", mlp="none",
                    mixers={"Z": (key["mixer_name"], dict(key["mixer_options"]))}, max_len=key["seq_len"])


def run_cell(key: Mapping[str, Any], p: Preset, data, log: Callable[[str], None] | None) -> dict[str, Any]:
    """Trains one grid cell (every learning rate at once); the figures of its row."""
    from effarch import mixers as mixers_lib  # pylint: disable=import-outside-toplevel
    from effarch.models import LM  # pylint: disable=import-outside-toplevel
    from effarch.train import sweep  # pylint: disable=import-outside-toplevel

    seq_len = key["seq_len"]
    mixer = mixers_lib.build(key["mixer_name"], d_model=key["d_model"], **key["mixer_options"])
    state = sweep.state_bytes(mixer, max_len=seq_len)
    settings = [sweep.Setting(lr=lr, weight_decay=p.weight_decay) for lr in p.lrs]
    steps = p.num_steps(seq_len)
    result = sweep.train_settings(
        LM(config=model_config(key)), settings, train=data["train"], test=data["test"],
        batch_size=p.batch(seq_len), steps=steps, eval_every=min(p.eval_every, steps), seed=key["seed"],
        target_accuracy=0.99, warmup_steps=min(p.warmup_steps, steps // 10), log=log)
    best = result["best"]
    return {
        "status": "ok",
        "accuracy": best["best_accuracy"],
        "final_accuracy": best["accuracy"],
        "best_lr": best["lr"],
        "settings": result["settings"],
        "params": result["params"],
        "state_bytes": state,
        "model_state_bytes": 2 * state,
        "steps": result["steps"],
        "max_steps": steps,
        "stopped_early": result["stopped_early"],
        "curve": result["curve"],
        "batch_size": p.batch(seq_len),
        "weight_decay": p.weight_decay,
        "wall_s": round(result["wall_s"], 2),
    }


def _task_data(p: Preset, seq_len: int, kv: int, seed: int) -> dict[str, Any]:
    from effarch.data import synthetic  # pylint: disable=import-outside-toplevel

    options = dict(vocab_size=p.vocab_size, power_a=0.01, random_non_queries=p.random_non_queries)
    return {"train": synthetic.mqar(seed, p.num_train, seq_len, kv, **options),
            "test": synthetic.mqar(seed + 1_000_003, p.num_test, seq_len, kv, **options)}


def latest_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per cell (the last written), in first-written order."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        out[json.dumps([row.get(f) for f in KEY_FIELDS], sort_keys=True)] = dict(row)
    return list(out.values())


def run_sweep(preset: str = "cpu", workdir: str | pathlib.Path | None = None, *, mixers=None, d_models=None,
              tasks=None, lrs=None, steps=None, vocab_size=None, batch_size=None, seed: int = 0, plot_only: bool = False, retry_errors: bool = False,
              verbose: bool = False, stream: TextIO = sys.stdout) -> list[dict[str, Any]]:
    """Runs (or resumes) the sweep into ``workdir``; returns every row of results.jsonl."""
    from effarch.train import sweep  # pylint: disable=import-outside-toplevel

    p = resolve(preset, mixers=mixers, d_models=d_models, tasks=tasks, lrs=lrs, steps=steps, vocab_size=vocab_size,
                batch_size=batch_size)
    workdir = pathlib.Path(workdir or f"runs/mqar-{preset}")
    workdir.mkdir(parents=True, exist_ok=True)
    results = sweep.ResultsLog(workdir / "results.jsonl", KEY_FIELDS)

    def say(text: str) -> None:
        print(text, file=stream, flush=True)

    if not plot_only:
        cells = [cell_key(m, d, t, kv, p, seed) for (t, kv) in p.tasks for d in p.d_models for m in p.mixers]
        keyed = {results.key(r): r for r in results.rows()}
        todo = [c for c in cells if results.key(c) not in keyed
                or (retry_errors and keyed[results.key(c)].get("status") == "error")]
        say(f"mqar --preset {preset}: {len(cells)} cells ({len(p.mixers)} mixers x {len(p.d_models)} d_model x "
            f"{len(p.tasks)} tasks), {len(p.lrs)} learning rates each; workdir {workdir}")
        if len(todo) < len(cells):
            say(f"skipped {len(cells) - len(todo)} finished cell(s) already in {workdir / 'results.jsonl'}")
        progress = sweep.Progress(total=len(cells), done=len(cells) - len(todo), stream=stream)
        prov = sweep.provenance()
        data_cache: dict[tuple[int, int], Any] = {}
        errors = 0
        for cell in todo:
            t, kv = cell["seq_len"], cell["num_kv_pairs"]
            name = f"{cell['mixer']} d_model={cell['d_model']} seq_len={t} kv={kv}"
            progress.start(name)
            if (t, kv) not in data_cache:
                data_cache.clear()  # one task's data at a time
                data_cache[(t, kv)] = _task_data(p, t, kv, seed)
            start = time.perf_counter()
            try:
                figures = run_cell(cell, p, data_cache[(t, kv)], (lambda s: say("    " + s)) if verbose else None)
                summary = (f"accuracy {figures['accuracy']:.3f} (lr {figures['best_lr']:g}), "
                           f"{figures['steps']} steps{' (early stop)' if figures['stopped_early'] else ''}, "
                           f"state {figures['state_bytes']:,} B")
            except Exception as err:  # pylint: disable=broad-except
                errors += 1
                figures = {"status": "error", "error": f"{type(err).__name__}: {err}",
                           "traceback": traceback.format_exc(limit=8), "wall_s": round(time.perf_counter() - start, 2)}
                summary = f"ERROR {figures['error']} (recorded; the sweep goes on)"
            results.append({**cell, **figures, "preset": preset, **prov})
            progress.finish(name, summary)
        if errors:
            say(f"{errors} cell(s) failed; their rows have status 'error' (rerun with --retry_errors).")
    rows = latest_rows(results.rows())
    plots = make_plots(rows, workdir)
    (workdir / "table.md").write_text(table(rows))
    say(table(rows))
    say(f"results {workdir / 'results.jsonl'}" + "".join(f", {path}" for path in plots))
    return results.rows()


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok"]


def _tasks(rows):
    return sorted({(r["seq_len"], r["num_kv_pairs"]) for r in rows})


def _mixer_order(rows):
    order = list(MIXERS)
    return sorted({r["mixer"] for r in rows}, key=lambda m: order.index(m) if m in order else len(order))


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: accuracy (and state bytes of one layer) per mixer x d_model, one column group per task."""
    rows = latest_rows(rows)
    tasks, mixers = _tasks(rows), _mixer_order(rows)
    d_models = sorted({r["d_model"] for r in rows})
    index = {(r["mixer"], r["d_model"], r["seq_len"], r["num_kv_pairs"]): r for r in rows}
    head = ["mixer", "d_model"] + [f"T={t}, kv={kv}" for t, kv in tasks] + ["state bytes / layer (per task)",
                                                                             "params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in mixers:
        for d in d_models:
            cells = [index.get((m, d, t, kv)) for t, kv in tasks]
            if not any(cells):
                continue
            accs = []
            for r in cells:
                if r is None:
                    accs.append("")
                elif r.get("status") != "ok":
                    accs.append("error")
                else:
                    accs.append(f"{r['accuracy']:.3f}" + ("" if r["stopped_early"] else "*"))
            states = " / ".join(f"{r['state_bytes']:,}" if r and r.get("status") == "ok" else "-" for r in cells)
            params = next((f"{r['params']:,}" for r in cells if r and r.get("status") == "ok"), "")
            lines.append(f"| {m} | {d} | " + " | ".join(accs) + f" | {states} | {params} |")
    lines.append("")
    lines.append("Accuracy: held-out, best learning rate; * = did not reach 0.99 within the step budget.")
    return "\n".join(lines) + "\n"


def make_plots(rows: Sequence[Mapping[str, Any]], workdir: pathlib.Path) -> list[pathlib.Path]:
    """The two figures from the rows; returns their paths (none without matplotlib or rows)."""
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    except ImportError:
        return []
    rows = _ok(latest_rows(rows))
    if not rows:
        return []
    tasks, mixers = _tasks(rows), _mixer_order(rows)
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(mixers)}
    markers = "osD^v<>ph*"
    paths = []

    fig, axes = plt.subplots(1, len(tasks), figsize=(max(6.4, 4.2 * len(tasks)), 3.8), squeeze=False, sharey=True)
    for ax, (t, kv) in zip(axes[0], tasks):
        for m in mixers:
            points = sorted((r["d_model"], r["accuracy"]) for r in rows
                            if r["mixer"] == m and (r["seq_len"], r["num_kv_pairs"]) == (t, kv))
            if points:
                ax.plot(*zip(*points), marker="o", color=colors[m], label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["d_model"] for r in rows}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_title(f"seq_len {t}, {kv} KV pairs")
        ax.set_xlabel("d_model")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy (held-out)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.suptitle("MQAR: accuracy vs model width (2 layers, best learning rate)")
    fig.tight_layout()
    paths.append(workdir / "accuracy_vs_d_model.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in mixers:
        for j, (t, kv) in enumerate(tasks):
            points = sorted((r["state_bytes"], r["accuracy"]) for r in rows
                            if r["mixer"] == m and (r["seq_len"], r["num_kv_pairs"]) == (t, kv))
            if points:
                ax.plot(*zip(*points), marker=markers[j % len(markers)], color=colors[m], alpha=0.85,
                        linestyle="-" if j == len(tasks) - 1 else ":", label=f"{m}, T={t} kv={kv}")
    ax.set_xscale("log")
    ax.set_xlabel("state bytes per mixer layer (decode cache at max_len = seq_len, float32)")
    ax.set_ylabel("MQAR accuracy (held-out)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3, which="both")
    ax.set_title("MQAR: accuracy vs recurrent state size")
    ax.legend(fontsize=7, ncol=2, loc="center left")  # the top band holds attention's points
    fig.tight_layout()
    paths.append(workdir / "accuracy_vs_state.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    run_sweep(FLAGS.preset, FLAGS.workdir, mixers=FLAGS.mixers, d_models=FLAGS.d_models, tasks=FLAGS.tasks,
              lrs=FLAGS.lrs, steps=FLAGS.steps, vocab_size=FLAGS.vocab_size, batch_size=FLAGS.batch_size,
              seed=FLAGS.seed, plot_only=FLAGS.plot_only,
              retry_errors=FLAGS.retry_errors, verbose=FLAGS.verbose)


if __name__ == "__main__":
    app.run(main)
