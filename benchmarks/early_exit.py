"""Early exit on a trained model: layers used per token, bits/byte and wall time against the threshold.

    python experiments/train_lm.py --workdir runs/cpu-small-exits --model "early_exit=(0,1,2)"
    python benchmarks/early_exit.py --workdir runs/cpu-small-exits        # ~5 min on 2 cores
    python benchmarks/early_exit.py --workdir DIR --smoke --out /tmp/x    # seconds

The first command trains the quick start's model (preset cpu-small: 3 Mamba-2
layers and one attention layer) with exit heads after layers 0, 1 and 2 and
CALM's depth-weighted loss. This script reads that run (the newest
checkpoint) and, for each confidence measure and threshold
(effarch.models.early_exit):

* ``bpb``: held-out bits/byte when every position, fed the true text, exits at
  its first confident exit (``early_exit.score``; the run's held-out split,
  ``--eval_rows`` rows of the run's ``seq_len``, the first ``--prompt_len``
  bytes of a row at full depth), and ``mean_layers`` / ``exit_fraction``
  (the share of positions leaving at each exit) over the same positions.
* ``ms_per_token``: greedy generation at batch 1 (``early_exit.generate``),
  ``--new_tokens`` tokens after a ``--prompt_len``-byte held-out prompt,
  compiled once per measure (the threshold is an argument), median of
  ``--repeats`` calls divided by the new tokens; ``gen_mean_layers`` of those
  tokens. Each row also times the same model decoding without exits
  (``effarch.models.generate``), the calls alternating with the early-exit
  ones (``full_ms_per_token``, ``speedup_vs_full``), so drifting load on a
  shared machine does not bias the ratio; the ``full model`` row holds the
  median of those. Each exit alone (every position read at that exit,
  ``exits=True``: a model cut after that layer) gives the ``static exit``
  rows' bits/byte.

Writes ``early_exit.json`` (with device, versions, command, commit and the
run's step) and ``early_exit.png`` (bits/byte against mean layers used, and
ms/token against the threshold) under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from effarch import data  # noqa: E402
from effarch.models import LM, early_exit, generate  # noqa: E402
from effarch.train import bits_per_byte, cross_entropy, load_run  # noqa: E402

THRESHOLDS = {
    "max_prob": (0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99, 1.0),
    "margin": (0.1, 0.3, 0.5, 0.7, 0.9, 0.98, 1.0),
    "saturation": (0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
}
TRAIN_COMMAND = 'python experiments/train_lm.py --workdir runs/cpu-small-exits --model "early_exit=(0,1,2)"'


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/cpu-small-exits",
                        help="a training run of a model with early exits (config.json + checkpoints/)")
    parser.add_argument("--out", default="docs/results/early_exit", help="folder for the JSON and the plot")
    parser.add_argument("--measures", default="max_prob,saturation",
                        help=f"comma-separated confidence measures, of {', '.join(early_exit.CONFIDENCE_MEASURES)}")
    parser.add_argument("--eval_rows", type=int, default=16, help="held-out rows scored per threshold")
    parser.add_argument("--prompt_len", type=int, default=32, help="leading bytes run at full depth")
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens generated per timed call")
    parser.add_argument("--repeats", type=int, default=5, help="timed generation calls (median)")
    parser.add_argument("--smoke", action="store_true", help="2 thresholds, 2 rows, 8 tokens, 1 repeat")
    options = parser.parse_args(argv)
    for name in ("eval_rows", "prompt_len", "new_tokens", "repeats"):
        if getattr(options, name) < 1:
            parser.error(f"--{name}={getattr(options, name)}; expected a positive int.")
    options.measures = [m.strip() for m in options.measures.split(",") if m.strip()]
    bad = [m for m in options.measures if m not in early_exit.CONFIDENCE_MEASURES]
    if bad or not options.measures:
        parser.error(f"--measures={','.join(options.measures)!r}: unknown {bad}; expected a comma-separated "
                     f"subset of {', '.join(early_exit.CONFIDENCE_MEASURES)}.")
    if options.smoke:
        options.eval_rows, options.new_tokens, options.repeats = 2, 8, 1
    return options


def held_out_rows(train_config, rows: int) -> np.ndarray:
    """``rows`` consecutive rows of the run's held-out split, ``[rows, seq_len + 1]`` bytes."""
    corpus = data.load_corpus(list(train_config.data), max_bytes=train_config.max_corpus_bytes)
    _, held_out = data.split(corpus, train_config.eval_fraction)
    length = train_config.seq_len + 1
    if len(held_out.data) < rows * length:
        raise ValueError(f"the held-out split has {len(held_out.data):,} bytes; --eval_rows={rows} rows of "
                         f"{length} need {rows * length:,}. Use fewer rows.")
    return held_out.data[: rows * length].reshape(rows, length).astype(np.int32)


def time_pair(full, early, repeats: int) -> tuple[float, float]:
    """Median ms of ``full()`` and ``early()``, called alternately ``repeats`` times after a warm call each.

    Alternating keeps the ratio fair on a machine whose load drifts.
    """
    jax.block_until_ready(full())
    jax.block_until_ready(early())
    times = {full: [], early: []}
    for _ in range(repeats):
        for fn in (full, early):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[fn].append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[full]), statistics.median(times[early])


