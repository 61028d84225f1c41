"""Decode cost and memory against context: Transformer, Mamba-2, Gated DeltaNet, RWKV-7, hybrids.

    python benchmarks/inference.py --preset cpu                # 512 ... 8192, ~15 min on 2 cores
    python benchmarks/inference.py --preset smoke --out /tmp/x # seconds
    python benchmarks/inference.py --preset gpu                # 1K ... 128K, bf16

Every model has the same width, depth and MLP (byte vocabulary, SwiGLU); only
the mixer pattern differs: ``A`` (Transformer), ``M`` (Mamba-2), ``D`` (Gated
DeltaNet), ``V`` (RWKV-7), ``MMMMMMMA`` (1:7 attention) and ``MMMA`` (1:3).
Parameters are random: cost does not depend on what the model learned.

For each model, context ``L`` and batch ``B`` one row:

* ``prefill_ms``: one jitted call that runs ``L`` prompt tokens into an empty
  cache (compiled ahead; median of ``--prefill_repeats``). Measured at the batches in the
  preset's ``prefill_batches``; at the other batches the decode cache is the
  batch-1 prefilled cache repeated along the batch axis (same cost per row)
  and ``prefill_ms`` is null.
* ``decode_ms_per_token``: a jitted ``lax.fori_loop`` of ``--decode_steps``
  greedy single-token steps starting from the prefilled cache (the cache is
  donated and threaded from one timed call to the next, so no call copies it),
  compiled; one warm call, then the median over ``--repeats`` calls divided by
  the steps.
  ``decode_tokens_per_s = B * 1000 / decode_ms_per_token``.
* ``cache_bytes``: the sum of ``nbytes`` of ``LM.init_cache(B, max_len=L)``
  leaves (shapes only, nothing allocated).
* ``xla_prefill_bytes`` / ``xla_decode_bytes``: the compiled programs'
  ``memory_analysis()`` (arguments + outputs + temporaries - aliased).
* ``peak_bytes`` and ``peak_method``: measured memory. On CPU the process's
  peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) above its RSS
  when the row's runs started (compilation done before); on GPU/TPU
  ``memory_stats()["peak_bytes_in_use"]`` (the device's peak since the process
  started, so it never decreases along the run).

A row that does not fit (an out-of-memory error, or a compiled program or an
estimate over ``--max_gib``) has ``status: "does not fit"`` and a ``reason``.

``allocated_vs_filled`` repeats the batch-1 decode of every model with
attention at a fixed filled length (the smallest context) in a cache allocated
for that length and for the largest context: does a decode step cost what the
cache holds or what it could hold?

Writes ``inference.json`` and ``inference.png`` (ms/token and cache bytes
against context, log-log) under ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from effarch.models.config import LMConfig  # noqa: E402
from effarch.models.lm import LM  # noqa: E402

MODELS = {  # name -> layer pattern (tiled to n_layers)
    "transformer": "A",
    "mamba2": "M",
    "gated_deltanet": "D",
    "rwkv7": "V",
    "hybrid_1:7": "MMMMMMMA",
    "hybrid_1:3": "MMMA",
}

PRESETS = {
    # Seconds: the smoke test. Tiny mixers, two short contexts.
    "smoke": dict(d_model=32, n_layers=8, d_ff=64, mixer_preset="tiny", mixers={},
                  contexts=(16, 32), batches=(1, 2), prefill_batches=(1,), decode_steps=4,
                  repeats=1, prefill_repeats=1, dtype="float32", max_gib=2.0),
    # A 2-core CPU in about 15 minutes: ~6.5-8.6M parameters per model.
    "cpu": dict(d_model=256, n_layers=8, d_ff=None, mixer_preset=None,
                mixers={"A": ("attention", {"num_heads": 4})},
                contexts=(512, 1024, 2048, 4096, 8192), batches=(1, 8), prefill_batches=(1,),
                decode_steps=8, repeats=3, prefill_repeats=1, dtype="float32", max_gib=8.0),
    # One large accelerator: ~200M parameters, bf16.
    "gpu": dict(d_model=1024, n_layers=16, d_ff=None, mixer_preset=None,
                mixers={"A": ("attention", {"num_heads": 16})},
                contexts=tuple(2**i for i in range(10, 18)), batches=(1, 8), prefill_batches=(1, 8),
                decode_steps=64, repeats=5, prefill_repeats=3, dtype="bfloat16", max_gib=120.0),
}

DOES_NOT_FIT = "does not fit"


class DoesNotFit(Exception):
    """A program whose memory is over the budget, or an out-of-memory error."""


def _is_oom(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in text or "Out of memory" in text \
        or "out of memory" in text


def tree_bytes(tree) -> int:
    """Sum of ``nbytes`` of a pytree's leaves (arrays or ShapeDtypeStructs)."""
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def make_config(pattern: str, p: dict) -> LMConfig:
    return LMConfig(vocab_size=256, d_model=p["d_model"], n_layers=p["n_layers"], pattern=pattern,
                    d_ff=p["d_ff"], mlp="swiglu", mixer_preset=p["mixer_preset"], mixers=p["mixers"],
                    dtype=jnp.dtype(p["dtype"]), param_dtype=jnp.float32, max_len=max(p["contexts"]))


