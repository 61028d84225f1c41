"""experiments/scaling.py: the smoke preset end to end, resumption, and the fitter on synthetic data."""

import io
import json

import numpy as np
import pytest

from effarch.testing import load_experiment

# Slow tier (`pytest -m slow`): 51 s on the loaded 2-core machine, most of it compiling the
# smoke preset's models; the default tier keeps experiments/mqar.py's smoke test.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scaling():
    return load_experiment("scaling")


def test_smoke_study_writes_rows_fits_and_plots_and_resumes(scaling, tmp_path):
    out = io.StringIO()
    result = scaling.run_study("smoke", tmp_path, stream=out)
    planned = scaling.plan(scaling.PRESETS["smoke"], scaling.PRESETS["smoke"].families)
    assert result["planned"] == len(planned) >= 3 and result["ran"] == len(planned)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(planned)
    for row in rows:
        assert {"family", "N", "tokens", "flops", "flops_per_token", "loss", "bpb", "best_lr", "settings",
                "budget", "steps", "commit", "device"} <= set(row)
        assert len(row["settings"]) == 2 and row["best_lr"] in row["lrs"]  # two lrs per run, best kept
        assert np.isfinite(row["loss"]) and row["tokens"] == row["steps"] * row["batch_size"] * row["seq_len"]
    fits = json.loads((tmp_path / "fits.json").read_text())["fits"]
    fit = fits["transformer"]
    assert {"E", "A", "B", "alpha", "beta", "a"} <= set(fit["fit"])
    assert {"alpha", "beta", "a"} <= set(fit["ci"])
    for name in ("isoflop.png", "frontier.png", "nopt.png"):
        assert (tmp_path / name).stat().st_size > 1000
    # A rerun trains nothing and leaves the rows as they were.
    again = io.StringIO()
    second = scaling.run_study("smoke", tmp_path, stream=again)
    assert second["ran"] == 0 and second["skipped"] == len(planned)
    assert "0 to run" in again.getvalue()
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(planned)


TRUE = {"E": 1.0, "A": 30.0, "B": 60.0, "alpha": 0.4, "beta": 0.3}


def _synthetic(noise, seed=0):
    n, d = (g.ravel() for g in np.meshgrid(np.logspace(4, 6, 5), np.logspace(5, 7, 5)))
    loss = TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]
    return n, d, loss * np.exp(noise * np.random.default_rng(seed).standard_normal(loss.shape))


@pytest.mark.parametrize("noise,tolerance", [(0.0, 0.01), (0.003, 0.06)])
def test_fitter_recovers_known_law(scaling, noise, tolerance):
    n, d, loss = _synthetic(noise)
    fit = scaling.fit_law(n, d, loss)
    assert fit["alpha"] == pytest.approx(TRUE["alpha"], abs=tolerance)
    assert fit["beta"] == pytest.approx(TRUE["beta"], abs=tolerance)
    assert fit["E"] == pytest.approx(TRUE["E"], rel=5 * tolerance)
    assert fit["a"] == pytest.approx(TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"]), abs=tolerance)


def test_bootstrap_interval_covers_the_truth(scaling):
    n, d, loss = _synthetic(0.003, seed=1)
    fit = scaling.fit_law(n, d, loss)
    ci = scaling.bootstrap(n, d, loss, fit, resamples=20, seed=0)
    for name in ("alpha", "beta"):
        low, high = ci[name]
        assert low <= fit[name] + 1e-9 and fit[name] - 1e-9 <= high
        assert low - 0.05 <= TRUE[name] <= high + 0.05


def test_isoflop_parabola_finds_the_minimum(scaling):
    rows = [{"budget": 1e12, "N": n, "loss": 2.0 + (np.log(n) - np.log(3e5)) ** 2} for n in (1e4, 1e5, 1e6, 1e7)]
    (minimum,) = scaling.isoflop_minima(rows)
    assert minimum["interior"] and minimum["N_opt"] == pytest.approx(3e5, rel=1e-6)
