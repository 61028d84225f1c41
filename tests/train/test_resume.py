"""A run killed with SIGKILL and restarted with the same command reaches the same losses."""

import json
import os
import signal
import subprocess
import textwrap

import numpy as np

import script_runner

# Runs the script, but SIGKILLs the process right after it logs step KILL_STEP,
# once the checkpoint at CKPT_STEP is on disk (so the restart has something to resume).
KILL_AFTER_LOGGING = textwrap.dedent("""
    import os, pathlib, runpy, signal, sys, time
    from effarch.train import metrics

    kill_step, checkpoint = int(sys.argv[1]), pathlib.Path(sys.argv[2])
    write = metrics.MetricsWriter.write

    def write_then_die(self, step, values):
        write(self, step, values)
        if step == kill_step:
            deadline = time.time() + 120
            while not checkpoint.exists() and time.time() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)

    metrics.MetricsWriter.write = write_then_die
    sys.argv = sys.argv[3:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")
CKPT_STEP, KILL_STEP = 4, 6


def test_sigkill_then_same_command_matches_the_uninterrupted_run(tmp_path, corpus_cache, reference_run):
    workdir = tmp_path / "run"
    script, *args = script_runner.command(workdir)[1:]
    killed = subprocess.run(
        [script_runner.sys.executable, "-c", KILL_AFTER_LOGGING, str(KILL_STEP),
         str(workdir / "checkpoints" / str(CKPT_STEP)), script, *args],
        env=script_runner.env(corpus_cache), cwd=script_runner.ROOT, capture_output=True, text=True,
        timeout=script_runner.TIMEOUT_S,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert max(script_runner.train_losses(workdir)) == KILL_STEP  # lines past the checkpoint exist
    assert str(CKPT_STEP) in os.listdir(workdir / "checkpoints")

    resumed = script_runner.run(workdir, corpus_cache)
    assert f"resuming from step {CKPT_STEP}" in resumed.stdout

    want = script_runner.train_losses(reference_run)
    got = script_runner.train_losses(workdir)
    assert sorted(got) == sorted(want) == list(range(1, 13))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-6, atol=0)


def test_rerunning_a_finished_run_says_so_and_keeps_its_results(reference_run, corpus_cache):
    results = (reference_run / "results.json").read_text()
    assert {"commit", "versions", "command", "date", "device"} <= set(json.loads(results))
    again = script_runner.run(reference_run, corpus_cache)
    assert "already holds a finished run (12 steps)" in again.stdout
    assert (reference_run / "results.json").read_text() == results


def test_an_unknown_model_field_lists_the_valid_ones(tmp_path, corpus_cache):
    done = subprocess.run(script_runner.command(tmp_path / "run", "--model", "d_modle=64"),
                          env=script_runner.env(corpus_cache), cwd=script_runner.ROOT, capture_output=True,
                          text=True, timeout=script_runner.TIMEOUT_S)
    assert done.returncode != 0
    assert "LMConfig has no field 'd_modle'; valid fields: " in done.stderr
    assert "d_model" in done.stderr.split("valid fields: ")[1]
    assert not (tmp_path / "run").exists()