# ---------------------------------------------------------------- memory


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Measured peak memory of a region: device memory_stats where present, else process RSS."""

    def __init__(self):
        stats = jax.devices()[0].memory_stats()
        self.device = bool(stats and "peak_bytes_in_use" in stats)
        if self.device:
            self.method = "device memory_stats()['peak_bytes_in_use'] (since process start)"
        elif _proc_status_kib("VmHWM") is not None:
            self.method = "process peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS at row start"
        else:
            self.method = "unavailable"

    def start(self):
        if self.device or self.method == "unavailable":
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        self.base = _proc_status_kib("VmRSS")

    def peak(self) -> int | None:
        if self.device:
            return int(jax.devices()[0].memory_stats()["peak_bytes_in_use"])
        if self.method == "unavailable":
            return None
        return max(0, (_proc_status_kib("VmHWM") - self.base)) * 1024


def compiled_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


def _check_budget(nbytes: int | None, what: str, budget: float) -> None:
    if nbytes is not None and nbytes > budget:
        raise DoesNotFit(f"{what}: {nbytes / 2**30:.2f} GiB > --max_gib {budget / 2**30:.2f} GiB")


# ---------------------------------------------------------------- programs


def prefill_fn(lm: LM, batch: int, max_len: int):
    """``(params, tokens [B, L]) -> (next token [B], cache)`` from an empty cache of ``max_len``."""

    def prefill(params, tokens):
        cache = lm.init_cache(batch, max_len, lm.config.dtype)
        logits, _, cache = lm.apply(params, tokens, cache=cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    return prefill


def decode_fn(lm: LM, steps: int):
    """``(params, cache, token [B]) -> (token, cache)`` after ``steps`` greedy decode steps."""

    def decode(params, cache, token):
        def body(_, carry):
            token, cache = carry
            logits, _, cache = lm.apply(params, token[:, None], cache=cache)
            return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache

        return jax.lax.fori_loop(0, steps, body, (token, cache))

    return decode


def batch_axes(lm: LM, max_len: int):
    """Per cache leaf, the axis that is the batch (None for leaves without one)."""
    one = jax.eval_shape(lambda: lm.init_cache(1, max_len, lm.config.dtype))
    two = jax.eval_shape(lambda: lm.init_cache(2, max_len, lm.config.dtype))

    def axis(a, b):
        diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
        return diff[0] if diff else None

    return jax.tree.map(axis, one, two)


def tile_cache(cache, axes, batch: int):
    """A batch-1 cache repeated ``batch`` times along each leaf's batch axis."""
    return jax.tree.map(lambda x, ax: x if ax is None else jnp.repeat(x, batch, axis=ax), cache, axes)


