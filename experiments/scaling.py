r"""Scaling laws of byte-level LMs per mixer family: isoFLOP grids and a Chinchilla "approach 3" fit.

    python experiments/scaling.py --preset smoke --workdir /tmp/scaling-smoke     # seconds
    python experiments/scaling.py --preset cpu --workdir docs/results/scaling     # ~40 min, 1 CPU thread
    python experiments/scaling.py --preset gpu --workdir runs/scaling-gpu         # to ~100M parameters
    python experiments/scaling.py --preset cpu --families transformer,gated_deltanet --data my_texts/

For each family (``transformer``, ``mamba2``, ``hybrid`` = Mamba-2 and attention
layers alternating, or any registered mixer name, e.g. ``gated_deltanet``) a
ladder of model sizes is trained for token budgets laid out on isoFLOP lines:
for each FLOP budget C and size, the run trains ``D = C / F(N)`` tokens, F the
training FLOPs per token of ``effarch.models.flops`` (analytic, per mixer; 3 x
forward). Runs outside ``[min_steps, max_steps]`` optimiser steps are left
out. Each run trains two learning rates side by side (``train_settings``,
vmapped) from one initialisation on the same batches and keeps the lower
held-out loss, so a fit is not an artefact of one fixed learning rate.

N is the number of non-embedding parameters (blocks and final norm; the 256 x
d_model byte embedding, tied to the output head, is left out); D is the number
of training tokens (bytes); L is the held-out loss in nats per byte.

Per family, ``L(N, D) = E + A / N^alpha + B / D^beta`` is fitted directly
(Hoffmann et al. 2022, approach 3): Huber loss (delta 1e-3) on
``log L``, the model written as ``log L = LSE(a - alpha log N, b - beta log D, e)``,
minimised by L-BFGS (numpy, below) from the best points of a grid of
initialisations; bootstrap resamples of the runs give confidence intervals on
alpha, beta and the compute-optimal exponent ``a = beta / (alpha + beta)``
(``N_opt ~ C^a``). The isoFLOP curves are also fitted by parabolas in log N
(approach 2), whose minima give a second estimate of ``a``.

Writes, in --workdir: ``results.jsonl`` (one row per (family, size, budget)
run; a killed study reruns only the missing rows), ``fits.json``,
``isoflop.png``, ``frontier.png`` and ``nopt.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# --------------------------------------------------------------------------
# Presets and the grid
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Preset:
    """A study's grid and training settings.

    Attributes:
      sizes: ``(d_model, n_layers)`` ladder (n_layers even, for the hybrid).
      budgets: nominal training FLOP budgets C (isoFLOP lines).
      seq_len, batch_size: tokens per row and rows per step.
      min_steps, max_steps: runs whose ``D / (batch_size seq_len)`` falls outside are left out.
      lr_factors: the learning rates of a run are ``factor * lr_base * sqrt(lr_width / d_model)``.
      head_dim: head width of attention, Mamba-2 and the delta-rule mixers.
      d_state, chunk_size: Mamba-2 state size and the chunk of the chunked forms.
      corpus_bytes: bytes of the corpus read (None: all).
      eval_rows: held-out rows scored at the end of each run.
      bootstrap: bootstrap resamples of each fit.
      families: the default families.
    """

    sizes: tuple[tuple[int, int], ...]
    budgets: tuple[float, ...]
    seq_len: int
    batch_size: int
    min_steps: int
    max_steps: int
    lr_factors: tuple[float, ...] = (1.0, 3.0)
    lr_base: float = 3e-3
    lr_width: int = 64
    head_dim: int = 16
    d_state: int = 16
    chunk_size: int = 64
    corpus_bytes: int | None = 8_000_000
    eval_rows: int = 128
    bootstrap: int = 200
    weight_decay: float = 0.1
    families: tuple[str, ...] = ("transformer", "mamba2", "hybrid")


PRESETS = {
    "smoke": Preset(sizes=((16, 1), (24, 1), (32, 1)), budgets=(4e8,), seq_len=32, batch_size=8,
                    min_steps=4, max_steps=40, head_dim=8, d_state=8, chunk_size=16, corpus_bytes=300_000,
                    eval_rows=16, bootstrap=8, families=("transformer",)),
    # Sized for ~30-40 minutes on one CPU thread (compilation is a good part of it).
    "cpu": Preset(sizes=((16, 2), (24, 2), (32, 2), (48, 2), (64, 2)), budgets=(3e10, 1e11, 3e11),
                  seq_len=128, batch_size=8, min_steps=40, max_steps=1200, bootstrap=100),
    "gpu": Preset(sizes=((256, 4), (384, 6), (512, 8), (640, 10), (768, 12), (1024, 16)),
                  budgets=(1e16, 3e16, 1e17, 3e17), seq_len=512, batch_size=64, min_steps=300,
                  max_steps=30_000, lr_base=1e-3, lr_width=256, head_dim=64, d_state=64, chunk_size=128,
                  corpus_bytes=None, eval_rows=512),
}

# Options of the delta-rule mixers, whose default head width (64) does not fit the small sizes.
_HEAD_DIM_MIXERS = ("deltanet", "gated_deltanet")


def family_config(family: str, d_model: int, n_layers: int, preset: Preset):
    """The LMConfig of one family at one size."""
    from effarch.models import LMConfig  # pylint: disable=import-outside-toplevel

    attention = ("attention", {"num_heads": max(1, d_model // preset.head_dim)})
    mamba2 = ("mamba2", {"d_state": preset.d_state, "head_dim": preset.head_dim, "chunk_size": preset.chunk_size})
    if family == "transformer":
        pattern, mixers = "A", {"A": attention}
    elif family == "mamba2":
        pattern, mixers = "M", {"M": mamba2}
    elif family == "hybrid":
        pattern, mixers = "MA", {"A": attention, "M": mamba2}
    else:
        options = {}
        if family in _HEAD_DIM_MIXERS:
            options = {"head_dim": preset.head_dim, "chunk_size": preset.chunk_size}
        pattern, mixers = "Z", {"Z": (family, options)}
    return LMConfig(vocab_size=256, d_model=d_model, n_layers=n_layers, pattern=pattern, mixers=mixers,
                    max_len=preset.seq_len)


def learning_rates(d_model: int, preset: Preset) -> list[float]:
    """The learning rates tried at this width (best kept)."""
    base = preset.lr_base * math.sqrt(preset.lr_width / d_model)
    return [float(f"{f * base:.3g}") for f in preset.lr_factors]


def plan(preset: Preset, families: Sequence[str]) -> list[dict[str, Any]]:
    """Every run of the study: the (family, size, budget) cells within the step range."""
    from effarch.models.flops import flops_breakdown, param_counts  # pylint: disable=import-outside-toplevel

    runs = []
    tokens_per_step = preset.batch_size * preset.seq_len
    for family in families:
        for d_model, n_layers in preset.sizes:
            cfg = family_config(family, d_model, n_layers, preset)
            parts = flops_breakdown(cfg, preset.seq_len)
            counts = param_counts(cfg)
            for budget in preset.budgets:
                steps = round(budget / parts["training"] / tokens_per_step)
                if not preset.min_steps <= steps <= preset.max_steps:
                    continue
                tokens = steps * tokens_per_step
                runs.append({
                    "family": family, "pattern": cfg.layer_pattern, "d_model": d_model, "n_layers": n_layers,
                    "budget": budget, "seq_len": preset.seq_len, "batch_size": preset.batch_size,
                    "steps": steps, "tokens": tokens, "N": counts["non_embedding"], "params": counts["total"],
                    "flops_per_token": parts["training"], "flops": parts["training"] * tokens,
                    "flops_core_counted": parts["core_counted"],
                    "lrs": learning_rates(d_model, preset),
                })
    return runs


KEY_FIELDS = ("family", "d_model", "n_layers", "budget", "seq_len", "batch_size", "steps", "lrs")
# A cell of the grid; rows of one cell with different learning-rate sets (e.g. a second pass
# with higher rates, --lr_factors) are merged, the lowest loss kept.
CELL_FIELDS = KEY_FIELDS[:-1]


def best_per_cell(rows: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each planned cell, its recorded row of lowest finite loss over every lr set tried.

    The row returned gains ``lrs_tried`` (every learning rate of the cell's rows, sorted) and
    ``best_lr_at_edge`` (the winner is the lowest or highest of them).
    """
    def cell(r):
        return tuple(json.dumps(r[f], sort_keys=True) for f in CELL_FIELDS)

    wanted = {cell(r) for r in runs}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if cell(r) in wanted:
            groups.setdefault(cell(r), []).append(r)
    out = []
    for group in groups.values():
        finite = [r for r in group if math.isfinite(r["loss"])]
        if not finite:
            continue
        best = dict(min(finite, key=lambda r: r["loss"]))
        tried = sorted({s["lr"] for r in group for s in r["settings"]})
        best["lrs_tried"] = tried
        best["best_lr_at_edge"] = best["best_lr"] in (tried[0], tried[-1])
        out.append(best)
    return out


