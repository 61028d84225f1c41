"""XLA's dots against torch's at the shapes of Mamba-2's training step (CPU), one thread each.

    python benchmarks/matmul_peer.py --out results/matmul_peer.json

The matmuls of ``benchmarks/peer_train.py``'s Mamba-2 medium step (B*T = 4096
rows, d_model 256): ``in_proj`` (256 -> 1104), ``out_proj`` (512 -> 256) and the
tied head (256 -> 4096), forward ``A @ B`` and backward (``G @ B^T`` and
``A^T @ G``), float32. The two sides alternate call by call, median of
``--repeats``. Both run on one thread (XLA with Eigen's pool off, torch with
``set_num_threads(1)``), so that the other core's load falls on neither. It
answers one question of issue 16: whether effarch's step is held back by the
dots themselves (then no change to effarch's code reaches 1.5x torch where the
dots dominate) or by everything around them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

if __name__ == "__main__":  # before JAX starts: XLA on one thread (a flag first, see effarch._xla_workarounds)
    os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false " + os.environ.get("XLA_FLAGS", "")

import effarch  # noqa: E402,F401  (its XLA workarounds, as a user gets them)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import harness  # noqa: E402

SHAPES = {"in_proj": (4096, 256, 1104), "out_proj": (4096, 512, 256), "head": (4096, 256, 4096)}


def _alternate(fns: dict, repeats: int) -> dict:
    for fn in fns.values():
        fn()  # compile / warm up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/matmul_peer.json")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    forward = jax.jit(lambda a, b: a @ b)
    backward = jax.jit(lambda a, b, g: (g @ b.T, a.T @ g))
    rng = np.random.default_rng(0)
    rows = []
    for name, (m, k, n) in SHAPES.items():
        a, b, g = (rng.standard_normal(s, dtype=np.float32) for s in ((m, k), (k, n), (m, n)))
        ja, jb, jg = map(jnp.asarray, (a, b, g))
        ta, tb, tg = map(torch.from_numpy, (a, b, g))
        ms = _alternate({
            "xla_fwd": lambda: forward(ja, jb).block_until_ready(),
            "torch_fwd": lambda: ta @ tb,
            "xla_bwd": lambda: jax.block_until_ready(backward(ja, jb, jg)),
            "torch_bwd": lambda: (tg @ tb.T, ta.T @ tg),
        }, args.repeats)
        gflop = 2 * m * k * n / 1e9
        rows.append({"matmul": name, "m_k_n": f"{m}x{k}x{n}", "gflop_fwd": gflop,
                     **{f"{side}_ms": v for side, v in ms.items()},
                     "fwd_ratio": ms["torch_fwd"] / ms["xla_fwd"], "bwd_ratio": ms["torch_bwd"] / ms["xla_bwd"]})
    harness.print_table(rows, ["matmul", "m_k_n", "xla_fwd_ms", "torch_fwd_ms", "fwd_ratio",
                               "xla_bwd_ms", "torch_bwd_ms", "bwd_ratio"])
    harness.save_json(args.out, rows, torch=torch.__version__, threads=1, repeats=args.repeats,
                      load_average_after=list(os.getloadavg()))
    return {"rows": rows}


if __name__ == "__main__":
    main()
