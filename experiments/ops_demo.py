"""Run every form of every op on one input and print how closely they agree.

    python experiments/ops_demo.py            # small shapes, CPU, ~1 minute
    python experiments/ops_demo.py --T 1024

For each op the first implementation listed is the reference (the float32
recurrence, or plain softmax attention). Every other form is compared with it,
on the outputs and on the gradients of a random projection of the outputs,
as relative RMS error: rmse(out - ref) / rms(ref). docs/design.md §5 asks for
at most 2e-3 in float32. ``pallas`` runs the kernels in interpret mode on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

from effarch import ops
from effarch.testing import relative_rmse, tolerance


def cases(t: int, key):
    """(op name, reference impl, other impls, fn(impl, *inputs) -> outputs, inputs)."""
    b, h, kd, vd, d, n = 2, 2, 32, 32, 64, 8
    ks = iter(jax.random.split(key, 20))
    normal = lambda *shape: jax.random.normal(next(ks), shape)
    q, k, v = normal(b, t, h, kd), normal(b, t, h, kd), normal(b, t, h, vd)
    k_unit = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    scalar_decay = -jax.nn.softplus(normal(b, t, h))
    channel_decay = -jax.nn.softplus(normal(b, t, h, kd)) / 4
    beta = jax.nn.sigmoid(normal(b, t, h))
    s0 = normal(b, h, kd, vd)
    x, dt, z = normal(b, t, d), normal(b, t, d) - 1.0, normal(b, t, d)
    a_ssm = -jnp.exp(normal(d, n) / 2)
    bm, cm = normal(b, t, 2, n), normal(b, t, 2, n)
    gate = jax.nn.sigmoid(normal(b, t, d))
    return [
        ("linear_attention (scalar decay)", "recurrent", ("quadratic", "chunked", "pallas"),
         lambda impl, q, k, v, g, s0: ops.linear_attention(
             q, k, v, g, initial_state=s0, return_final_state=True, implementation=impl),
         (q, k, v, scalar_decay, s0)),
        ("linear_attention (channel decay)", "recurrent", ("quadratic", "chunked", "pallas"),
         lambda impl, q, k, v, g, s0: ops.linear_attention(
             q, k, v, g, initial_state=s0, return_final_state=True, implementation=impl),
         (q, k, v, channel_decay, s0)),
        ("delta_rule (gated)", "recurrent", ("chunked",),
         lambda impl, q, k, v, beta, g, s0: ops.delta_rule(
             q, k, v, beta, g, initial_state=s0, return_final_state=True, implementation=impl),
         (q, k_unit, v, beta, scalar_decay, s0)),
        ("selective_scan", "recurrent", ("chunked", "pallas"),
         lambda impl, x, dt, a, bm, cm, z: ops.selective_scan(
             x, dt, a, bm, cm, z=z, return_final_state=True, implementation=impl),
         (x, dt, a_ssm, bm, cm, z)),
        ("linear_scan", "recurrent", ("chunked", "pallas"),
         lambda impl, x, a: ops.linear_scan(x, a, return_final_state=True, implementation=impl),
         (x, gate)),
        ("attention (causal, GQA)", "xla", ("chunked",),
         lambda impl, q, k, v: ops.attention(q, k[:, :, :1], v[:, :, :1], implementation=impl),
         (q, k, v)),
    ]


def measure(fn, impl, inputs):
    """Outputs, gradients of a fixed random projection, and forward time in ms."""
    f = jax.jit(lambda *xs: fn(impl, *xs))
    out = jax.block_until_ready(f(*inputs))
    start = time.perf_counter()
    out = jax.block_until_ready(f(*inputs))
    ms = (time.perf_counter() - start) * 1e3

    def loss(*xs):
        leaves = [y for y in jax.tree_util.tree_leaves(fn(impl, *xs)) if y is not None]
        keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
        return sum(jnp.sum(y.astype(jnp.float32) * jax.random.normal(kk, y.shape))
                   for y, kk in zip(leaves, keys))

    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(inputs)))))(*inputs)
    return out, grads, ms


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, default=200, help="sequence length")
    parser.add_argument("--out", default="results/ops_demo.json")
    args = parser.parse_args()
    tol = tolerance(jnp.float32)
    rows = []
    print(f"device: {jax.devices()[0].device_kind}; T={args.T}; tolerance {tol:g} (float32)\n")
    print(f"{'op':34s} {'implementation':15s} {'out err':>9s} {'grad err':>9s} {'fwd ms':>8s}  ok")
    for name, ref_impl, impls, fn, inputs in cases(args.T, jax.random.PRNGKey(0)):
        ref_out, ref_grads, ref_ms = measure(fn, ref_impl, inputs)
        print(f"{name:34s} {ref_impl + ' (ref)':15s} {'':>9s} {'':>9s} {ref_ms:8.2f}")
        rows.append({"op": name, "implementation": ref_impl, "reference": True, "fwd_ms": ref_ms})
        for impl in impls:
            try:
                out, grads, ms = measure(fn, impl, inputs)
            except NotImplementedError as e:
                print(f"{'':34s} {impl:15s} not available: {e}")
                rows.append({"op": name, "implementation": impl, "error": str(e)})
                continue
            out_err = max(relative_rmse(o, r) for o, r in zip(
                jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref_out)))
            grad_err = max(relative_rmse(g, r) for g, r in zip(
                jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)))
            ok = out_err <= tol and grad_err <= tol
            print(f"{'':34s} {impl:15s} {out_err:9.1e} {grad_err:9.1e} {ms:8.2f}  {'yes' if ok else 'NO'}")
            rows.append({"op": name, "implementation": impl, "out_rel_rmse": out_err,
                         "grad_rel_rmse": grad_err, "fwd_ms": ms, "within_tolerance": ok})
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "T": args.T, "rows": rows}, f, indent=1)
    print(f"\nsaved {args.out}")


if __name__ == "__main__":
    main()