def plot(rows, path: str, title: str) -> None:
    plt = harness.pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for measure in sorted({r["measure"] for r in rows if r["kind"] == "early exit"}):
        mine = [r for r in rows if r["measure"] == measure]
        left.plot([r["mean_layers"] for r in mine], [r["bpb"] for r in mine], "o-", label=measure)
        for r in mine:
            left.annotate(f"{r['threshold']:g}", (r["mean_layers"], r["bpb"]), fontsize=7,
                          textcoords="offset points", xytext=(3, 3))
        right.plot([r["threshold"] for r in mine], [r["ms_per_token"] for r in mine], "o-", label=measure)
    static = [r for r in rows if r["kind"] == "static exit"]
    left.plot([r["mean_layers"] for r in static], [r["bpb"] for r in static], "k^--", label="each exit alone")
    full = next(r for r in rows if r["kind"] == "full model")
    right.axhline(full["ms_per_token"], color="k", ls="--", label="model without exits")
    left.set(xlabel="mean layers used per position", ylabel="held-out bits/byte",
             title="Quality against compute (labels: threshold)")
    right.set(xlabel="threshold", ylabel="ms/token (greedy, batch 1)", title="Decode time per token")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    harness.save_figure(fig, path, title)


def main(argv=None) -> list[dict]:
    options = parse_args(argv)
    try:
        run = load_run(options.workdir)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"{err}\nTrain a model with exits first, e.g.: {TRAIN_COMMAND}") from err
    cfg = run.model_config
    if not cfg.early_exit:
        raise SystemExit(f"the run in {options.workdir!r} has no early exits (early_exit=()); train one: "
                         f"{TRAIN_COMMAND}")
    if options.prompt_len >= run.train_config.seq_len:
        raise SystemExit(f"--prompt_len={options.prompt_len}; expected fewer than the run's seq_len="
                         f"{run.train_config.seq_len}.")
    lm, variables = LM(config=cfg), {"params": run.params}
    rows_np = held_out_rows(run.train_config, options.eval_rows)
    tokens = jnp.asarray(rows_np)
    prompt = tokens[:1, : options.prompt_len]
    positions = slice(options.prompt_len - 1, None)  # the predictions that exit by confidence (and the last prompt one)
    results = []

    # Each exit alone (every position forced to it), and the model without exits.
    logits, _, _ = jax.jit(lambda v, t: lm.apply(v, t, exits=True))(variables, tokens[:, :-1])
    targets = tokens[:, 1:]
    mask = jnp.zeros(targets.shape).at[:, positions].set(1.0)
    for k, layer in enumerate(cfg.exit_layers):
        nll, count = cross_entropy(logits[k], targets, mask)
        results.append(dict(kind="static exit", measure="", threshold=None, exit=k, mean_layers=float(layer + 1),
                            bpb=bits_per_byte(float(nll / count))))

    def full():
        return generate(lm, variables, prompt, max_new_tokens=options.new_tokens, key=jax.random.key(0),
                        greedy=True)

    full_times = []

    for measure in options.measures:
        thresholds = THRESHOLDS[measure][-2:] if options.smoke else THRESHOLDS[measure]
        for threshold in thresholds:
            scored = early_exit.score(lm, variables, tokens, threshold=threshold, measure=measure,
                                      prompt_len=options.prompt_len)
            nll = np.asarray(scored.nll)[:, positions]
            index = np.asarray(scored.exit_index)[:, positions]
            layers = np.asarray(scored.layers_used)[:, positions]

            def gen(threshold=threshold, measure=measure):
                return early_exit.generate(lm, variables, prompt, max_new_tokens=options.new_tokens,
                                           threshold=threshold, measure=measure, key=jax.random.key(0),
                                           greedy=True)

            full_ms, ms = time_pair(full, lambda: gen().tokens, options.repeats)
            full_times.append(full_ms)
            out = gen()
            results.append(dict(
                kind="early exit", measure=measure, threshold=threshold, bpb=bits_per_byte(float(nll.mean())),
                mean_layers=float(layers.mean()),
                exit_fraction=[float(np.mean(index == k)) for k in range(len(cfg.exit_layers))],
                ms_per_token=ms / options.new_tokens, full_ms_per_token=full_ms / options.new_tokens,
                gen_mean_layers=float(np.asarray(out.layers_used)[0, 1:].mean()),
                speedup_vs_full=full_ms / ms,
            ))
            r = results[-1]
            print(f"{measure:10s} threshold {threshold:<5g} bpb {r['bpb']:.3f}  layers {r['mean_layers']:.2f}  "
                  f"{r['ms_per_token']:.2f} ms/token ({r['speedup_vs_full']:.2f}x)", flush=True)

    results.append(dict(kind="full model", measure="", threshold=None, mean_layers=float(cfg.n_layers),
                        bpb=results[len(cfg.exit_layers) - 1]["bpb"], gen_mean_layers=float(cfg.n_layers),
                        ms_per_token=statistics.median(full_times) / options.new_tokens))
    harness.print_table(results, ["kind", "measure", "threshold", "bpb", "mean_layers", "gen_mean_layers",
                                  "ms_per_token", "speedup_vs_full"])
    os.makedirs(options.out, exist_ok=True)
    setup = dict(workdir=options.workdir, step=run.step, model=cfg.to_dict(), eval_rows=options.eval_rows,
                 seq_len=run.train_config.seq_len, prompt_len=options.prompt_len, new_tokens=options.new_tokens,
                 repeats=options.repeats)
    harness.save_json(os.path.join(options.out, "early_exit.json"), results, setup=setup)
    plot(results, os.path.join(options.out, "early_exit.png"),
         f"Early exit: pattern {cfg.layer_pattern}, d_model {cfg.d_model}, exits after layers {cfg.early_exit} "
         f"(step {run.step}, {jax.devices()[0].device_kind})")
    return results


if __name__ == "__main__":
    main()
