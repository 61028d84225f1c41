"""Time every XLA form of every op on CPU against sequence length.

    python benchmarks/ops_cpu.py                       # T = 512 ... 8192
    python benchmarks/ops_cpu.py --lengths 256,1024 --out results/ops_cpu.json

Forward and forward+backward (gradient of a sum of the outputs with respect to
every input), median of a few runs after compilation. A form is skipped (and
the table says why) where its memory would exceed --max_gib: the quadratic
form stores ``[B,H,T,T]``.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

import harness
from effarch import ops

# (op, implementations, bytes of the largest intermediate as a function of T).
B, H, K, V, D, N = 1, 4, 64, 64, 256, 16


def linear_attention_case(t, key):
    ks = jax.random.split(key, 4)
    q, k = (jax.random.normal(x, (B, t, H, K)) for x in ks[:2])
    v = jax.random.normal(ks[2], (B, t, H, V))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, t, H)))
    return (q, k, v, g), lambda impl, q, k, v, g: ops.linear_attention(
        q, k, v, g, implementation=impl)[0]


def delta_rule_case(t, key):
    ks = jax.random.split(key, 5)
    q, k = (jax.random.normal(x, (B, t, H, K)) for x in ks[:2])
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (B, t, H, V))
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, t, H)))
    g = -jax.nn.softplus(jax.random.normal(ks[4], (B, t, H)))
    return (q, k, v, beta, g), lambda impl, q, k, v, beta, g: ops.delta_rule(
        q, k, v, beta, g, implementation=impl)[0]


def selective_scan_case(t, key):
    ks = jax.random.split(key, 5)
    x = jax.random.normal(ks[0], (B, t, D))
    dt = jax.random.normal(ks[1], (B, t, D)) - 2.0
    a = -jnp.exp(jax.random.normal(ks[2], (D, N)))
    bm, cm = (jax.random.normal(x, (B, t, 1, N)) for x in ks[3:5])
    return (x, dt, a, bm, cm), lambda impl, x, dt, a, bm, cm: ops.selective_scan(
        x, dt, a, bm, cm, implementation=impl)[0]


def linear_scan_case(t, key):
    ks = jax.random.split(key, 2)
    x = jax.random.normal(ks[0], (B, t, D))
    a = jax.nn.sigmoid(jax.random.normal(ks[1], (B, t, D)))
    return (x, a), lambda impl, x, a: ops.linear_scan(x, a, implementation=impl)[0]


def attention_case(t, key):
    ks = jax.random.split(key, 3)
    q, k, v = (jax.random.normal(x, (B, t, H, K)) for x in ks)
    return (q, k, v), lambda impl, q, k, v: ops.attention(q, k, v, implementation=impl)


CASES = {
    "linear_attention": (linear_attention_case, ("recurrent", "quadratic", "chunked"),
                         lambda t: 4 * B * H * t * t * 4),
    "delta_rule": (delta_rule_case, ("recurrent", "chunked"), lambda t: 0),
    "selective_scan": (selective_scan_case, ("recurrent", "chunked"), lambda t: 0),
    "linear_scan": (linear_scan_case, ("recurrent", "chunked"), lambda t: 0),
    "attention": (attention_case, ("xla", "chunked"), lambda t: 4 * B * H * t * t * 4),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--ops", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max_gib", type=float, default=4.0,
                        help="skip a quadratic form whose [B,H,T,T] buffers exceed this")
    parser.add_argument("--out", default="results/ops_cpu.json")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for op in args.ops.split(","):
        make, impls, quadratic_bytes = CASES[op]
        for t in lengths:
            inputs, fn = make(t, jax.random.PRNGKey(t))
            for impl in impls:
                row = {"op": op, "impl": impl, "T": t}
                if impl in ("quadratic", "xla") and quadratic_bytes(t) > args.max_gib * 2**30:
                    row["note"] = f"skipped: ~{quadratic_bytes(t) / 2**30:.1f} GiB > --max_gib"
                    rows.append(row)
                    continue
                fwd = jax.jit(functools.partial(fn, impl))
                loss = lambda *xs, impl=impl: jnp.sum(fn(impl, *xs).astype(jnp.float32))
                bwd = jax.jit(jax.grad(loss, argnums=tuple(range(len(inputs)))))
                row["fwd_ms"] = harness.time_fn(fwd, *inputs, repeats=args.repeats)["median_ms"]
                row["fwd_bwd_ms"] = harness.time_fn(bwd, *inputs, repeats=args.repeats)["median_ms"]
                row["tokens_per_s_fwd"] = B * t / (row["fwd_ms"] / 1e3)
                rows.append(row)
                print(row, flush=True)
    print()
    harness.print_table(rows, ["op", "impl", "T", "fwd_ms", "fwd_bwd_ms", "tokens_per_s_fwd", "note"])
    harness.save_json(args.out, rows, shapes={"B": B, "H": H, "K": K, "V": V, "D": D, "N": N})


if __name__ == "__main__":
    main()
