"""Times the selective scan and the linear scan: Pallas vs XLA recurrent vs XLA chunked.

For each shape (B, T, D, N) and each implementation it measures the forward and
the forward+backward time, the compiled memory (``memory_analysis()``: temp +
output bytes), and the fraction of the HBM roofline: the bytes the op must move
at least, divided by the time, divided by the copy bandwidth measured in the
same run (a large array copy). The linear scan uses the same (B, T, D) and
ignores N. Prints a table and writes JSON with the device, versions and the
command line.

    python benchmarks/scan.py                       # GPU/TPU, default shapes
    python benchmarks/scan.py --small               # CPU smoke run (pallas interpreted)
"""

from __future__ import annotations

import argparse
import os
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import jaxlib

from effarch import ops
from pallas_kernels.linear_scan.reference import random_inputs as linear_inputs
from pallas_kernels.selective_scan.reference import random_inputs as selective_inputs

DEFAULT_SHAPES = ["8,2048,2048,16", "2,8192,4096,16", "1,32768,2048,16"]
SMALL_SHAPES = ["1,128,128,4"]
IMPLEMENTATIONS = ("pallas", "recurrent", "chunked")


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=None, help="B,T,D,N triples")
    parser.add_argument("--small", action="store_true", help="tiny shapes for a CPU smoke run")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--ops", nargs="+", default=["selective_scan", "linear_scan"],
                        choices=["selective_scan", "linear_scan"])
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS),
                        choices=IMPLEMENTATIONS)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (median kept)")
    parser.add_argument("--out", "--output", dest="out", default="results/scan.json", help="JSON report path")
    args = parser.parse_args(argv)
    if jax.default_backend() == "cpu" and not args.small:
        parser.error("on CPU run with --small (Pallas kernels are interpreted there).")
    args.shapes = args.shapes or (SMALL_SHAPES if args.small else DEFAULT_SHAPES)
    args.repeats = args.repeats or (2 if args.small else 10)
    return args


def _time(fn, args, repeats):
    """Median wall time of ``fn(*args)`` in seconds, after one warm-up (compile) run."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _memory(fn, args):
    """Compiled temp + output bytes (None where the backend reports nothing)."""
    analysis = fn.lower(*args).compile().memory_analysis()
    if analysis is None:
        return None
    return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def copy_bandwidth(repeats, small):
    """Bytes per second of a large array copy (read + write)."""
    size = (1 << 22) if small else (1 << 28)  # bytes
    x = jnp.ones((size // 4,), jnp.float32)
    copy = jax.jit(lambda v: v + 1.0)
    return 2 * size / _time(copy, (x,), repeats)


def _problem(op, shape, dtype):
    """Inputs, the op (differentiable inputs first) and the minimal bytes it moves."""
    batch, time_, channels, state = shape
    itemsize = jnp.dtype(dtype).itemsize
    btd = batch * time_ * channels * itemsize
    if op == "selective_scan":
        inputs = selective_inputs(jax.random.PRNGKey(0), batch=batch, time=time_,
                                  channels=channels, state=state, dtype=dtype)
        inputs.pop("initial_state")
        btgn = batch * time_ * state * itemsize  # G = 1
        # forward reads x, dt, z, B, C and writes y; backward reads those and dy
        # and writes dx, ddt, dz, dB, dC.
        forward_bytes = 4 * btd + 2 * btgn
        backward_bytes = 7 * btd + 4 * btgn
    else:
        inputs = linear_inputs(jax.random.PRNGKey(0), batch=batch, time=time_,
                               channels=channels, dtype=dtype)
        inputs.pop("initial_state")
        forward_bytes = 3 * btd  # read x, a; write h
        backward_bytes = 5 * btd  # read a, h, dh; write dx, da
    return inputs, getattr(ops, op), forward_bytes, forward_bytes + backward_bytes


def _measure(op, shape, implementation, dtype, repeats, bandwidth):
    inputs, fn, forward_bytes, total_bytes = _problem(op, shape, dtype)
    names = list(inputs)

    def forward(*arrays):
        return fn(**dict(zip(names, arrays)), implementation=implementation)[0]

    def loss(*arrays):
        return jnp.sum(forward(*arrays).astype(jnp.float32))

    args = tuple(inputs.values())
    results = {}
    for mode, f, moved in (
        ("forward", jax.jit(forward), forward_bytes),
        ("forward_backward", jax.jit(jax.grad(loss, argnums=tuple(range(len(args))))),
         total_bytes),
    ):
        seconds = _time(f, args, repeats)
        results[mode] = dict(
            seconds=seconds,
            memory_bytes=_memory(f, args),
            min_bytes=moved,
            roofline_fraction=moved / seconds / bandwidth,
        )
    return results


def main(argv=None):
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    dtype = jnp.dtype(args.dtype)
    bandwidth = copy_bandwidth(args.repeats, args.small)
    device = jax.devices()[0]
    report = dict(
        device=getattr(device, "device_kind", str(device)),
        platform=jax.default_backend(),
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        command=" ".join(sys.argv),
        dtype=args.dtype,
        copy_bandwidth_bytes_per_s=bandwidth,
        results=[],
    )
    print(f"device {report['device']}  copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'op':15s} {'B,T,D,N':18s} {'impl':10s} {'mode':17s} {'ms':>10s} {'MiB':>9s} "
          f"{'roofline':>8s}")
    for op in args.ops:
        for shape_text in args.shapes:
            shape = tuple(int(v) for v in shape_text.split(","))
            for implementation in args.implementations:
                measured = _measure(op, shape, implementation, dtype, args.repeats, bandwidth)
                for mode, m in measured.items():
                    memory = m["memory_bytes"]
                    memory = "-" if memory is None else f"{memory / 2**20:.1f}"
                    print(f"{op:15s} {shape_text:18s} {implementation:10s} {mode:17s} "
                          f"{m['seconds'] * 1e3:10.3f} {memory:>9s} {m['roofline_fraction']:8.3f}")
                    report["results"].append(
                        dict(op=op, shape=shape, implementation=implementation, mode=mode, **m)
                    )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