# --------------------------------------------------------------------------
# The fit: L(N, D) = E + A / N^alpha + B / D^beta (approach 3)
# --------------------------------------------------------------------------

HUBER_DELTA = 1e-3
PARAM_NAMES = ("a", "b", "e", "alpha", "beta")  # A = exp(a), B = exp(b), E = exp(e)


def _objective(theta: np.ndarray, log_n, log_d, log_l, delta: float = HUBER_DELTA):
    """Summed Huber loss of ``LSE(a - alpha log N, b - beta log D, e) - log L`` and its gradient.

    ``theta`` is ``[5]`` or ``[S, 5]`` (S starts evaluated at once).
    """
    theta = np.atleast_2d(theta)
    a, b, e, alpha, beta = (theta[:, i:i + 1] for i in range(5))
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(a), len(log_n)))])  # [3,S,P]
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    pred = top + np.log(total)
    weights = weights / total
    r = pred - log_l
    small = np.abs(r) <= delta
    loss = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum(axis=1)
    dr = np.where(small, r, delta * np.sign(r))  # [S,P]
    grad = np.stack([(dr * weights[0]).sum(1), (dr * weights[1]).sum(1), (dr * weights[2]).sum(1),
                     -(dr * weights[0] * log_n).sum(1), -(dr * weights[1] * log_d).sum(1)], axis=1)
    return loss, grad


