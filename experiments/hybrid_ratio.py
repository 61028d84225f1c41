r"""Hybrid ratio: how many attention layers a recurrent (Mamba-2) stack needs, and where.

    python experiments/hybrid_ratio.py --workdir runs/hybrid_ratio              # cpu preset
    python experiments/hybrid_ratio.py --preset smoke --workdir /tmp/hr        # seconds
    python experiments/hybrid_ratio.py --preset gpu --workdir runs/hr-gpu
    python experiments/hybrid_ratio.py --recurrent gated_deltanet --fractions 0,1/8,1

At a fixed depth, width, parameter count and token budget, the fraction of
attention layers runs over ``--fractions`` (default 0, 1/16, 1/8, 1/4, 1/2, 1;
the attention layers spread evenly, ``effarch.models.config.attention_layout``),
and for one fraction (``--placement_fraction``, default 1/8 -- Mamba-2's best
ablation, 6 of 48 layers) the attention layers are also put all first, all
last and in the middle. Every architecture is trained twice from scratch:

- ``lm``: byte-level language modelling on the embedded stdlib corpus, scored
  in bits per byte on held-out documents;
- ``mqar``: multi-query associative recall (``effarch.data.synthetic.mqar``),
  scored by accuracy on held-out MQAR examples.

Parameter count: attention and recurrent layers differ in size, so each
architecture's MLP width ``d_ff`` (shared by all its layers) is chosen to bring
its parameter count closest to that of the all-recurrent model at the preset's
``d_ff``; every row records ``d_ff`` and ``params`` (the results page states
the spread). Each run trains two learning rates side by side
(``sweep.train_settings``) and reports the better one.

Writes, in ``--workdir``: ``results.jsonl`` (one row per (task, fraction,
placement), with config, params, figures, steps, wall time, provenance; a run
that crashes gets a row with ``status: "error"`` and is retried on the next
invocation), ``hybrid_ratio.png`` (both figures against the attention
fraction) and ``hybrid_placement.png`` (the placements). Rerunning skips the
finished rows. See docs/results/hybrid_ratio.md.
"""

from __future__ import annotations

import dataclasses
import fractions
import json
import math
import pathlib
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np

