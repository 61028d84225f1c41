"""The measurements behind ``implementation="auto"`` on CPU (docs/design.md §3).

Times every XLA form of every recurrent op, forward only and forward+backward
(the gradient of a weighted sum of the outputs with respect to every float
input), at a few sizes, and writes one JSON file per run:

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
      python benchmarks/auto_policy.py --out docs/results/auto_policy/cpu_run1.json

For each (op, size) every form is compiled first, then the forms' repeats are
interleaved (form 1, form 2, ..., form 1, ...) so that load from other jobs
falls on all of them alike; each figure is the median of the repeats, and the
load average is recorded before and after each (op, size). ``"auto"`` is timed
as one more form: it should be within noise of the best form, forward and
training alike. ``linear_scan`` also times a plain ``lax.scan`` written here
(``lax_scan``), the baseline the issue measured "auto" against. The Pallas
forms are not timed: on CPU they run in interpret mode, not as a CPU form.

The quadratic form of ``linear_attention`` is skipped where its ``[B,H,T,T]``
score buffers would exceed ``--max_gib``.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import harness
from effarch import ops

# Head shapes of the attention-like ops; channel shapes of the scans.
B, H, K, V = 1, 4, 64, 64
SCAN_B, SCAN_D = 2, 1024  # linear_scan: the B, D
SELECTIVE_D, SELECTIVE_N = 512, 16


def _normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32))


def _unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def linear_scan_case(t, rng):
    x = _normal(rng, SCAN_B, t, SCAN_D)
    a = jax.nn.sigmoid(_normal(rng, SCAN_B, t, SCAN_D) + 2.0)
    return (x, a), lambda impl, x, a: ops.linear_scan(x, a, implementation=impl)[0]


def plain_lax_scan(x, a):
    """``h_t = a_t h_{t-1} + x_t`` as the plainest ``lax.scan``: the issue's baseline."""
    def step(h, xa):
        h = xa[1] * h + xa[0]
        return h, h

    _, h = jax.lax.scan(step, jnp.zeros_like(x[:, 0]), (jnp.swapaxes(x, 0, 1), jnp.swapaxes(a, 0, 1)))
    return jnp.swapaxes(h, 0, 1)


def selective_scan_case(t, rng):
    x = _normal(rng, 1, t, SELECTIVE_D)
    dt = _normal(rng, 1, t, SELECTIVE_D) - 2.0
    a = -jnp.exp(_normal(rng, SELECTIVE_D, SELECTIVE_N))
    bm, cm = _normal(rng, 1, t, 1, SELECTIVE_N), _normal(rng, 1, t, 1, SELECTIVE_N)
    return (x, dt, a, bm, cm), lambda impl, x, dt, a, bm, cm: ops.selective_scan(
        x, dt, a, bm, cm, implementation=impl)[0]


def linear_attention_case(t, rng):
    q, k = _normal(rng, B, t, H, K), _normal(rng, B, t, H, K)
    v = _normal(rng, B, t, H, V)
    g = -jax.nn.softplus(_normal(rng, B, t, H))  # [B,T,H]: Mamba-2 / mLSTM decay
    return (q, k, v, g), lambda impl, q, k, v, g: ops.linear_attention(
        q, k, v, g, implementation=impl)[0]


def linear_attention_channel_case(t, rng):
    q, k = _normal(rng, B, t, H, K), _normal(rng, B, t, H, K)
    v = _normal(rng, B, t, H, V)
    g = -jax.nn.softplus(_normal(rng, B, t, H, K))  # [B,T,H,K]: GLA decay
    return (q, k, v, g), lambda impl, q, k, v, g: ops.linear_attention(
        q, k, v, g, implementation=impl)[0]


def delta_rule_case(t, rng):
    q, k = _normal(rng, B, t, H, K), _unit(_normal(rng, B, t, H, K))
    v = _normal(rng, B, t, H, V)
    beta = jax.nn.sigmoid(_normal(rng, B, t, H))
    g = -jax.nn.softplus(_normal(rng, B, t, H))  # Gated DeltaNet
    return (q, k, v, beta, g), lambda impl, q, k, v, beta, g: ops.delta_rule(
        q, k, v, beta, g, implementation=impl)[0]


def generalized_delta_rule_case(t, rng):
    q, k, v = _normal(rng, B, t, H, K), 0.5 * _normal(rng, B, t, H, K), _normal(rng, B, t, H, V)
    kappa = _unit(_normal(rng, B, t, H, K))
    iclr = jax.nn.sigmoid(_normal(rng, B, t, H, K))
    w = -np.exp(-0.5) * jax.nn.sigmoid(_normal(rng, B, t, H, K))  # RWKV-7's range
    return (q, k, v, -kappa * iclr, kappa, w), (
        lambda impl, q, k, v, a, b, w: ops.generalized_delta_rule(
            q, k, v, a, b, w, scale=1.0, implementation=impl)[0])