def lbfgs(fun: Callable[[np.ndarray], tuple[float, np.ndarray]], x0: np.ndarray, *, max_iter: int = 400,
          memory: int = 10, gtol: float = 1e-10, ftol: float = 1e-14) -> tuple[np.ndarray, float]:
    """Minimises ``fun`` (value, gradient) by L-BFGS with a backtracking Armijo line search."""
    x = np.asarray(x0, float).copy()
    f, g = fun(x)
    s_hist, y_hist = [], []
    for _ in range(max_iter):
        if not np.all(np.isfinite(g)) or np.linalg.norm(g) < gtol:
            break
        q = g.copy()
        alphas = []
        for s, y in zip(reversed(s_hist), reversed(y_hist)):
            rho = 1.0 / y.dot(s)
            alpha = rho * s.dot(q)
            q -= alpha * y
            alphas.append((rho, alpha, s, y))
        if y_hist:
            q *= s_hist[-1].dot(y_hist[-1]) / y_hist[-1].dot(y_hist[-1])
        else:
            q *= 1.0 / max(np.linalg.norm(g), 1e-12)
        for rho, alpha, s, y in reversed(alphas):
            q += (alpha - rho * y.dot(q)) * s
        direction = -q
        slope = g.dot(direction)
        if slope >= 0:  # not a descent direction: restart from the gradient
            s_hist, y_hist = [], []
            direction = -g / max(np.linalg.norm(g), 1e-12)
            slope = g.dot(direction)
        step = 1.0
        for _ in range(40):
            x_new = x + step * direction
            f_new, g_new = fun(x_new)
            if np.isfinite(f_new) and f_new <= f + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            break
        s, y = x_new - x, g_new - g
        if s.dot(y) > 1e-16:
            s_hist.append(s)
            y_hist.append(y)
            if len(s_hist) > memory:
                s_hist.pop(0)
                y_hist.pop(0)
        converged = abs(f - f_new) <= ftol * max(1.0, abs(f))
        x, f, g = x_new, f_new, g_new
        if converged:
            break
    return x, float(f)