def time_prefill(compiled, params, tokens, repeats: int):
    """Median ms of ``repeats`` calls of the (already compiled) prefill, and the last output."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(params, tokens))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def time_decode(compiled, params, cache, token, repeats: int) -> tuple[float, object, object]:
    """Median ms of ``repeats`` calls (after one warm call), threading the donated cache."""
    token, cache = jax.block_until_ready(compiled(params, cache, token))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        token, cache = jax.block_until_ready(compiled(params, cache, token))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), token, cache


# ---------------------------------------------------------------- one model


def measure_model(name, pattern, p, args, mem, budget):
    """Rows of one model over contexts and batches, and its allocated-vs-filled rows."""
    cfg = make_config(pattern, p)
    lm = LM(cfg)
    params = lm.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    param_bytes = tree_bytes(params)
    steps, repeats = args.decode_steps, args.repeats
    slack = (1 + repeats) * steps  # every decoded token has a slot
    decode = jax.jit(decode_fn(lm, steps), donate_argnums=(1,))
    rows = []
    base = {"model": name, "pattern": cfg.layer_pattern, "params": int(sum(x.size for x in jax.tree.leaves(params)))}

    for context in args.contexts:
        max_len = context + slack
        axes = batch_axes(lm, max_len)
        tokens1 = jax.random.randint(jax.random.PRNGKey(context), (1, context), 0, cfg.vocab_size, jnp.int32)
        cache1 = token1 = None
        prefill_failure = None
        for batch in args.batches:
            row = {**base, "batch": batch, "context": context, "max_len": max_len, "decode_steps": steps,
                   "cache_bytes": tree_bytes(jax.eval_shape(lambda b=batch: lm.init_cache(b, context, cfg.dtype))),
                   "status": "ok", "prefill_ms": None, "prefill_tokens_per_s": None,
                   "decode_ms_per_token": None, "decode_tokens_per_s": None,
                   "xla_prefill_bytes": None, "xla_decode_bytes": None,
                   "peak_bytes": None, "peak_method": mem.method}
            started = time.perf_counter()
            try:
                if prefill_failure is not None:
                    raise DoesNotFit(f"the batch-1 prefill does not fit ({prefill_failure})")
                # A cheap estimate first: the cache in and out of the loop, and the parameters.
                cache_at = tree_bytes(jax.eval_shape(lambda b=batch: lm.init_cache(b, max_len, cfg.dtype)))
                _check_budget(2 * cache_at + param_bytes, "estimate (2 x cache + params)", budget)
                prefill_here = batch in args.prefill_batches or batch == 1
                compiled_prefill = None
                if prefill_here:
                    tokens = tokens1 if batch == 1 else jnp.tile(tokens1, (batch, 1))
                    prefill = jax.jit(prefill_fn(lm, batch, max_len))
                    compiled_prefill = prefill.lower(params, tokens).compile()
                    row["xla_prefill_bytes"] = compiled_bytes(compiled_prefill)
                    _check_budget(row["xla_prefill_bytes"], "compiled prefill", budget)
                cache_shape = jax.eval_shape(lambda b=batch: lm.init_cache(b, max_len, cfg.dtype))
                token_shape = jax.ShapeDtypeStruct((batch,), jnp.int32)
                compiled_decode = decode.lower(params, cache_shape, token_shape).compile()
                row["xla_decode_bytes"] = compiled_bytes(compiled_decode)
                _check_budget(row["xla_decode_bytes"], "compiled decode", budget)
                row["compile_s"] = time.perf_counter() - started

                mem.start()
                if prefill_here:
                    ms, (token, cache) = time_prefill(compiled_prefill, params, tokens, args.prefill_repeats)
                    row["prefill_ms"] = ms
                    row["prefill_tokens_per_s"] = batch * context / (ms / 1e3)
                    if batch == 1:  # kept for the other batches; decode gets (and donates) a copy
                        cache1, token1 = cache, token
                        cache = jax.tree.map(jnp.copy, cache1)
                else:
                    cache = tile_cache(cache1, axes, batch)
                    token = jnp.repeat(token1, batch)
                ms, _, _ = time_decode(compiled_decode, params, cache, token, repeats)
                del cache, token
                row["decode_ms_per_token"] = ms / steps
                row["decode_tokens_per_s"] = batch * 1e3 / row["decode_ms_per_token"]
                row["peak_bytes"] = mem.peak()
            except Exception as err:  # noqa: BLE001 - every failure becomes a row
                if not isinstance(err, DoesNotFit) and not _is_oom(err):
                    raise
                row["status"] = DOES_NOT_FIT
                row["reason"] = str(err).splitlines()[0][:300]
                if batch == 1:
                    prefill_failure = row["reason"]
            row["wall_s"] = time.perf_counter() - started
            rows.append(row)
            print({k: row[k] for k in ("model", "batch", "context", "status", "prefill_ms",
                                       "decode_ms_per_token", "cache_bytes", "peak_bytes", "wall_s")},
                  flush=True)
        del cache1, token1

    allocated = []
    if "A" in cfg.layer_pattern and len(args.contexts) > 1:
        filled = args.contexts[0]
        tokens = jax.random.randint(jax.random.PRNGKey(filled), (1, filled), 0, cfg.vocab_size, jnp.int32)
        for max_len in (filled + slack, args.contexts[-1] + slack):
            row = {**base, "batch": 1, "filled": filled, "max_len": max_len, "status": "ok",
                   "cache_bytes_allocated": tree_bytes(jax.eval_shape(lambda m=max_len: lm.init_cache(1, m, cfg.dtype))),
                   "decode_ms_per_token": None}
            try:
                token, cache = jax.jit(prefill_fn(lm, 1, max_len))(params, tokens)
                compiled_decode = decode.lower(params, cache, token).compile()
                ms, _, _ = time_decode(compiled_decode, params, cache, token, repeats)
                row["decode_ms_per_token"] = ms / steps
            except Exception as err:  # noqa: BLE001
                if not _is_oom(err):
                    raise
                row["status"] = DOES_NOT_FIT
                row["reason"] = str(err).splitlines()[0][:300]
            allocated.append(row)
            print(row, flush=True)
    return rows, allocated


# ---------------------------------------------------------------- summary and plot


def _lookup(rows, model, batch, context, key):
    for r in rows:
        if r["model"] == model and r["batch"] == batch and r["context"] == context and r["status"] == "ok":
            return r[key]
    return None


def summarize(rows, allocated, models, contexts, batches) -> dict:
    """The page's expectations as numbers: growth of ms/token, cache ratios, allocated vs filled."""
    lo, hi = contexts[0], contexts[-1]
    growth = {}
    for model in models:
        for batch in batches:
            a, b = (_lookup(rows, model, batch, c, "decode_ms_per_token") for c in (lo, hi))
            growth[f"{model}@B{batch}"] = None if a is None or b is None else b / a
    cache = {}
    ref = _lookup(rows, "transformer", 1, hi, "cache_bytes")
    for model in models:
        own = _lookup(rows, model, 1, hi, "cache_bytes")
        cache[model] = None if ref is None or own is None else own / ref
    alloc = {}
    for model in models:
        times = [r["decode_ms_per_token"] for r in allocated if r["model"] == model]
        if len(times) == 2 and None not in times:
            alloc[model] = times[1] / times[0]
    return {
        f"decode_ms_per_token_ratio_{hi}_over_{lo}": growth,
        f"cache_bytes_over_transformer_at_{hi}": cache,
        f"decode_ms_per_token_ratio_allocated_{hi}_over_allocated_{lo}_filled_{lo}": alloc,
    }


