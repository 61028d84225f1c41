"""Time softmax attention: our Pallas kernel vs cuDNN vs the XLA forms.

    python benchmarks/attention.py                      # GPU/TPU: T = 2K..32K, D = 128, causal
    python benchmarks/attention.py --small              # CPU smoke run (the kernel is interpreted)
    python benchmarks/attention.py --seq-lens 4096 --kv-heads 2 --budget-s 120

For each sequence length T (batch ``B = --tokens / T``, so every row moves the
same number of tokens), with and without packed segments (``--segments``
equal documents per row), in bf16, causal, it times the forward and the
forward+backward (gradient of a weighted sum of the outputs with respect to
q, k and v) of:

* ``pallas``: ``effarch.ops.attention(implementation="pallas")`` (our
  FlashAttention-2 Triton kernel on GPU, splash attention on TPU);
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU
  only; it takes no packed segment ids, so those rows are skipped);
* ``xla``: ``ops.attention(implementation="xla")``, the plain masked softmax,
  while its ``[B,H,T,T]`` float32 logits fit in ``--xla-max-gib``;
* ``chunked``: ``ops.attention(implementation="chunked")``, XLA's blockwise
  online softmax.

TFLOP/s count ``4 B H T^2 D`` halved for causal (forward) and 2.5 times that
more for the backward. Prints a table and writes JSON with the device,
versions, commit and command line (``benchmarks/harness.py``) after every
row, so a run cut short keeps what it measured; ``--budget-s`` stops starting
new rows once that many seconds have passed.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import harness
from effarch import ops

DEFAULT_SEQ_LENS = (2048, 4096, 8192, 16384, 32768)
SMALL_SEQ_LENS = (256,)
IMPLEMENTATIONS = ("pallas", "cudnn", "xla", "chunked")


def _parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None, help="T values")
    parser.add_argument("--tokens", type=int, default=None,
                        help="B * T per row (default 32768; --small: 256)")
    parser.add_argument("--heads", type=int, default=None, help="query heads H (default 16)")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default H)")
    parser.add_argument("--head-dim", type=int, default=None, help="D (default 128)")
    parser.add_argument("--segments", type=int, default=4,
                        help="equal packed documents per row in the segment rows")
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS),
                        choices=IMPLEMENTATIONS)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (median kept)")
    parser.add_argument("--xla-max-gib", type=float, default=8.0,
                        help="largest float32 logits tensor the plain XLA form may build")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new row after this many seconds")
    parser.add_argument("--small", action="store_true", help="tiny shapes for a CPU smoke run")
    parser.add_argument("--out", default="results/attention.json", help="JSON report path")
    args = parser.parse_args(argv)
    if jax.default_backend() == "cpu" and not args.small:
        parser.error("on CPU run with --small (the Pallas kernel is interpreted there).")
    args.seq_lens = args.seq_lens or (SMALL_SEQ_LENS if args.small else DEFAULT_SEQ_LENS)
    args.tokens = args.tokens or (256 if args.small else 32768)
    args.heads = args.heads or (2 if args.small else 16)
    args.kv_heads = args.kv_heads or args.heads
    args.head_dim = args.head_dim or (32 if args.small else 128)
    args.repeats = args.repeats or (2 if args.small else 5)
    return args


def _inputs(b, t, h, hkv, d, segments: int | None):
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    bf16 = jnp.bfloat16
    q = jax.random.normal(ks[0], (b, t, h, d), bf16)
    k = jax.random.normal(ks[1], (b, t, hkv, d), bf16)
    v = jax.random.normal(ks[2], (b, t, hkv, d), bf16)
    weight = jax.random.normal(ks[3], (b, t, h, d), jnp.float32)
    ids = None
    if segments:
        ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) * segments // t, (b, t))
    return q, k, v, weight, ids


def _forward(implementation: str, ids):
    if implementation == "cudnn":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                            implementation="cudnn")
    return lambda q, k, v: ops.attention(q, k, v, causal=True, segment_ids=ids,
                                         implementation=implementation)


def _loss(forward, weight):
    return lambda q, k, v: jnp.sum(forward(q, k, v).astype(jnp.float32) * weight)


def _skip_reason(implementation, b, t, h, segmented, args) -> str | None:
    if implementation == "cudnn":
        if jax.default_backend() != "gpu":
            return "cuDNN needs a GPU"
        if segmented:
            return "jax.nn.dot_product_attention takes no packed segment ids"
    if implementation == "xla" and b * h * t * t * 4 > args.xla_max_gib * 2**30:
        return f"its [B,H,T,T] float32 logits exceed --xla-max-gib={args.xla_max_gib}"
    return None


def main(argv=None):
    args = _parse_args(argv)
    start = time.perf_counter()
    rows = []
    d, h, hkv = args.head_dim, args.heads, args.kv_heads
    for t in args.seq_lens:
        b = max(1, args.tokens // t)
        flops = 4 * b * h * t * t * d / 2  # causal forward
        for segments in (None, args.segments):
            q, k, v, weight, ids = _inputs(b, t, h, hkv, d, segments)
            for implementation in args.implementations:
                row = {"T": t, "B": b, "H": h, "Hkv": hkv, "D": d, "segments": segments or 0,
                       "impl": implementation}
                reason = _skip_reason(implementation, b, t, h, segments, args)
                if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                    reason = f"--budget-s={args.budget_s} spent"
                if reason:
                    rows.append({**row, "skipped": reason})
                    print(rows[-1])
                    continue
                forward = _forward(implementation, ids)
                fns = {"fwd": jax.jit(forward),
                       "fwd_bwd": jax.jit(jax.grad(_loss(forward, weight), (0, 1, 2)))}
                for mode, fn in fns.items():
                    timing = harness.time_fn(fn, q, k, v, repeats=args.repeats)
                    row[f"{mode}_ms"] = timing["median_ms"]
                    row[f"{mode}_compile_s"] = timing["compile_s"]
                    work = flops * (3.5 if mode == "fwd_bwd" else 1.0)
                    row[f"{mode}_tflops"] = work / (timing["median_ms"] * 1e-3) / 1e12
                rows.append(row)
                print(row)
                harness.save_json(args.out, rows, dtype="bfloat16", causal=True,
                                  interpret=jax.default_backend() not in ("gpu", "tpu"))
    harness.print_table(rows, ["T", "B", "segments", "impl", "fwd_ms", "fwd_bwd_ms",
                               "fwd_tflops", "fwd_bwd_tflops", "skipped"])
    harness.save_json(args.out, rows, dtype="bfloat16", causal=True,
                      interpret=jax.default_backend() not in ("gpu", "tpu"))


if __name__ == "__main__":
    main()