def _init_grid() -> np.ndarray:
    """Chinchilla's grid of initialisations of ``(a, b, e, alpha, beta)``."""
    grid = np.meshgrid(np.arange(0.0, 26.0, 5.0), np.arange(0.0, 26.0, 5.0), np.arange(-1.0, 1.1, 0.5),
                       np.arange(0.0, 2.1, 0.5), np.arange(0.0, 2.1, 0.5), indexing="ij")
    return np.stack([g.ravel() for g in grid], axis=1)


INIT_GRID = _init_grid()


def fit_law(n, d, loss, *, starts: int = 16, extra_inits: np.ndarray | None = None) -> dict[str, float]:
    """Fits ``L = E + A / N^alpha + B / D^beta`` (Huber on log L, approach 3).

    The whole init grid is evaluated at once; L-BFGS runs from its ``starts``
    best points (and from ``extra_inits``); the lowest objective wins.

    Returns:
      ``{"E", "A", "B", "alpha", "beta", "a", "objective", "theta"}``; ``a = beta / (alpha + beta)``;
      ``theta`` = ``(log A, log B, log E, alpha, beta)``.
    """
    log_n, log_d, log_l = (np.log(np.asarray(v, float)) for v in (n, d, loss))
    values, _ = _objective(INIT_GRID, log_n, log_d, log_l)
    inits = INIT_GRID[np.argsort(values)[:starts]]
    if extra_inits is not None:
        inits = np.concatenate([np.atleast_2d(extra_inits), inits])

    def fun(theta):
        f, g = _objective(theta, log_n, log_d, log_l)
        return float(f[0]), g[0]

    best_theta, best_f = None, math.inf
    for init in inits:
        theta, f = lbfgs(fun, init)
        if f < best_f:
            best_theta, best_f = theta, f
    a, b, e, alpha, beta = best_theta
    out = {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)), "alpha": float(alpha),
           "beta": float(beta), "objective": best_f, "theta": [float(x) for x in best_theta]}
    out["a"] = compute_optimal_exponent(out["alpha"], out["beta"])
    return out


def compute_optimal_exponent(alpha: float, beta: float) -> float:
    """``a`` in ``N_opt ~ C^a`` under ``C ~ N D``: ``beta / (alpha + beta)``."""
    return beta / (alpha + beta) if alpha + beta != 0 else float("nan")


def predict(fit: dict[str, float], n, d):
    """The fitted loss at ``(N, D)``."""
    return fit["E"] + fit["A"] / np.asarray(n, float) ** fit["alpha"] + fit["B"] / np.asarray(d, float) ** fit["beta"]