# op -> (inputs and function, forms, bytes of the quadratic form's buffers at T).
CASES = {
    "linear_scan": (linear_scan_case, ("recurrent", "chunked", "lax_scan", "auto")),
    "selective_scan": (selective_scan_case, ("recurrent", "chunked", "auto")),
    "linear_attention": (linear_attention_case, ("recurrent", "quadratic", "chunked", "auto")),
    "linear_attention_channel": (linear_attention_channel_case,
                                 ("recurrent", "quadratic", "chunked", "auto")),
    "delta_rule": (delta_rule_case, ("recurrent", "chunked", "auto")),
    "generalized_delta_rule": (generalized_delta_rule_case, ("recurrent", "chunked", "auto")),
}


def quadratic_gib(op: str, t: int) -> float:
    """About four ``[B,H,T,T]`` float32 buffers (scores, weights, cotangents); ``[B,H,K,T,T]``
    for per-channel decay."""
    per_channel = K if op == "linear_attention_channel" else 1
    return 4 * B * H * per_channel * t * t * 4 / 2**30


def _compiled(fn, impl, inputs):
    """Jitted forward and forward+backward of one form, compiled (and warmed up)."""
    if impl == "lax_scan":
        forward = jax.jit(plain_lax_scan)
    else:
        forward = jax.jit(functools.partial(fn, impl))
    out = jax.eval_shape(forward, *inputs)
    weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    loss = lambda *xs: jnp.sum(forward(*xs).astype(jnp.float32) * weights)
    training = jax.jit(jax.grad(loss, argnums=tuple(range(len(inputs)))))
    compile_s = {}
    for name, f in (("fwd", forward), ("fwd_bwd", training)):
        start = time.perf_counter()
        jax.block_until_ready(f(*inputs))
        compile_s[name] = time.perf_counter() - start
    return {"fwd": forward, "fwd_bwd": training}, compile_s


def _seconds(f, inputs) -> float:
    start = time.perf_counter()
    jax.block_until_ready(f(*inputs))
    return time.perf_counter() - start


def measure(op: str, t: int, repeats: int, max_gib: float) -> list[dict]:
    """Rows for every form of ``op`` at length ``t``, repeats interleaved across forms."""
    make, impls = CASES[op]
    inputs, fn = make(t, np.random.default_rng(t))
    load_before = os.getloadavg()
    rows, compiled = {}, {}
    for impl in impls:
        rows[impl] = {"op": op, "impl": impl, "T": t}
        if impl == "quadratic" and quadratic_gib(op, t) > max_gib:
            rows[impl]["note"] = f"skipped: ~{quadratic_gib(op, t):.1f} GiB > --max_gib"
            continue
        compiled[impl], rows[impl]["compile_s"] = _compiled(fn, impl, inputs)
    times = {impl: {"fwd": [], "fwd_bwd": []} for impl in compiled}
    for _ in range(repeats):
        for impl, fns in compiled.items():
            for mode, f in fns.items():
                times[impl][mode].append(_seconds(f, inputs) * 1e3)
    load_after = os.getloadavg()
    for impl, by_mode in times.items():
        for mode, values in by_mode.items():
            rows[impl][f"{mode}_ms"] = statistics.median(values)
            rows[impl][f"{mode}_all_ms"] = [round(x, 3) for x in values]
    for row in rows.values():
        row["loadavg_before"] = [round(x, 2) for x in load_before]
        row["loadavg_after"] = [round(x, 2) for x in load_after]
    return list(rows.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="256,1024,4096")
    parser.add_argument("--ops", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max_gib", type=float, default=1.5,
                        help="skip the quadratic form where its [B,H,T,T] buffers exceed this")
    parser.add_argument("--out", default="results/auto_policy/cpu.json")
    args = parser.parse_args()
    rows = []
    for op in args.ops.split(","):
        for t in (int(x) for x in args.lengths.split(",")):
            for row in measure(op, t, args.repeats, args.max_gib):
                rows.append(row)
                print({k: v for k, v in row.items() if not k.endswith("_all_ms")}, flush=True)
            save(args, rows)  # after every (op, T): a run cut short keeps what it measured
    print()
    harness.print_table(rows, ["op", "impl", "T", "fwd_ms", "fwd_bwd_ms", "note"])


def save(args, rows):
    harness.save_json(args.out, rows, shapes={
        "attention_like": {"B": B, "H": H, "K": K, "V": V},
        "linear_scan": {"B": SCAN_B, "D": SCAN_D},
        "selective_scan": {"B": 1, "D": SELECTIVE_D, "N": SELECTIVE_N, "G": 1},
    }, xla_flags=os.environ.get("XLA_FLAGS"), repeats=args.repeats)


if __name__ == "__main__":
    main()