# Placements of the attention layers for ``placement_fraction``.
PLACEMENTS = ("even", "first", "last", "middle")
DEFAULT_FRACTIONS = ("0", "1/16", "1/8", "1/4", "1/2", "1")
TASKS = ("lm", "mqar")
KEY_FIELDS = ("preset", "recurrent", "task", "fraction", "placement")


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of one preset.

    The model: ``n_layers`` blocks of width ``d_model``; attention with
    ``num_heads`` heads; the recurrent mixer with ``recurrent_options``
    (applied where the mixer has such a field). ``d_ff`` is the MLP width of
    the all-recurrent model (the others get theirs to match its parameters).
    Both tasks train ``steps`` updates of ``batch_size`` rows of ``seq_len``
    tokens (so the same token budget for every architecture), at each of
    ``lrs``, with linear warmup over a tenth of the steps and cosine decay to a
    tenth of the peak. ``attention_options`` go to every attention layer (e.g.
    ``qkv_conv_size``).
    """

    n_layers: int
    d_model: int
    d_ff: int
    num_heads: int
    recurrent_options: dict[str, Any]
    lrs: tuple[float, ...]
    weight_decay: float
    # Language modelling.
    lm_seq_len: int
    lm_batch_size: int
    lm_steps: int
    lm_train_rows: int
    lm_test_rows: int
    corpus_bytes: int | None
    # MQAR.
    mqar_seq_len: int
    mqar_kv_pairs: int
    mqar_vocab: int
    mqar_batch_size: int
    mqar_steps: int
    mqar_train_rows: int
    mqar_test_rows: int
    eval_every: int
    dtype: str = "float32"
    scan_layers: bool = True
    attention_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    placement_fraction: str = "1/8"
    fractions: tuple[str, ...] = DEFAULT_FRACTIONS
    placements: tuple[str, ...] = PLACEMENTS


PRESETS = {
    # Seconds: the test's check that every part runs, rows and plots appear.
    "smoke": Preset(
        n_layers=1, d_model=16, d_ff=32, num_heads=2,
        recurrent_options={"d_state": 8, "head_dim": 8, "chunk_size": 16, "implementation": "quadratic"},
        lrs=(3e-3, 1e-2), weight_decay=0.0,
        lm_seq_len=32, lm_batch_size=4, lm_steps=2, lm_train_rows=16, lm_test_rows=4, corpus_bytes=200_000,
        mqar_seq_len=32, mqar_kv_pairs=4, mqar_vocab=256, mqar_batch_size=4, mqar_steps=2,
        mqar_train_rows=16, mqar_test_rows=4, eval_every=2, scan_layers=False,
        placement_fraction="1", fractions=("0", "1"), placements=("even",),
    ),
    # A 2-core machine, one single-threaded slot: 16 narrow layers so that
    # 1/16 is one whole layer. Sized by measurement (docs/results/hybrid_ratio.md).
    "cpu": Preset(
        n_layers=16, d_model=32, d_ff=64, num_heads=2,
        recurrent_options={"d_state": 16, "head_dim": 16, "chunk_size": 64},
        lrs=(3e-3, 1e-2), weight_decay=0.0,
        lm_seq_len=128, lm_batch_size=8, lm_steps=120, lm_train_rows=960, lm_test_rows=64,
        corpus_bytes=3_000_000,
        mqar_seq_len=64, mqar_kv_pairs=8, mqar_vocab=64, mqar_batch_size=16, mqar_steps=300,
        mqar_train_rows=4800, mqar_test_rows=256, eval_every=60,
    ),
    # The recall half on a 2-core CPU: the cpu preset's 16 narrow layers did not learn MQAR in 300
    # steps, so MQAR's own recipe (experiments/mqar.py: 16 pairs in 64 tokens, vocabulary 256, batch
    # 64, early stop at 99%) on 4 layers of width 64, where the fractions are 0, 1/4 (1:3, the
    # anchors' threshold), 1/2 and 1, the attention layers spread evenly. 1,000 steps: a Mamba-2
    # step took 1.2-3 s here (two learning rates, load 2-4); the four cells took 115 minutes on the
    # shared machine (docs/results/hybrid_ratio.md); each placement at 1/4 adds about 25.
    "cpu_recall": Preset(
        n_layers=4, d_model=64, d_ff=128, num_heads=2,
        recurrent_options={"d_state": 16, "head_dim": 16, "chunk_size": 64},
        lrs=(3.16e-3, 1e-2), weight_decay=0.0,
        lm_seq_len=128, lm_batch_size=8, lm_steps=300, lm_train_rows=2400, lm_test_rows=64,
        corpus_bytes=3_000_000,
        mqar_seq_len=64, mqar_kv_pairs=16, mqar_vocab=256, mqar_batch_size=64, mqar_steps=1000,
        mqar_train_rows=20_000, mqar_test_rows=1000, eval_every=50,
        placement_fraction="1/4", fractions=("0", "1/4", "1/2", "1"), placements=("even",),
    ),
    # One GPU: 32 layers (1/16 = 2 layers), width 512, ~100M tokens of text.
    "gpu": Preset(
        n_layers=32, d_model=512, d_ff=1024, num_heads=8,
        recurrent_options={"d_state": 64, "head_dim": 64, "chunk_size": 128},
        lrs=(1e-3, 3e-3), weight_decay=0.1,
        lm_seq_len=512, lm_batch_size=64, lm_steps=3000, lm_train_rows=190_000, lm_test_rows=1024,
        corpus_bytes=None,
        mqar_seq_len=512, mqar_kv_pairs=64, mqar_vocab=8192, mqar_batch_size=64, mqar_steps=4000,
        mqar_train_rows=200_000, mqar_test_rows=2000, eval_every=500, dtype="bfloat16",
    ),
}

# The recall half again, the attention layers with Primer's q/k/v convolutions (3 taps): in
# cpu_recall plain attention (no short convolution anywhere in an all-attention stack) had not
# learned MQAR in 1,000 steps, while experiments/mqar.py's attention with a short convolution in
# front solves it in 350; the Mamba-2 layers already have theirs. Fraction 0 is cpu_recall's model.
PRESETS["cpu_recall_conv"] = dataclasses.replace(PRESETS["cpu_recall"], attention_options={"qkv_conv_size": 3})


def parse_fraction(text: str) -> fractions.Fraction:
    """``"1/16"`` or ``"0.0625"`` -> Fraction in [0, 1]."""
    try:
        value = fractions.Fraction(text.strip()).limit_denominator(1024)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"fraction {text!r}; expected a number in [0, 1] such as 1/8 or 0.125.") from None
    if not 0 <= value <= 1:
        raise ValueError(f"fraction {text!r}; expected a number in [0, 1].")
    return value


def num_attention(n_layers: int, fraction: fractions.Fraction) -> int:
    """Attention layers for ``fraction`` of ``n_layers`` (rounded half up; see the row's ``attention_fraction``)."""
    return math.floor(fraction * n_layers + fractions.Fraction(1, 2))


def layer_pattern(n_layers: int, n_attention: int, placement: str, recurrent_letter: str = "M") -> str:
    """One letter per layer: ``n_attention`` ``A`` placed as ``placement`` among ``recurrent_letter``.

    ``even``: spread evenly, each attention layer closing its group
    (``attention_layout``: 16 layers, 2 attention -> layers 7 and 15);
    ``first`` / ``last``: all at the bottom / top; ``middle``: a block centred
    in the stack.
    """
    if not 0 <= n_attention <= n_layers:
        raise ValueError(f"n_attention={n_attention}; expected 0..{n_layers}.")
    a, r = n_attention, n_layers - n_attention
    if placement == "even":
        return "".join("A" if (i + 1) * a // n_layers > i * a // n_layers else recurrent_letter
                       for i in range(n_layers))
    if placement == "first":
        return "A" * a + recurrent_letter * r
    if placement == "last":
        return recurrent_letter * r + "A" * a
    if placement == "middle":
        before = r // 2
        return recurrent_letter * before + "A" * a + recurrent_letter * (r - before)
    raise ValueError(f"placement={placement!r}; expected one of {PLACEMENTS}.")


def recurrent_letter(name: str) -> str:
    """The pattern letter of a recurrent mixer (``DEFAULT_MIXERS``), e.g. mamba2 -> M."""
    from effarch import mixers as mixers_lib  # pylint: disable=import-outside-toplevel
    from effarch.models.config import DEFAULT_MIXERS  # pylint: disable=import-outside-toplevel

    for letter, (mixer, _) in DEFAULT_MIXERS.items():
        if mixer == name and letter != "A":
            return letter
    mixers_lib.config_class(name)  # raises with the valid names if unknown
    raise ValueError(f"--recurrent={name!r} has no pattern letter in DEFAULT_MIXERS; choose a mixer that has one.")


def _mixer_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` restricted to the fields mixer ``name``'s config has."""
    from effarch import mixers as mixers_lib  # pylint: disable=import-outside-toplevel

    fields = {f.name for f in dataclasses.fields(mixers_lib.config_class(name))}
    return {k: v for k, v in options.items() if k in fields}


def make_config(preset: Preset, pattern: str, d_ff: int, recurrent: str, *, vocab_size: int, max_len: int):
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from effarch.models.config import LMConfig  # pylint: disable=import-outside-toplevel

    letter = recurrent_letter(recurrent)
    attn = _mixer_options("attention", {"num_heads": preset.num_heads,
                                        "chunk_size": preset.recurrent_options.get("chunk_size", 64),
                                        **preset.attention_options})
    mixers = {"A": ("attention", attn), letter: (recurrent, _mixer_options(recurrent, preset.recurrent_options))}
    return LMConfig(vocab_size=vocab_size, d_model=preset.d_model, n_layers=preset.n_layers, pattern=pattern,
                    d_ff=d_ff, mixers=mixers, max_len=max_len, dtype=jnp.dtype(preset.dtype),
                    scan_layers=preset.scan_layers)


def count_params(config) -> int:
    """Parameters of ``LM(config)`` by shape inference (nothing is computed)."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from effarch.models.lm import LM  # pylint: disable=import-outside-toplevel

    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda t: LM(config=config).init(jax.random.key(0), t), tokens)
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)))


class ParamMatcher:
    """Chooses each pattern's ``d_ff`` so its parameters come closest to the all-recurrent model's.

    A model's parameter count is linear in each letter's number of layers and
    in ``d_ff``; the per-letter and per-``d_ff`` terms come from four one-layer
    models (shape inference only), then ``d_ff`` is solved for.
    """

    def __init__(self, preset: Preset, recurrent: str, *, vocab_size: int):
        self.preset, self.recurrent, self.vocab_size = preset, recurrent, vocab_size
        letter = recurrent_letter(recurrent)
        self.letter = letter
        small = dataclasses.replace(preset, n_layers=1)

        def one_layer(pattern, d_ff):
            return count_params(make_config(small, pattern, d_ff, recurrent, vocab_size=vocab_size, max_len=64))

        f0, f1 = preset.d_ff, preset.d_ff + 1
        self.per_dff = one_layer(letter, f1) - one_layer(letter, f0)  # MLP params per unit of d_ff, per layer
        self.layer = {l: one_layer(l, f0) for l in ("A", letter)}      # embedding + 1 block at d_ff = f0
        two = make_config(dataclasses.replace(preset, n_layers=2), letter * 2, f0, recurrent,
                          vocab_size=vocab_size, max_len=64)
        self.block = {letter: count_params(two) - self.layer[letter]}
        self.base = self.layer[letter] - self.block[letter]               # embeddings and final norm
        self.block["A"] = self.layer["A"] - self.base
        self.target = self.predict(letter * preset.n_layers, preset.d_ff)

    def predict(self, pattern: str, d_ff: int) -> int:
        return (self.base + sum(self.block[c] for c in pattern)
                + len(pattern) * self.per_dff * (d_ff - self.preset.d_ff))

    def d_ff(self, pattern: str) -> int:
        """The ``d_ff >= 1`` whose parameter count is closest to the target."""
        at_base = self.predict(pattern, self.preset.d_ff)
        step = len(pattern) * self.per_dff
        guess = self.preset.d_ff + round((self.target - at_base) / step)
        return max(1, min((guess - 1, guess, guess + 1), key=lambda f: abs(self.predict(pattern, f) - self.target)))


@dataclasses.dataclass(frozen=True)
class Cell:
    """One architecture of the grid."""

    fraction: str  # label, e.g. "1/16"
    placement: str
    n_attention: int
    pattern: str


def grid(preset: Preset, fraction_labels: Sequence[str], placement_fraction: str, placements: Sequence[str],
         letter: str) -> list[Cell]:
    """The ratio sweep (evenly placed) then the placements of ``placement_fraction``."""
    cells, seen = [], set()
    for label in fraction_labels:
        n = num_attention(preset.n_layers, parse_fraction(label))
        cells.append(Cell(label, "even", n, layer_pattern(preset.n_layers, n, "even", letter)))
        seen.add((label, "even"))
    n = num_attention(preset.n_layers, parse_fraction(placement_fraction))
    for placement in placements:
        if (placement_fraction, placement) not in seen:
            cells.append(Cell(placement_fraction, placement, n,
                              layer_pattern(preset.n_layers, n, placement, letter)))
            seen.add((placement_fraction, placement))
    return cells


def _latest(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """The last row of each key (a retried error is superseded by its rerun)."""
    out = {}
    for row in rows:
        out[tuple(json.dumps(row.get(f), sort_keys=True) for f in KEY_FIELDS)] = row
    return out


def _data(preset: Preset, task: str) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    if task == "lm":
        from effarch import data  # pylint: disable=import-outside-toplevel
        from effarch.train.sweep import text_examples  # pylint: disable=import-outside-toplevel

        corpus = data.load_corpus(max_bytes=preset.corpus_bytes)
        train, held_out = data.split(corpus, eval_fraction=0.05)
        return (text_examples(train.data, seq_len=preset.lm_seq_len, num_rows=preset.lm_train_rows, seed=0),
                text_examples(held_out.data, seq_len=preset.lm_seq_len, num_rows=preset.lm_test_rows, seed=1))
    from effarch.data import synthetic  # pylint: disable=import-outside-toplevel

    def make(seed, rows):
        return synthetic.mqar(seed, rows, preset.mqar_seq_len, preset.mqar_kv_pairs, vocab_size=preset.mqar_vocab)

    return make(0, preset.mqar_train_rows), make(1, preset.mqar_test_rows)


def run(preset_name: str = "cpu", workdir: str | pathlib.Path = "runs/hybrid_ratio", recurrent: str = "mamba2",
        fraction_labels: Sequence[str] | None = None, placement_fraction: str | None = None,
        placements: Sequence[str] | None = None, tasks: Sequence[str] = TASKS, stream=sys.stdout) -> list[dict]:
    """Runs (or resumes) the grid; returns every latest row. See the module docstring."""
    from effarch.models.lm import LM  # pylint: disable=import-outside-toplevel
    from effarch.train import sweep  # pylint: disable=import-outside-toplevel

    if preset_name not in PRESETS:
        raise ValueError(f"--preset={preset_name!r}; expected one of {sorted(PRESETS)}.")
    preset = PRESETS[preset_name]
    fraction_labels = tuple(fraction_labels or preset.fractions)
    placement_fraction = placement_fraction or preset.placement_fraction
    placements = tuple(placements or preset.placements)
    for label in (*fraction_labels, placement_fraction):
        value = parse_fraction(label)
        if value * preset.n_layers != num_attention(preset.n_layers, value):
            print(f"note: fraction {label} of {preset.n_layers} layers is rounded to "
                  f"{num_attention(preset.n_layers, value)} attention layers", file=stream, flush=True)
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"task {task!r}; expected one of {TASKS}.")
    letter = recurrent_letter(recurrent)
    cells = grid(preset, fraction_labels, placement_fraction, placements, letter)
    workdir = pathlib.Path(workdir)
    log = sweep.ResultsLog(workdir / "results.jsonl", key_fields=KEY_FIELDS)
    vocab = {"lm": 256, "mqar": preset.mqar_vocab}
    seq_len = {"lm": preset.lm_seq_len, "mqar": preset.mqar_seq_len}
    jobs = [(task, cell) for cell in cells for task in tasks]

    def key_of(task, cell):
        return {"preset": preset_name, "recurrent": recurrent, "task": task, "fraction": cell.fraction,
                "placement": cell.placement}

    def finished(task, cell):
        latest = _latest(log.rows())
        row = latest.get(tuple(json.dumps(v, sort_keys=True) for v in key_of(task, cell).values()))
        return row is not None and row.get("status") == "ok"

    done = sum(finished(t, c) for t, c in jobs)
    progress = sweep.Progress(len(jobs), done=done, stream=stream)
    if done:
        print(f"{done} of {len(jobs)} runs already in {log.path}; skipping them", file=stream, flush=True)
    matchers, datasets = {}, {}
    for task, cell in jobs:
        if finished(task, cell):
            continue
        name = f"{task} fraction={cell.fraction} placement={cell.placement} {cell.pattern}"
        progress.start(name)
        row = {**key_of(task, cell), "n_layers": preset.n_layers, "n_attention": cell.n_attention,
               "attention_fraction": cell.n_attention / preset.n_layers, "pattern": cell.pattern}
        start = time.perf_counter()
        try:
            if task not in matchers:
                matchers[task] = ParamMatcher(preset, recurrent, vocab_size=vocab[task])
                datasets[task] = _data(preset, task)
            d_ff = matchers[task].d_ff(cell.pattern)
            config = make_config(preset, cell.pattern, d_ff, recurrent, vocab_size=vocab[task],
                                 max_len=seq_len[task])
            model = LM(config=config)
            train, test = datasets[task]
            steps = preset.lm_steps if task == "lm" else preset.mqar_steps
            result = sweep.train_settings(
                model, [sweep.Setting(lr=lr, weight_decay=preset.weight_decay) for lr in preset.lrs],
                train=train, test=test,
                batch_size=preset.lm_batch_size if task == "lm" else preset.mqar_batch_size,
                steps=steps, eval_every=min(preset.eval_every, steps), seed=0,
                # MQAR stops at 99% held-out accuracy (as experiments/mqar.py does); LM trains its budget.
                target_accuracy=None if task == "lm" else 0.99, warmup_steps=max(1, steps // 10), min_lr_ratio=0.1,
                select="loss" if task == "lm" else "accuracy",
                log=lambda line: print(f"    {line}", file=stream, flush=True))
            best = result["best"]
            figures = {"loss_nats": best["loss"], "bits_per_byte": best["loss"] / math.log(2)} if task == "lm" else {
                "accuracy": best["accuracy"], "best_accuracy": best["best_accuracy"], "loss_nats": best["loss"]}
            row.update(
                status="ok", **figures, lr=best["lr"], settings=result["settings"], curve=result["curve"],
                d_ff=d_ff, params=result["params"], params_target=matchers[task].target,
                state_bytes=sweep.state_bytes(model, max_len=seq_len[task]),
                steps=result["steps"], tokens=result["steps"] * train[0].shape[1]
                * (preset.lm_batch_size if task == "lm" else preset.mqar_batch_size),
                wall_s=result["wall_s"], config=config.to_dict(),
                data={"seq_len": seq_len[task], "train_rows": len(train[0]), "test_rows": len(test[0]),
                      **({"corpus_bytes": preset.corpus_bytes} if task == "lm" else
                         {"num_kv_pairs": preset.mqar_kv_pairs, "vocab_size": preset.mqar_vocab})},
                **sweep.provenance())
            summary = (f"{row['bits_per_byte']:.3f} bits/byte" if task == "lm" else f"accuracy {row['accuracy']:.3f}")
            summary += f", {row['params']:,} params (d_ff {d_ff}), lr {best['lr']:g}"
        except Exception as err:  # pylint: disable=broad-except
            row.update(status="error", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc(),
                       wall_s=time.perf_counter() - start, **sweep.provenance())
            summary = f"ERROR {type(err).__name__}: {err}"
        log.append(row)
        progress.finish(name, summary)
        plot(log.rows(), workdir, placement_fraction=placement_fraction)
    rows = [r for r in _latest(log.rows()).values() if r.get("preset") == preset_name and r.get("recurrent") == recurrent]
    plot(log.rows(), workdir, placement_fraction=placement_fraction)
    return rows


def plot(rows: list[dict[str, Any]], workdir: pathlib.Path, *, placement_fraction: str) -> list[pathlib.Path]:
    """``hybrid_ratio.png`` and ``hybrid_placement.png`` from the latest ok rows (matplotlib)."""
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    except ImportError:
        return []
    ok = [r for r in _latest(rows).values() if r.get("status") == "ok"]
    if not ok:
        return []
    written = []
    series = sorted({(r["preset"], r["recurrent"]) for r in ok})
    metric = {"lm": ("bits_per_byte", "held-out bits/byte (lower is better)"),
              "mqar": ("accuracy", "held-out MQAR accuracy")}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, task in zip(axes, TASKS):
        field, label = metric[task]
        for preset, recurrent in series:
            pts = sorted((r["attention_fraction"], r[field]) for r in ok if r["task"] == task
                         and r["placement"] == "even" and (r["preset"], r["recurrent"]) == (preset, recurrent))
            if pts:
                xs = [_position(x) for x, _ in pts]
                ax.plot(xs, [y for _, y in pts], "o-", label=f"{recurrent} + attention, evenly spread ({preset})")
            others = [r for r in ok if r["task"] == task and r["placement"] != "even"
                      and (r["preset"], r["recurrent"]) == (preset, recurrent)]
            for marker, placement in zip("s^v", ("first", "last", "middle")):
                sel = [r for r in others if r["placement"] == placement]
                if sel:
                    ax.plot([_position(r["attention_fraction"]) for r in sel], [r[field] for r in sel], marker,
                            linestyle="none", alpha=0.8, label=f"attention {placement} ({preset})")
        ticks = sorted({r["attention_fraction"] for r in ok})
        ax.set_xticks([_position(t) for t in ticks], [_label(t) for t in ticks])
        ax.set_xlabel("fraction of layers that are attention")
        ax.set_ylabel(label)
        ax.set_title({"lm": "Byte-level LM (stdlib corpus)", "mqar": "MQAR recall"}[task])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, f"no {task} runs (--tasks)", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("Hybrid ratio at fixed parameters and tokens")
    fig.tight_layout()
    path = workdir / "hybrid_ratio.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, task in zip(axes, TASKS):
        field, label = metric[task]
        sel = [r for r in ok if r["task"] == task and r["fraction"] == placement_fraction]
        sel.sort(key=lambda r: (r["preset"], r["recurrent"], PLACEMENTS.index(r["placement"])
                                if r["placement"] in PLACEMENTS else 99))
        names = [f"{r['placement']}\nA at " + ",".join(str(i + 1) for i, c in enumerate(r["pattern"]) if c == "A")
                 if r["n_attention"] <= 4 else r["placement"] for r in sel]
        bars = ax.bar(range(len(sel)), [r[field] for r in sel], color=[f"C{i}" for i in range(len(sel))],
                      label=[r["placement"] for r in sel])
        for bar, r in zip(bars, sel):
            ax.annotate(f"{r[field]:.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(sel)), names, fontsize=8)
        if not sel:
            ax.text(0.5, 0.5, f"no {task} runs at fraction {placement_fraction}", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_xlabel("placement of the attention layers (layers numbered 1 = first)")
        ax.set_ylabel(label)
        if task == "lm" and sel:
            values = [r[field] for r in sel]
            spread = max(values) - min(values)
            ax.set_ylim(min(values) - max(spread, 0.01) * 1.5, max(values) + max(spread, 0.01) * 1.5)
        ax.set_title({"lm": "Byte-level LM", "mqar": "MQAR recall"}[task] + f", attention fraction {placement_fraction}")
        if sel:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Where the attention layers go")
    fig.tight_layout()
    path = workdir / "hybrid_placement.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the latest ok rows: one line per architecture, both tasks side by side."""
    ok = [r for r in _latest(rows).values() if r.get("status") == "ok"]
    cells = {}
    for r in ok:
        cells.setdefault((r["preset"], r["recurrent"], r["attention_fraction"], r["placement"]), {})[r["task"]] = r
    lines = ["| fraction | placement | pattern | LM bits/byte | MQAR accuracy | params (LM) | d_ff | LM lr / MQAR lr "
             "| wall s (LM + MQAR) |", "|---|---|---|---|---|---|---|---|---|"]
    order = sorted(cells, key=lambda k: (k[0], k[1], k[3] != "even", k[2],
                                         PLACEMENTS.index(k[3]) if k[3] in PLACEMENTS else 99))
    for key in order:
        lm, mq = cells[key].get("lm"), cells[key].get("mqar")
        any_row = lm or mq
        lines.append(
            f"| {any_row['fraction']} | {key[3]} | `{any_row['pattern']}` "
            f"| {lm['bits_per_byte']:.3f} |" if lm else f"| {any_row['fraction']} | {key[3]} | `{any_row['pattern']}` | - |")
        lines[-1] += (f" {mq['accuracy']:.3f} (best {mq['best_accuracy']:.3f}) |" if mq else " - |")
        lines[-1] += (f" {lm['params']:,} | {lm['d_ff']} |" if lm else f" {mq['params']:,} | {mq['d_ff']} |")
        lines[-1] += f" {lm['lr'] if lm else '-'} / {mq['lr'] if mq else '-'} |"
        lines[-1] += " " + " + ".join(f"{r['wall_s']:.0f}" if r else "-" for r in (lm, mq)) + " |"
    return "\n".join(lines)


def _position(fraction: float) -> float:
    """x position of a fraction: log-spaced, with 0 one step left of 1/32."""
    return math.log2(fraction) if fraction > 0 else -6.0


def _label(fraction: float) -> str:
    return str(fractions.Fraction(fraction).limit_denominator(1024))


def main(argv):
    del argv
    from absl import flags  # pylint: disable=import-outside-toplevel

    f = flags.FLAGS
    if f.table:
        from effarch.train.sweep import ResultsLog  # pylint: disable=import-outside-toplevel

        print(table(ResultsLog(pathlib.Path(f.workdir) / "results.jsonl", KEY_FIELDS).rows()))
        return
    run(f.preset, f.workdir or f"runs/hybrid_ratio-{f.preset}", f.recurrent, f.fractions, f.placement_fraction,
        f.placements, f.tasks)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_enum("preset", "cpu", sorted(PRESETS), "Sizes: smoke (seconds), cpu (one CPU slot), gpu.")
    flags.DEFINE_string("workdir", None, "Folder of results.jsonl and the plots (default runs/hybrid_ratio-<preset>).")
    flags.DEFINE_string("recurrent", "mamba2", "Mixer of the non-attention layers (e.g. mamba2, gated_deltanet).")
    flags.DEFINE_list("fractions", None, "Attention fractions, e.g. 0,1/16,1/8,1/4,1/2,1 (default: the preset's).")
    flags.DEFINE_string("placement_fraction", None, "The fraction whose placements are compared (default 1/8).")
    flags.DEFINE_list("placements", None, f"Placements at that fraction, of {','.join(PLACEMENTS)}.")
    flags.DEFINE_list("tasks", list(TASKS), "Which of lm, mqar to run.")
    flags.DEFINE_bool("table", False, "Print the markdown table of --workdir's results and exit.")
    app.run(main)
