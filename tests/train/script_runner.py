"""Runs experiments/train_lm.py in subprocesses for the resume and multi-device tests."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "train_lm.py"
# A small run of the tiny preset: 12 steps, a checkpoint every 4, no evaluation (one compile less).
RUN_FLAGS = [
    "--preset=tiny", "--steps=12", "--batch_size=8", "--seq_len=32", "--warmup_steps=2", "--log_every=1",
    "--ckpt_every=4", "--eval_batches=0", "--max_corpus_bytes=60000",
]
TIMEOUT_S = 420


def env(cache_dir, devices: int = 1) -> dict:
    """The environment of a run: private corpus and compilation caches, ``devices`` host CPU devices.

    The persistent compilation cache lets the reruns of one configuration
    (killed, resumed) skip compiling what the first run compiled.
    """
    out = dict(os.environ, EFFARCH_CACHE=str(cache_dir), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(pathlib.Path(cache_dir) / "xla"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    out["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return out


def command(workdir, *extra) -> list[str]:
    return [sys.executable, str(SCRIPT), f"--workdir={workdir}", *RUN_FLAGS, *extra]


def run(workdir, cache_dir, *extra, devices: int = 1) -> subprocess.CompletedProcess:
    """Runs the script to completion; raises with its output if it fails."""
    done = subprocess.run(command(workdir, *extra), env=env(cache_dir, devices), cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    if done.returncode != 0:
        raise AssertionError(f"train_lm.py exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done


def train_losses(workdir) -> dict[int, float]:
    """step -> training loss from a run's metrics.jsonl."""
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}