def bootstrap(n, d, loss, fit: dict[str, float], *, resamples: int, seed: int = 0,
              level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap intervals (resampling runs) of alpha, beta, a, E, A, B."""
    rng = np.random.default_rng(seed)
    n, d, loss = (np.asarray(v, float) for v in (n, d, loss))
    start = np.array(fit["theta"])  # (log A, log B, log E, alpha, beta); E may underflow to 0
    samples = {k: [] for k in ("alpha", "beta", "a", "E", "A", "B")}
    for _ in range(resamples):
        idx = rng.integers(0, len(n), len(n))
        if len(np.unique(idx)) < 3:
            continue
        f = fit_law(n[idx], d[idx], loss[idx], starts=1, extra_inits=start)
        for k in samples:
            samples[k].append(f[k])
    tail = 100 * (1 - level) / 2
    return {k: [float(np.nanpercentile(v, tail)), float(np.nanpercentile(v, 100 - tail))] if v else [math.nan] * 2
            for k, v in samples.items()} | {"resamples": len(samples["alpha"]), "level": level}


def isoflop_minima(rows: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
    """Approach 2: per budget with >= 3 sizes, the minimum of a parabola in log N of the loss.

    ``interior`` says whether the minimum lies within the sizes trained (only
    those are trustworthy).
    """
    out = []
    for budget in sorted({r["budget"] for r in rows}):
        group = sorted((r for r in rows if r["budget"] == budget), key=lambda r: r["N"])
        if len(group) < 3:
            continue
        x = np.log([r["N"] for r in group])
        y = np.array([r["loss"] for r in group])
        c2, c1, c0 = np.polyfit(x, y, 2)
        if c2 <= 0:
            out.append({"budget": budget, "N_opt": math.nan, "loss": math.nan, "interior": False})
            continue
        x_opt = -c1 / (2 * c2)
        out.append({"budget": budget, "N_opt": float(np.exp(x_opt)), "loss": float(c0 + c1 * x_opt + c2 * x_opt**2),
                    "interior": bool(x.min() < x_opt < x.max())})
    return out


def approach2_exponent(minima: Sequence[dict[str, float]]) -> float | None:
    """Slope of log N_opt on log C over the interior isoFLOP minima (None with fewer than 2)."""
    good = [m for m in minima if m["interior"]]
    if len(good) < 2:
        return None
    return float(np.polyfit(np.log([m["budget"] for m in good]), np.log([m["N_opt"] for m in good]), 1)[0])


class FlopsOfN:
    """Training FLOPs per token as a function of N, interpolated in log-log over a family's sizes."""

    def __init__(self, rows: Sequence[dict[str, Any]]):
        pairs = sorted({(r["N"], r["flops_per_token"]) for r in rows})
        self.log_n = np.log([p[0] for p in pairs])
        self.log_f = np.log([p[1] for p in pairs])

    def __call__(self, n):
        x = np.log(np.asarray(n, float))
        if len(self.log_n) == 1:
            return np.exp(self.log_f[0] + (x - self.log_n[0]))
        lo = (self.log_f[1] - self.log_f[0]) / (self.log_n[1] - self.log_n[0])
        hi = (self.log_f[-1] - self.log_f[-2]) / (self.log_n[-1] - self.log_n[-2])
        y = np.interp(x, self.log_n, self.log_f)
        y = np.where(x < self.log_n[0], self.log_f[0] + lo * (x - self.log_n[0]), y)
        y = np.where(x > self.log_n[-1], self.log_f[-1] + hi * (x - self.log_n[-1]), y)
        return np.exp(y)


def frontier(fit: dict[str, float], flops_of_n: FlopsOfN, compute, n_range) -> tuple[np.ndarray, np.ndarray]:
    """The fitted compute-optimal loss and N at each compute: min over N of L(N, C / F(N))."""
    grid = np.exp(np.linspace(np.log(n_range[0]), np.log(n_range[1]), 400))
    compute = np.atleast_1d(np.asarray(compute, float))
    losses = predict(fit, grid[None, :], compute[:, None] / flops_of_n(grid)[None, :])
    best = np.argmin(losses, axis=1)
    return losses[np.arange(len(compute)), best], grid[best]


def fit_family(rows: Sequence[dict[str, Any]], *, resamples: int, seed: int = 0) -> dict[str, Any]:
    """The approach-3 fit with bootstrap CIs and the approach-2 minima of one family's rows."""
    n = [r["N"] for r in rows]
    d = [r["tokens"] for r in rows]
    loss = [r["loss"] for r in rows]
    fit = fit_law(n, d, loss)
    out = {"runs": len(rows), "fit": fit, "ci": bootstrap(n, d, loss, fit, resamples=resamples, seed=seed)}
    minima = isoflop_minima(rows)
    pred = predict(fit, n, d)
    out["rmse_log_loss"] = float(np.sqrt(np.mean((np.log(pred) - np.log(loss)) ** 2)))
    out["isoflop_minima"] = minima
    out["approach2_a"] = approach2_exponent(minima)
    return out


# --------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------

LN2 = math.log(2.0)


def _pyplot():
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    return plt


def plot_isoflop(by_family: dict[str, list[dict]], fits: dict[str, dict], path: pathlib.Path) -> None:
    """Loss (bits/byte) against N per FLOP budget, one panel per family, with fitted minima."""
    plt = _pyplot()
    families = list(by_family)
    fig, axes = plt.subplots(1, len(families), figsize=(4.6 * len(families), 4.0), squeeze=False, sharey=True)
    budgets = sorted({r["budget"] for rows in by_family.values() for r in rows})
    colours = plt.cm.viridis(np.linspace(0.0, 0.85, max(len(budgets), 1)))
    for ax, family in zip(axes[0], families):
        rows = by_family[family]
        fit = fits[family]["fit"]
        flops_of_n = FlopsOfN(rows)
        n_all = [r["N"] for r in rows]
        grid = np.exp(np.linspace(np.log(min(n_all) / 1.5), np.log(max(n_all) * 1.5), 200))
        for colour, budget in zip(colours, budgets):
            group = sorted((r for r in rows if r["budget"] == budget), key=lambda r: r["N"])
            if not group:
                continue
            ax.plot([r["N"] for r in group], [r["loss"] / LN2 for r in group], "o-", color=colour,
                    label=f"C = {budget:.0e}")
            curve = predict(fit, grid, budget / flops_of_n(grid))
            ax.plot(grid, curve / LN2, "--", color=colour, alpha=0.6, lw=1)
            best = np.argmin(curve)
            ax.plot(grid[best], curve[best] / LN2, "*", color=colour, ms=12, mec="k")
        for m in fits[family]["isoflop_minima"]:
            if m["interior"]:
                ax.plot(m["N_opt"], m["loss"] / LN2, "x", color="k", ms=8)
        losses = [r["loss"] / LN2 for family_rows in by_family.values() for r in family_rows]
        span = max(losses) - min(losses)
        ax.set_ylim(min(losses) - 0.1 * span - 0.02, max(losses) + 0.1 * span + 0.02)
        ax.set_xscale("log")
        ax.set_xlabel("N (non-embedding parameters)")
        ax.set_title(f"{family}: loss vs N at fixed FLOPs", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("held-out loss (bits/byte)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(budgets), fontsize=8)
    fig.suptitle("isoFLOP curves, byte-level LM (dashed: fitted law; *: its minimum; x: parabola minimum)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_frontier(by_family: dict[str, list[dict]], fits: dict[str, dict], path: pathlib.Path) -> None:
    """Loss against training compute per family: every run, and the fitted compute-optimal frontier."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    c_all = [r["flops"] for rows in by_family.values() for r in rows]
    compute = np.exp(np.linspace(np.log(min(c_all) / 1.5), np.log(max(c_all) * 1.5), 60))
    for i, (family, rows) in enumerate(by_family.items()):
        colour = f"C{i}"
        ax.scatter([r["flops"] for r in rows], [r["loss"] / LN2 for r in rows], color=colour, s=18, alpha=0.7)
        n_all = [r["N"] for r in rows]
        losses, _ = frontier(fits[family]["fit"], FlopsOfN(rows), compute, (min(n_all) / 3, max(n_all) * 3))
        ax.plot(compute, losses / LN2, "-", color=colour, label=f"{family} (fitted frontier)")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("training FLOPs C (analytic, effarch.models.flops)")
    ax.set_ylabel("held-out loss (bits/byte)")
    ax.set_title("Loss vs compute per family: runs and fitted frontier")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_nopt(by_family: dict[str, list[dict]], fits: dict[str, dict], path: pathlib.Path) -> None:
    """Compute-optimal N against compute: the fit's frontier and the isoFLOP parabola minima."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    c_all = [r["flops"] for rows in by_family.values() for r in rows]
    compute = np.exp(np.linspace(np.log(min(c_all) / 1.5), np.log(max(c_all) * 1.5), 60))
    for i, (family, rows) in enumerate(by_family.items()):
        colour = f"C{i}"
        n_all = [r["N"] for r in rows]
        _, n_opt = frontier(fits[family]["fit"], FlopsOfN(rows), compute, (min(n_all) / 10, max(n_all) * 10))
        ax.plot(compute, n_opt, "-", color=colour, label=f"{family}: fit, a = {fits[family]['fit']['a']:.2f}")
        minima = [m for m in fits[family]["isoflop_minima"] if m["interior"]]
        if minima:
            ax.plot([m["budget"] for m in minima], [m["N_opt"] for m in minima], "o", color=colour)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("training FLOPs C")
    ax.set_ylabel("compute-optimal N")
    ax.set_title("Compute-optimal model size (line: fit; dots: isoFLOP minima)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------


def run_study(preset_name: str, workdir: str | pathlib.Path, *, families: Sequence[str] | None = None,
              data: Sequence[str] = ("stdlib",), corpus_bytes: int | None = -1, seed: int = 0,
              budgets: Sequence[float] | None = None, lr_factors: Sequence[float] | None = None,
              sizes: Sequence[tuple[int, int]] | None = None, dry_run: bool = False,
              stream=sys.stdout) -> dict[str, Any]:
    """Runs (or resumes) the study into ``workdir``, fits each family and plots.

    Returns ``{"planned", "ran", "skipped", "fits"}``.
    """
    from effarch import data as data_lib  # pylint: disable=import-outside-toplevel
    from effarch.models import LM  # pylint: disable=import-outside-toplevel
    from effarch.train.sweep import (  # pylint: disable=import-outside-toplevel
        Progress, ResultsLog, Setting, provenance, text_examples, train_settings)

    preset = PRESETS[preset_name]
    if budgets:
        preset = dataclasses.replace(preset, budgets=tuple(float(b) for b in budgets))
    if lr_factors:
        preset = dataclasses.replace(preset, lr_factors=tuple(float(f) for f in lr_factors))
    if sizes:
        preset = dataclasses.replace(preset, sizes=tuple((int(d), int(n)) for d, n in sizes))
    families = tuple(families or preset.families)
    workdir = pathlib.Path(workdir)
    runs = plan(preset, families)
    if not runs:
        raise ValueError("no run of the grid falls within the step range; widen the budgets.")
    log = ResultsLog(workdir / "results.jsonl", KEY_FIELDS)
    # Lowest budgets first, families interleaved: a study cut short still covers every family.
    todo = sorted((r for r in runs if not log.has(r)), key=lambda r: (r["budget"], families.index(r["family"]), r["N"]))

    def say(text):
        print(text, file=stream, flush=True)

    say(f"scaling ({preset_name}): {len(runs)} runs planned over families {', '.join(families)}; "
        f"{len(runs) - len(todo)} already in {log.path}, {len(todo)} to run")
    for r in runs:
        say(f"  {r['family']:>12} d={r['d_model']:<4} L={r['n_layers']} N={r['N']:>9,} C={r['budget']:.0e} "
            f"steps={r['steps']:<5} D={r['tokens']:>10,} F/token={r['flops_per_token']:.3g}"
            + ("" if log.has(r) else "  (to run)"))
    if dry_run:
        return {"planned": len(runs), "ran": 0, "skipped": len(runs) - len(todo), "fits": {}}

    if todo:
        bytes_cap = preset.corpus_bytes if corpus_bytes == -1 else corpus_bytes
        corpus = data_lib.load_corpus(list(data), max_bytes=bytes_cap)
        train_corpus, held_out = data_lib.split(corpus, 0.05)
        available = len(train_corpus.data) // (preset.seq_len + 1)
        needed = max(r["steps"] * r["batch_size"] for r in todo)
        train = text_examples(train_corpus.data, seq_len=preset.seq_len, num_rows=min(needed, available), seed=seed)
        eval_rows = min(preset.eval_rows, len(held_out.data) // (preset.seq_len + 1))
        test = text_examples(held_out.data, seq_len=preset.seq_len, num_rows=eval_rows, seed=seed + 1)
        say(f"corpus {len(train_corpus.data):,} train / {len(held_out.data):,} held-out bytes; "
            f"{len(train[0]):,} training rows (largest run needs {needed:,}; fewer means repeated epochs), "
            f"{eval_rows} held-out rows of {preset.seq_len}")
        progress = Progress(total=len(runs), done=len(runs) - len(todo), stream=stream)
        prov = provenance()
        for r in todo:
            name = f"{r['family']} d={r['d_model']} L={r['n_layers']} C={r['budget']:.0e} ({r['steps']} steps)"
            progress.start(name)
            cfg = family_config(r["family"], r["d_model"], r["n_layers"], preset)
            settings = [Setting(lr=lr, weight_decay=preset.weight_decay) for lr in r["lrs"]]
            result = train_settings(
                LM(config=cfg), settings, train=train, test=test, batch_size=r["batch_size"], steps=r["steps"],
                eval_every=r["steps"], seed=seed, target_accuracy=None, select="loss",
                warmup_steps=max(1, r["steps"] // 10), min_lr_ratio=0.1)
            best = result["best"]
            row = {**r, "loss": best["loss"], "bpb": best["loss"] / LN2, "accuracy": best["accuracy"],
                   "best_lr": best["lr"], "lr_at_edge": best["lr"] in (min(r["lrs"]), max(r["lrs"])),
                   "settings": result["settings"], "wall_s": result["wall_s"],
                   "epochs": r["steps"] * r["batch_size"] / len(train[0]), "preset": preset_name, **prov}
            log.append(row)
            progress.finish(name, f"{best['loss'] / LN2:.3f} bits/byte at lr {best['lr']:g}")

    rows = best_per_cell(log.rows(), runs)
    by_family = {f: [r for r in rows if r["family"] == f] for f in families}
    by_family = {f: v for f, v in by_family.items() if v}
    fits = {}
    for i, (family, fam_rows) in enumerate(by_family.items()):
        fits[family] = fit_family(fam_rows, resamples=preset.bootstrap, seed=seed + i)
        f, ci = fits[family]["fit"], fits[family]["ci"]
        say(f"fit {family} ({len(fam_rows)} runs): E={f['E']:.3f} A={f['A']:.3g} B={f['B']:.3g} "
            f"alpha={f['alpha']:.3f} [{ci['alpha'][0]:.2f}, {ci['alpha'][1]:.2f}] "
            f"beta={f['beta']:.3f} [{ci['beta'][0]:.2f}, {ci['beta'][1]:.2f}] "
            f"a={f['a']:.3f} [{ci['a'][0]:.2f}, {ci['a'][1]:.2f}]; approach-2 a={fits[family]['approach2_a']}")
    meta = {"preset": preset_name, "preset_settings": dataclasses.asdict(preset), "families": list(families),
            "model": "L(N, D) = E + A / N^alpha + B / D^beta, L in nats/byte, N non-embedding params, "
                     "D training tokens (bytes); Huber(delta=1e-3) on log L; a = beta / (alpha + beta)",
            "huber_delta": HUBER_DELTA}
    (workdir / "fits.json").write_text(json.dumps({"meta": meta, "fits": fits}, indent=2, default=str) + "\n")
    plot_isoflop(by_family, fits, workdir / "isoflop.png")
    plot_frontier(by_family, fits, workdir / "frontier.png")
    plot_nopt(by_family, fits, workdir / "nopt.png")
    say(f"wrote {workdir / 'fits.json'}, isoflop.png, frontier.png, nopt.png")
    return {"planned": len(runs), "ran": len(todo), "skipped": len(runs) - len(todo), "fits": fits}


def main(argv):
    from absl import flags  # pylint: disable=import-outside-toplevel

    flags_ = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments {argv[1:]}")
    families = list(flags_.families or [])
    families += [m for m in (flags_.mixer or []) if m not in families]
    run_study(flags_.preset, flags_.workdir or f"runs/scaling-{flags_.preset}", families=families or None,
              data=flags_.data, corpus_bytes=-1 if flags_.max_corpus_bytes is None else (flags_.max_corpus_bytes or None),
              seed=flags_.seed, budgets=[float(b) for b in flags_.budgets] if flags_.budgets else None,
              lr_factors=[float(f) for f in flags_.lr_factors] if flags_.lr_factors else None,
              sizes=[tuple(s.split("x")) for s in flags_.sizes] if flags_.sizes else None,
              dry_run=flags_.dry_run)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_enum("preset", "cpu", sorted(PRESETS), "Grid and training settings.")
    flags.DEFINE_string("workdir", None, "Results folder (default runs/scaling-<preset>); rerun to resume.")
    flags.DEFINE_list("families", None, "Families: transformer, mamba2, hybrid, or registered mixer names "
                      "(default: the preset's).")
    flags.DEFINE_multi_string("mixer", [], "A registered mixer name to add as a family (repeatable).")
    flags.DEFINE_list("data", ["stdlib"], "'stdlib' (Python's own sources) or files/folders.")
    flags.DEFINE_integer("max_corpus_bytes", None, "Corpus bytes read (default: the preset's; 0 = all).")
    flags.DEFINE_list("budgets", None, "Override the FLOP budgets, e.g. 1e11,3e11.")
    flags.DEFINE_list("lr_factors", None, "Override the learning-rate factors (x lr_base sqrt(lr_width / d_model)).")
    flags.DEFINE_list("sizes", None, "Override the sizes as d_modelxn_layers, e.g. 16x2,32x2.")
    flags.DEFINE_integer("seed", 0, "Seed of data, initialisation and bootstrap.")
    flags.DEFINE_bool("dry_run", False, "Print the grid and exit.")
    app.run(main)