def plot(rows, models, batches, path, title):
    plt = harness.pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for i, model in enumerate(models):
        color = colors[i % len(colors)]
        for j, batch in enumerate(batches):
            pts = [(r["context"], r["decode_ms_per_token"]) for r in rows
                   if r["model"] == model and r["batch"] == batch and r["status"] == "ok"]
            if pts:
                ax1.plot(*zip(*pts), styles[j % len(styles)], marker="o", color=color, label=f"{model} B={batch}")
        pts = [(r["context"], r["cache_bytes"]) for r in rows if r["model"] == model and r["batch"] == batches[0]]
        if pts:
            ax2.plot(*zip(*pts), marker="o", color=color, label=model)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length L (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_ylabel("decode time per token (ms)")
    ax1.set_title("Decode cost against context")
    if ax1.get_legend_handles_labels()[0]:
        ax1.legend(fontsize=7, ncol=2)
    ax2.set_ylabel(f"decode-cache bytes (batch {batches[0]}, max_len = L)")
    ax2.set_title("Decode-cache size against context")
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=7)
    harness.save_figure(fig, path, title)


# ---------------------------------------------------------------- main


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", default="results/inference", help="every file goes under this folder")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--contexts", default=None, help="comma list; default: the preset's")
    parser.add_argument("--batches", default=None, help="comma list; default: the preset's")
    parser.add_argument("--prefill_batches", default=None,
                        help="batches whose prefill is timed (others reuse the batch-1 cache)")
    parser.add_argument("--decode_steps", type=int, default=None, help="steps per timed decode call")
    parser.add_argument("--repeats", type=int, default=None, help="timed decode calls (median kept)")
    parser.add_argument("--prefill_repeats", type=int, default=None,
                        help="timed prefill calls (median kept; compiled ahead, so no warm-up call)")
    parser.add_argument("--n_layers", type=int, default=None, help="override the preset's depth")
    parser.add_argument("--max_gib", type=float, default=None,
                        help="memory budget: a row whose program needs more is 'does not fit'")
    args = parser.parse_args(argv)
    p = dict(PRESETS[args.preset])
    if args.n_layers is not None:
        p["n_layers"] = args.n_layers
    args.preset_settings = p
    for key in ("contexts", "batches", "prefill_batches"):
        value = getattr(args, key)
        setattr(args, key, tuple(sorted(_ints(value))) if value is not None else tuple(p[key]))
    for key in ("decode_steps", "repeats", "prefill_repeats", "max_gib"):
        if getattr(args, key) is None:
            setattr(args, key, p[key])
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; valid: {', '.join(MODELS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    p = args.preset_settings
    os.makedirs(args.out, exist_ok=True)
    mem = PeakMemory()
    budget = args.max_gib * 2**30
    rows, allocated = [], []
    for name in args.models:
        r, a = measure_model(name, MODELS[name], p, args, mem, budget)
        rows += r
        allocated += a
    summary = summarize(rows, allocated, args.models, args.contexts, args.batches)

    print()
    harness.print_table(rows, ["model", "batch", "context", "status", "prefill_ms", "decode_ms_per_token",
                               "decode_tokens_per_s", "cache_bytes", "peak_bytes"])
    if allocated:
        print()
        harness.print_table(allocated, ["model", "filled", "max_len", "cache_bytes_allocated",
                                        "decode_ms_per_token", "status"])
    print()
    for key, value in summary.items():
        print(key, {k: (None if v is None else round(v, 3)) for k, v in value.items()})

    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in p.items()}
    settings.update(contexts=list(args.contexts), batches=list(args.batches),
                    prefill_batches=list(args.prefill_batches), decode_steps=args.decode_steps,
                    repeats=args.repeats, prefill_repeats=args.prefill_repeats, max_gib=args.max_gib)
    settings["xla_flags"] = os.environ.get("XLA_FLAGS")
    configs = {name: make_config(MODELS[name], p).to_dict() for name in args.models}
    path = os.path.join(args.out, "inference.json")
    harness.save_json(path, rows, preset=args.preset, settings=settings, peak_method=mem.method,
                      summary=summary, allocated_vs_filled=allocated, configs=configs)
    env = harness.environment()
    plot(rows, args.models, args.batches, os.path.join(args.out, "inference.png"),
         f"effarch decode, {p['n_layers']} layers, d_model {p['d_model']}, {p['dtype']}, "
         f"{env['device']} ({env['platform']})")
    return {"rows": rows, "allocated_vs_filled": allocated, "summary": summary, "path": path}


if __name__ == "__main__":
    main()
