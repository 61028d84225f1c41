"""Time the Pallas chunked linear attention kernel against its neighbours.

    python benchmarks/chunked_linear_attention.py                   # GPU/TPU, default shapes
    python benchmarks/chunked_linear_attention.py --small           # CPU smoke run (interpret mode)
    python benchmarks/chunked_linear_attention.py --shapes 2x4096x16x128 --decay channel

For each shape ``BxTxHxD`` (K = V = D) and decay form (``scalar`` [B,T,H] as in
Mamba-2 / simple GLA, ``channel`` [B,T,H,K] as in GLA) it times, in bf16, the
forward and the forward+backward (gradient of a weighted sum of the outputs
with respect to q, k, v and the log decay) of:

* ``pallas``: ``effarch.ops.linear_attention(implementation="pallas")``;
* ``xla_chunked``: the same op's XLA chunked form;
* ``softmax``: ``jax.nn.dot_product_attention`` (causal; cuDNN on GPU, else XLA)
  at the same B, T, H and head dim;
* ``fla``: flash-linear-attention's ``chunk_simple_gla`` / ``chunk_gla``, timed
  with CUDA events, when ``fla`` and a CUDA ``torch`` import.

Prints a table and saves JSON with the device, versions and command line.
On CPU only ``--small`` is sensible (the kernel runs interpreted).
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp

import harness
from effarch import ops

DEFAULT_SHAPES = "4x2048x16x128,2x8192x16x128,1x16384x16x128,8x2048x32x64"
SMALL_SHAPES = "1x256x2x32"


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    shapes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() for p in parts):
            raise ValueError(f"--shapes item {item!r}; expected BxTxHxD, e.g. 4x2048x16x128.")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def make_inputs(shape, decay: str, dtype):
    b, t, h, d = shape
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    q, k, v = (jax.random.normal(x, (b, t, h, d), dtype) for x in ks[:3])
    g_shape = (b, t, h) if decay == "scalar" else (b, t, h, d)
    log_decay = jax.nn.log_sigmoid(jax.random.normal(ks[3], g_shape) + 3.0)
    weight = jax.random.normal(ks[4], (b, t, h, d), jnp.float32)
    return q, k, v, log_decay, weight


def linear_attention_fns(implementation: str, chunk: int):
    def forward(q, k, v, g):
        return ops.linear_attention(q, k, v, g, chunk_size=chunk,
                                    implementation=implementation)[0]
    return _fwd_and_grad(forward)


def softmax_fns():
    impl = "cudnn" if jax.default_backend() == "gpu" else "xla"

    def forward(q, k, v, g):
        del g
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    return _fwd_and_grad(forward), impl


def _fwd_and_grad(forward):
    def loss(q, k, v, g, weight):
        return jnp.sum(forward(q, k, v, g).astype(jnp.float32) * weight)

    fwd = jax.jit(lambda q, k, v, g, weight: forward(q, k, v, g))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    return fwd, grad


def time_fla(shape, decay: str, repeats: int):
    """Times fla's chunk_simple_gla / chunk_gla with CUDA events; None if unavailable."""
    try:
        import torch
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    b, t, h, d = shape
    dev = torch.device("cuda")
    q, k, v = (torch.randn(b, t, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    g_shape = (b, t, h) if decay == "scalar" else (b, t, h, d)
    g = torch.nn.functional.logsigmoid(torch.randn(g_shape, device=dev) + 3.0)
    g.requires_grad_(True)
    fn = chunk_simple_gla if decay == "scalar" else chunk_gla
    weight = torch.randn(b, t, h, d, device=dev)

    def forward():
        return fn(q=q, k=k, v=v, g=g, scale=d ** -0.5)[0]

    def forward_backward():
        (forward().float() * weight).sum().backward()

    result = {}
    for name, step in (("fwd_ms", forward), ("fwd_bwd_ms", forward_backward)):
        step()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        result[name] = statistics.median(times)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=None, help=f"BxTxHxD list; default {DEFAULT_SHAPES}")
    parser.add_argument("--small", action="store_true", help=f"CPU preset: {SMALL_SHAPES}")
    parser.add_argument("--decay", default="both", choices=("scalar", "channel", "both"))
    parser.add_argument("--chunk", type=int, default=64, help="chunk length C")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip", default="", help="comma list of: pallas,xla_chunked,softmax,fla")
    parser.add_argument("--out", default="results/chunked_linear_attention.json")
    args = parser.parse_args()
    shapes = parse_shapes(args.shapes or (SMALL_SHAPES if args.small else DEFAULT_SHAPES))
    repeats = 2 if args.small else args.repeats
    skip = set(filter(None, args.skip.split(",")))
    decays = ("scalar", "channel") if args.decay == "both" else (args.decay,)
    chunk = 32 if args.small and args.chunk == 64 else args.chunk

    rows = []
    for shape in shapes:
        for decay in decays:
            inputs = make_inputs(shape, decay, jnp.bfloat16)
            fns = {}
            if "pallas" not in skip:
                fns["pallas"] = linear_attention_fns("pallas", chunk)
            if "xla_chunked" not in skip:
                fns["xla_chunked"] = linear_attention_fns("chunked", chunk)
            if "softmax" not in skip:
                (fwd, grad), impl = softmax_fns()
                fns[f"softmax_{impl}"] = (fwd, grad)
            for name, (fwd, grad) in fns.items():
                row = {"shape": "x".join(map(str, shape)), "decay": decay, "impl": name}
                for key, fn in (("fwd", fwd), ("fwd_bwd", grad)):
                    timing = harness.time_fn(fn, *inputs, repeats=repeats)
                    row[f"{key}_ms"] = timing["median_ms"]
                    row[f"{key}_compile_s"] = timing["compile_s"]
                rows.append(row)
                print(row)
            if "fla" not in skip:
                fla = time_fla(shape, decay, repeats)
                if fla is not None:
                    name = "fla_chunk_simple_gla" if decay == "scalar" else "fla_chunk_gla"
                    rows.append({"shape": "x".join(map(str, shape)), "decay": decay,
                                 "impl": name, **fla})
                    print(rows[-1])
    harness.print_table(rows, ["shape", "decay", "impl", "fwd_ms", "fwd_bwd_ms"])
    harness.save_json(args.out, rows, chunk=chunk, dtype="bfloat16",
                      interpret=jax.default_backend() not in ("gpu", "tpu"))


if __name__ == "__main__":
    main()
