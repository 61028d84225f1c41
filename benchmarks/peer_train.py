"""effarch against the PyTorch reference (transformers) on CPU: same model, same weights, same process.

    python benchmarks/peer_train.py --preset cpu                    # ~4 min on 2 cores (20 rows)
    python benchmarks/peer_train.py --preset cpu --profile --trace  # and ~12 min more: effarch's time
    OMP_WAIT_POLICY=PASSIVE python benchmarks/peer_train.py --preset cpu   # on a loaded machine (see below)
    python benchmarks/peer_train.py --preset smoke --out /tmp/x.json

Results and their reading: docs/results/speed.md.

For Mamba (``MambaForCausalLM``), Mamba-2 (``Mamba2ForCausalLM``),
RecurrentGemma (``RecurrentGemmaForCausalLM``: RG-LRU and local attention),
Jamba (``JambaForCausalLM``: Mamba and attention, dense MLPs) and Qwen3-Next
(``Qwen3NextForCausalLM``: Gated DeltaNet and gated attention, dense MLPs) at
each of the preset's sizes (``--archs``), a random transformers model is built, saved with
``save_pretrained`` into a temporary folder and read back by
``effarch.convert.from_hf``: both sides hold the same float32 weights. On one
fixed batch ``[B, T]`` of random tokens (targets: another random ``[B, T]``)
two things are timed:

* ``train``: one training step, forward + backward + global-norm clipping +
  AdamW. effarch: ``effarch.train.make_train_step`` (the step ``Trainer``
  runs), jitted, the state donated. torch: eager ``model.train()``, mean
  ``F.cross_entropy`` of the logits, ``clip_grad_norm_``,
  ``torch.optim.AdamW`` with the same hyper-parameters and the same decay mask
  (rank >= 2).
* ``prefill``: the prompt through the model into an empty decode cache, the
  logits at the last position only, no gradient. effarch:
  ``LM.apply(params, tokens, cache=LM.init_cache(B, T), logit_positions=...)``
  jitted; torch: ``model(tokens, use_cache=True, logits_to_keep=1)`` under
  ``torch.inference_mode()``.

Each call is timed to completion; the two sides alternate (effarch, torch,
effarch, torch, ...) so that load from other processes falls on both alike.
The first ``--warmup`` calls of each side (effarch's compiles) are not
counted; the row reports the median and minimum of ``--repeats``,
``tokens_per_s = B * T / median`` and ``ratio = effarch tokens/s / torch
tokens/s`` (above 1: effarch is faster).

Parity, which makes the comparison one of the same computation: the loss
each side reports in its first step (same weights, same batch;
``loss_rel_diff``), the loss in its second step, after one update each
(``loss_after_update_rel_diff``: the gradients and AdamW agree too), and the
prefill's last-position logits (``prefill_logits_rel_rmse``).

torch runs on ``torch.set_num_threads(n)`` with ``n`` the threads XLA's CPU
client uses: one where ``XLA_FLAGS`` turns Eigen's multi-threading off (the
test suite's setting), else the cores this process may run on (XLA sizes its
pool to them); its OpenMP threads keep libgomp's default wait (spinning:
torch at its best on an idle machine; ``OMP_WAIT_POLICY``, see the constant's
comment) unless the variable is set. The JSON records ``n``,
the wait policy, the load average before and after, the commit when the run
started and any uncommitted change to the library, and the versions of jax,
torch and transformers.

``--profile`` adds the pieces of effarch's Mamba-2 training step at the
largest size, each jitted and timed forward + backward on its own (the whole
step, the model's loss, one mixer, the SSD op at several chunk sizes, the
short convolution, the gated RMSNorm, the projections, the head and the loss,
the optimiser update), with XLA's ``cost_analysis`` flops and bytes; and, with
``mamba`` among ``--archs``, Mamba's mixer and its selective scan in both forms.
``--trace`` traces that Mamba-2 step with ``jax.profiler`` and charges every
XLA thunk to the innermost effarch source line it comes from.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import glob
import gzip
import hashlib
import json
import linecache
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from effarch import convert, mixers, ops  # noqa: E402
from effarch import train as effarch_train  # noqa: E402
from effarch.layers.conv import ShortConv  # noqa: E402
from effarch.layers.norms import GatedRMSNorm, RMSNorm  # noqa: E402
from effarch.models.lm import LM  # noqa: E402
from effarch.testing import relative_rmse  # noqa: E402

ARCHS = ("mamba", "mamba2", "recurrent_gemma", "jamba", "qwen3_next")
# Prefill first: the train steps update the torch model in place.
MODES = ("prefill", "train")

PRESETS = {
    # The smoke test: four tiny layers (so that each hybrid has its attention layer), a short batch, 2 timed
    # calls (the parity needs 2 steps); compiling the train steps is most of its time.
    "smoke": dict(sizes={"tiny": (32, 4)}, batch=2, seq_len={arch: 32 for arch in ARCHS}, vocab_size=64,
                  mamba_d_state=4, mamba2_d_state=8, mamba2_head_dim=16, mamba2_chunk=16, head_dim=16, rg_window=16,
                  warmup=1, repeats=1),
    # A 2-core CPU. Mamba and Jamba are shorter: transformers' CPU path for Mamba's selective scan is
    # a Python loop over time whose backward grows as T^2 (small: 1.3 s at T = 64, 3.4 s at 128, 47 s
    # at 256); RecurrentGemma's RG-LRU is a Python loop over time too.
    "cpu": dict(sizes={"small": (128, 4), "medium": (256, 4)}, batch=8,
                seq_len={"mamba": 64, "mamba2": 512, "recurrent_gemma": 256, "jamba": 64, "qwen3_next": 512},
                vocab_size=4096, mamba_d_state=16, mamba2_d_state=32, mamba2_head_dim=32, mamba2_chunk=64,
                head_dim=32, rg_window=2048, warmup=1, repeats=5),
}

# The optimiser both sides run: AdamW, constant learning rate, clipping at norm 1.
LR = 1e-3
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
EPS = 1e-8
GRAD_CLIP = 1.0
SEED = 0
# torch's OpenMP (libgomp) threads wait for work by spinning by default. With more runnable threads
# than cores (a shared machine) a thread spins for a partner that is descheduled: torch at 2 threads
# ran 7-10x slower than at 1 thread at load ~7. Passive waiting avoids that, but costs torch up to
# 2.4x on an idle machine (1.7x on Mamba-2's medium step in session 9; docs/results/speed.md), which
# would flatter effarch: the default is libgomp's own (empty), and OMP_WAIT_POLICY=PASSIVE in the
# environment chooses passive waiting for a loaded machine. The JSON records which.
OMP_WAIT_POLICY = ""
# Source lines of the trace printed (all are saved).
TRACE_ROWS_PRINTED = 30


# ---------------------------------------------------------------- setup


def xla_cpu_threads() -> int:
    """Threads XLA's CPU client computes with: 1 if XLA_FLAGS turns Eigen's pool off, else the usable cores."""
    flags = os.environ.get("XLA_FLAGS", "")
    if re.search(r"xla_cpu_multi_thread_eigen=(false|0)", flags):
        return 1
    match = re.search(r"intra_op_parallelism_threads=(\d+)", flags)
    if match:
        return int(match.group(1))
    return len(os.sched_getaffinity(0))


def hf_config(arch: str, d_model: int, n_layers: int, p: dict):
    """A transformers config of ``arch`` at this size, tied embeddings, float32.

    The hybrids' attention has heads of ``p["head_dim"]``; their MLPs (dense:
    no experts) are ``2 * d_model`` wide. Jamba and Qwen3-Next put one attention
    layer in four (1:3), RecurrentGemma one in three (its residual pattern).
    """
    import transformers

    common = dict(vocab_size=p["vocab_size"], hidden_size=d_model, num_hidden_layers=n_layers,
                  tie_word_embeddings=True, use_cache=True)
    heads, head_dim, width = d_model // p["head_dim"], p["head_dim"], 2 * d_model
    if arch == "mamba":
        return transformers.MambaConfig(state_size=p["mamba_d_state"], expand=2, conv_kernel=4, **common)
    if arch == "mamba2":
        return transformers.Mamba2Config(state_size=p["mamba2_d_state"], head_dim=p["mamba2_head_dim"],
                                         num_heads=2 * d_model // p["mamba2_head_dim"], n_groups=1,
                                         chunk_size=p["mamba2_chunk"], expand=2, conv_kernel=4, **common)
    if arch == "recurrent_gemma":
        # RecurrentGemmaMlp halves intermediate_size: each of its two branches is `width` wide.
        return transformers.RecurrentGemmaConfig(intermediate_size=2 * width, num_attention_heads=heads,
                                                 num_key_value_heads=1, lru_width=d_model, conv1d_width=4,
                                                 attention_window_size=p["rg_window"],
                                                 block_types=("recurrent", "recurrent", "attention"), **common)
    if arch == "jamba":
        return transformers.JambaConfig(intermediate_size=width, num_attention_heads=heads,
                                        num_key_value_heads=max(1, heads // 2), num_experts=1, num_experts_per_tok=1,
                                        attn_layer_period=4, attn_layer_offset=2, mamba_d_state=p["mamba_d_state"],
                                        mamba_d_conv=4, mamba_expand=2, **common)
    if arch == "qwen3_next":
        return transformers.Qwen3NextConfig(
            intermediate_size=width, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
            head_dim=head_dim, linear_conv_kernel_dim=4, linear_key_head_dim=head_dim,
            linear_value_head_dim=head_dim, linear_num_key_heads=heads, linear_num_value_heads=heads,
            num_experts=0, decoder_sparse_step=1, mlp_only_layers=[],
            layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n_layers)],
            **common)
    raise ValueError(f"arch={arch!r}; expected one of {ARCHS}")


@dataclasses.dataclass
class Pair:
    """One model on both sides: the transformers module and effarch's config and variables."""

    arch: str
    size: str
    torch_model: object
    config: object
    variables: dict
    num_params: int


def build_pair(arch: str, size: str, d_model: int, n_layers: int, p: dict) -> Pair:
    """A random transformers model, saved and read back by ``from_hf`` into effarch."""
    import torch
    import transformers

    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(arch, d_model, n_layers, p))
    model = model.float()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        config, variables = convert.from_hf(folder)
    num_params = sum(t.numel() for t in model.parameters())
    if num_params != effarch_train.count_params(variables):
        raise AssertionError(f"{arch} {size}: torch has {num_params} parameters, effarch "
                             f"{effarch_train.count_params(variables)}; from_hf read another model.")
    return Pair(arch, size, model, config, variables, num_params)


def make_batch(p: dict, arch: str) -> dict[str, np.ndarray]:
    """One fixed batch: tokens and targets ``int32 [B, T]``, every target counted, one segment per row.

    Token 0, the pad token of RecurrentGemma's and Jamba's configs, appears
    in the inputs: torch's ``nn.Embedding(padding_idx=0)`` gives its lookup no
    gradient, and so does effarch (``LMConfig.pad_token_id``, set by
    ``convert.from_hf``), which the loss after one update checks.
    """
    rng = np.random.default_rng(SEED)
    shape = (p["batch"], p["seq_len"][arch])
    return {"tokens": rng.integers(0, p["vocab_size"], shape, dtype=np.int32),
            "targets": rng.integers(0, p["vocab_size"], shape, dtype=np.int32),
            "loss_mask": np.ones(shape, np.float32), "segment_ids": np.zeros(shape, np.int32)}


def train_config(batch: dict[str, np.ndarray]) -> effarch_train.TrainConfig:
    """A constant learning rate (no warmup, cosine from ``LR`` to ``LR``), so torch's constant AdamW matches."""
    b, t = batch["tokens"].shape
    return effarch_train.TrainConfig(steps=1000, batch_size=b, seq_len=t, lr=LR,
                                     warmup_steps=0, min_lr_ratio=1.0, weight_decay=WEIGHT_DECAY, b1=BETAS[0],
                                     b2=BETAS[1], eps=EPS, grad_clip=GRAD_CLIP, seed=SEED)


# ---------------------------------------------------------------- the two sides


class EffarchSide:
    """effarch's jitted train step (``make_train_step``, state donated) and prefill."""

    def __init__(self, pair: Pair, batch: dict[str, np.ndarray]):
        cfg = train_config(batch)
        self.lm = LM(pair.config)
        optimizer = effarch_train.make_optimizer(cfg)
        params = jax.tree.map(jnp.array, pair.variables["params"])  # a copy: the state is donated
        self.state = effarch_train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                              opt_state=optimizer.init(params))
        self.mesh = effarch_train.make_mesh((1, 1, 1))
        # Everything on the mesh, in and out: a step whose output lands elsewhere would compile twice.
        replicated = NamedSharding(self.mesh, P())
        self.state = jax.device_put(self.state, replicated)
        self.batch = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()}, replicated)
        step = effarch_train.make_train_step(self.lm, optimizer, cfg, effarch_train.learning_rate(cfg))
        self.step = jax.jit(step, in_shardings=replicated, out_shardings=replicated, donate_argnums=0)
        b, t = batch["tokens"].shape
        last = jnp.full((b, 1), t - 1, jnp.int32)

        def prefill(variables, tokens):
            cache = self.lm.init_cache(b, t, pair.config.dtype)
            logits, _, cache = self.lm.apply(variables, tokens, cache=cache, logit_positions=last)
            return logits[:, 0], cache

        self.prefill_fn = jax.jit(prefill)
        self.variables = pair.variables
        self.losses: list[float] = []

    def train(self) -> None:
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(effarch_train.LOGICAL_RULES):
            self.state, metrics = self.step(self.state, self.batch)
        self.losses.append(float(metrics["loss"]))  # waits for the step

    def prefill(self) -> np.ndarray:
        logits, cache = self.prefill_fn(self.variables, self.batch["tokens"])
        jax.block_until_ready(cache)
        return np.asarray(logits)


class TorchSide:
    """transformers in eager mode: the same step with torch.optim.AdamW, and prefill into a cache."""

    def __init__(self, pair: Pair, batch: dict[str, np.ndarray]):
        import torch

        self.torch = torch
        self.model = pair.torch_model
        params = [q for q in self.model.parameters() if q.requires_grad]
        decay = [q for q in params if q.ndim >= 2]  # effarch.train.decay_mask: rank >= 2
        no_decay = [q for q in params if q.ndim < 2]
        self.params = params
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=LR, betas=BETAS, eps=EPS)
        self.tokens = torch.from_numpy(batch["tokens"].astype(np.int64))
        self.targets = torch.from_numpy(batch["targets"].astype(np.int64))
        self.losses: list[float] = []

    def train(self) -> None:
        torch = self.torch
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(input_ids=self.tokens, use_cache=False).logits  # [B, T, V] float32
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), self.targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        self.optimizer.step()
        self.losses.append(float(loss.detach()))

    def prefill(self) -> np.ndarray:
        self.model.eval()
        with self.torch.inference_mode():
            out = self.model(input_ids=self.tokens, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float().numpy()


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return (time.perf_counter() - start) * 1e3, result


def interleaved(effarch_fn, torch_fn, warmup: int, repeats: int) -> dict:
    """Alternate calls (effarch, torch, ...); the first ``warmup`` of each side are not counted."""
    times = {"effarch": [], "torch": []}
    results = {"effarch": [], "torch": []}
    for _ in range(warmup + repeats):
        for side, fn in (("effarch", effarch_fn), ("torch", torch_fn)):
            ms, result = _timed(fn)
            times[side].append(ms)
            results[side].append(result)
    return {side: {"first_ms": ts[0], "times_ms": ts[warmup:], "median_ms": statistics.median(ts[warmup:]),
                   "min_ms": min(ts[warmup:]), "results": results[side]} for side, ts in times.items()}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def measure(pair: Pair, batch: dict[str, np.ndarray], p: dict) -> list[dict]:
    """The prefill and train rows of one model."""
    warmup, repeats = p["warmup"], p["repeats"]
    ours, ref = EffarchSide(pair, batch), TorchSide(pair, batch)
    tokens = batch["tokens"].size
    d_model, n_layers = p["sizes"][pair.size]
    rows = []
    for mode in MODES:
        timing = interleaved(getattr(ours, mode), getattr(ref, mode), warmup, repeats)
        e, t = timing["effarch"], timing["torch"]
        row = {"arch": pair.arch, "size": pair.size, "mode": mode, "d_model": d_model, "n_layers": n_layers,
               "params": pair.num_params, "batch": batch["tokens"].shape[0], "seq_len": batch["tokens"].shape[1],
               "effarch_ms": e["median_ms"], "torch_ms": t["median_ms"],
               "effarch_min_ms": e["min_ms"], "torch_min_ms": t["min_ms"],
               "effarch_times_ms": e["times_ms"], "torch_times_ms": t["times_ms"],
               "effarch_first_ms": e["first_ms"], "torch_first_ms": t["first_ms"],
               "effarch_tokens_per_s": tokens / (e["median_ms"] / 1e3),
               "torch_tokens_per_s": tokens / (t["median_ms"] / 1e3)}
        row["ratio"] = row["effarch_tokens_per_s"] / row["torch_tokens_per_s"]
        if mode == "train":
            row["loss_effarch"], row["loss_torch"] = ours.losses[0], ref.losses[0]
            row["loss_rel_diff"] = _rel(ours.losses[0], ref.losses[0])
            row["loss_after_update_effarch"], row["loss_after_update_torch"] = ours.losses[1], ref.losses[1]
            row["loss_after_update_rel_diff"] = _rel(ours.losses[1], ref.losses[1])
        else:
            row["prefill_logits_rel_rmse"] = relative_rmse(e["results"][0], t["results"][0])
        rows.append(row)
        print({k: v for k, v in row.items() if not k.endswith("times_ms")}, flush=True)
    return rows


# ---------------------------------------------------------------- profile of the Mamba-2 step


def _cost(compiled) -> dict:
    """XLA's own estimate of a compiled program's flops and bytes accessed (GFLOP, GB)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"gflops": cost.get("flops", float("nan")) / 1e9, "gbytes": cost.get("bytes accessed", float("nan")) / 1e9}


def _piece(rows: list, piece: str, count: int, fn, args, repeats: int) -> None:
    """Appends a profile row: median ms of ``jit(fn)(*args)`` after one call, times ``count``, and its cost."""
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append((time.perf_counter() - start) * 1e3)
    ms, cost = statistics.median(times), _cost(compiled)
    rows.append({"piece": piece, "count": count, "ms_each": ms, "step_ms": ms * count,
                 "gflops_each": cost["gflops"], "gbytes_each": cost["gbytes"]})
    print(rows[-1], flush=True)


def _fwd_bwd(apply, params, *inputs) -> tuple:
    """``(fn, args)``: ``fn(*args)`` is ``apply``'s forward and backward (against params and float inputs).

    The cotangent is random: for the gradient of a sum XLA would turn the
    backward matmuls into reductions.
    """
    shapes, tree = jax.tree.flatten(jax.eval_shape(apply, params, *inputs))
    keys = jax.random.split(jax.random.PRNGKey(3), len(shapes))
    cotangent = jax.tree.unflatten(tree, [jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, shapes)])
    floats = [i for i, x in enumerate(inputs) if jnp.issubdtype(x.dtype, jnp.floating)]

    def fn(params, cotangent, *inputs):
        def differentiated(params, *float_inputs):
            xs = list(inputs)
            for i, x in zip(floats, float_inputs):
                xs[i] = x
            return apply(params, *xs)

        out, vjp = jax.vjp(differentiated, params, *(inputs[i] for i in floats))
        return out, vjp(cotangent)  # the output too, or XLA would drop a forward the backward does not need

    return fn, (params, cotangent, *inputs)


def profile_mamba2(pair: Pair, batch: dict[str, np.ndarray], repeats: int) -> list[dict]:
    """Pieces of effarch's Mamba-2 training step, each jitted forward + backward on its own at the step's shapes.

    ``step_ms`` is ``ms_each`` times the pieces per step (``count``: the
    layers for a per-layer piece), so the rows can be read against the whole
    step. Rows whose ``piece`` starts with "alt:" are alternatives, not parts.
    """
    cfg = pair.config
    spec = cfg.layer_specs[0].mixer
    b, t = batch["tokens"].shape
    di, n, g, h, hp = spec.d_inner, spec.d_state, spec.ngroups, spec.num_heads, spec.head_dim
    params = pair.variables["params"]
    layer = params["layer_0"]["mixer"]
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 16))
    x = jax.random.normal(next(keys), (b, t, cfg.d_model))
    seg = jnp.asarray(batch["segment_ids"])
    tokens, targets, mask = (jnp.asarray(batch[k]) for k in ("tokens", "targets", "loss_mask"))
    rows = []
    add = functools.partial(_piece, rows, repeats=repeats)

    layers = cfg.n_layers
    # The whole step as benchmarked (make_train_step), then without the optimiser: the model's loss, fwd + bwd.
    ours = EffarchSide(pair, batch)
    with jax.set_mesh(ours.mesh), nn.logical_axis_rules(effarch_train.LOGICAL_RULES):
        add("whole train step (make_train_step)", 1, ours.step, (ours.state, ours.batch))
    lm = LM(cfg)

    def lm_loss(prm, seg):
        logits, _, _ = lm.apply({"params": prm}, tokens, segment_ids=seg)
        return effarch_train.cross_entropy(logits, targets, mask)[0] / (b * t)

    add("LM loss, fwd + bwd (segment_ids as the Trainer passes)", 1, jax.grad(lm_loss), (params, seg))
    add("alt: LM loss, fwd + bwd, segment_ids=None", 1, jax.grad(lambda prm: lm_loss(prm, None)), (params,))

    # One Mamba-2 mixer, then its parts.
    mixer = mixers.from_config(spec)
    add("Mamba-2 mixer (one layer)", layers,
        *_fwd_bwd(lambda prm, xs, s: mixer.apply({"params": prm}, xs, segment_ids=s)[0], layer, x, seg))
    add("alt: Mamba-2 mixer, segment_ids=None", layers,
        *_fwd_bwd(lambda prm, xs: mixer.apply({"params": prm}, xs)[0], layer, x))
    dense = lambda prm, xs: xs @ prm["kernel"]  # noqa: E731
    add("  in_proj matmul", layers, *_fwd_bwd(dense, layer["in_proj"], x))
    conv = ShortConv(kernel_size=spec.d_conv, activation="silu", dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    xbc = jax.random.normal(next(keys), (b, t, spec.conv_dim))
    add("  short conv + silu over xBC", layers,
        *_fwd_bwd(lambda prm, xs, s: conv.apply({"params": prm}, xs, None, segment_ids=s)[0], layer["conv"], xbc, seg))
    q = jax.random.normal(next(keys), (b, t, h, n)) * n**-0.5
    k = jax.random.normal(next(keys), (b, t, h, n)) * n**-0.5
    v = jax.random.normal(next(keys), (b, t, h, hp))
    log_a = -jax.nn.softplus(jax.random.normal(next(keys), (b, t, h))) * 0.1  # [B, T, H]

    def ssd(chunk, with_segments):
        def apply(_, q, k, v, a, s):
            return ops.linear_attention(q, k, v, a, scale=1.0, chunk_size=chunk,
                                        segment_ids=s if with_segments else None)[0]
        return _fwd_bwd(apply, {}, q, k, v, log_a, seg)

    add(f"  SSD op (linear_attention chunked, C={spec.chunk_size}, segment_ids)", layers,
        *ssd(spec.chunk_size, True))
    add(f"alt: SSD op, C={spec.chunk_size}, segment_ids=None", layers, *ssd(spec.chunk_size, False))
    for chunk in (16, 32, 128, 256):
        if chunk != spec.chunk_size and chunk <= t:
            add(f"alt: SSD op, C={chunk}, segment_ids=None", layers, *ssd(chunk, False))
    norm = GatedRMSNorm(group_size=di // g, eps=spec.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    y, z = jax.random.normal(next(keys), (b, t, di)), jax.random.normal(next(keys), (b, t, di))
    add("  gated RMSNorm", layers, *_fwd_bwd(lambda prm, y, z: norm.apply({"params": prm}, y, z), layer["norm"], y, z))
    add("  out_proj matmul", layers, *_fwd_bwd(dense, layer["out_proj"], y))

    # The head and the loss: final RMSNorm, tied unembedding, cross-entropy over [B, T, V] in float32.
    head_params = {"final_norm": params["final_norm"], "embed": params["embed"]}

    def head_loss(prm, xs):
        hid = RMSNorm(eps=cfg.norm_eps).apply({"params": prm["final_norm"]}, xs)
        logits = jnp.einsum("btd,vd->btv", hid, prm["embed"]["embedding"], preferred_element_type=jnp.float32)
        return effarch_train.cross_entropy(logits, targets, mask)[0] / (b * t)

    add("final norm + unembed + cross-entropy", 1, jax.grad(head_loss, argnums=(0, 1)), (head_params, x))
    add("  unembed matmul", 1,
        *_fwd_bwd(lambda prm, xs: jnp.einsum("btd,vd->btv", xs, prm["embedding"]), params["embed"], x))
    logits = jax.random.normal(next(keys), (b, t, cfg.vocab_size))
    add("  cross-entropy alone", 1,
        jax.grad(lambda lg: effarch_train.cross_entropy(lg, targets, mask)[0] / (b * t)), (logits,))

    # The optimiser on the whole tree: global-norm clipping, AdamW with the decay mask.
    optimizer = effarch_train.make_optimizer(train_config(batch))

    def update(prm, grads, state):
        updates, state = optimizer.update(grads, state, prm)
        return optax.apply_updates(prm, updates), state

    add("clip + AdamW update", 1, update, (params, params, optimizer.init(params)))
    return rows


def profile_selective_scan(pair: Pair, batch: dict[str, np.ndarray], repeats: int) -> list[dict]:
    """One Mamba mixer and its selective scan in each form, forward + backward, at the step's shapes."""
    spec = pair.config.layer_specs[0].mixer
    b, t = batch["tokens"].shape
    keys = iter(jax.random.split(jax.random.PRNGKey(2), 8))
    x, z = (jax.random.normal(next(keys), (b, t, spec.d_inner)) for _ in range(2))  # [B, T, D]
    dt = jax.random.normal(next(keys), (b, t, spec.d_inner)) - 2.0
    a = -jnp.exp(jax.random.normal(next(keys), (spec.d_inner, spec.d_state)))  # [D, N]
    bm, cm = (jax.random.normal(next(keys), (b, t, 1, spec.d_state)) for _ in range(2))  # [B, T, G, N]
    hidden = jax.random.normal(next(keys), (b, t, pair.config.d_model))
    rows = []
    add = functools.partial(_piece, rows, repeats=repeats)
    layers = pair.config.n_layers
    mixer = mixers.from_config(spec)
    add(f"mamba: Mamba mixer (one layer), T={t}", layers,
        *_fwd_bwd(lambda prm, xs: mixer.apply({"params": prm}, xs)[0], pair.variables["params"]["layer_0"]["mixer"],
                  hidden))
    for impl in ("chunked", "recurrent"):
        def scan(_, x, dt, a, bm, cm, z, impl=impl):
            return ops.selective_scan(x, dt, a, bm, cm, z=z, implementation=impl)[0]

        add(f"mamba: selective_scan {impl}{' (what auto trains with on CPU)' if impl == 'chunked' else ''}", layers,
            *_fwd_bwd(scan, {}, x, dt, a, bm, cm, z))
    return rows


def _hlo_table(hlo: str, name: str) -> dict[int, str]:
    """One of the id tables at the head of an HLO module's text (``FileNames``, ``StackFrames``, ...)."""
    match = re.search(rf"^{name}\n(.*?)\n\n", hlo, re.S | re.M)
    rows = match.group(1).splitlines() if match else []
    return {int(row.split(None, 1)[0]): row.split(None, 1)[1] for row in rows}


def thunk_sources(hlo: str) -> dict[str, tuple[str, str]]:
    """Each instruction of a compiled module -> (innermost effarch source line, op_name tail and shape)."""
    files = {i: v.strip('"') for i, v in _hlo_table(hlo, "FileNames").items()}
    locations = {}
    for i, v in _hlo_table(hlo, "FileLocations").items():
        fields = dict(re.findall(r"(\w+)=(\d+)", v))
        locations[i] = (files[int(fields["file_name_id"])], int(fields["line"]))
    frames = {}
    for i, v in _hlo_table(hlo, "StackFrames").items():
        fields = dict(re.findall(r"(\w+)=(\d+)", v))
        frames[i] = (int(fields["file_location_id"]), int(fields["parent_frame_id"]))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sources = {}
    for m in re.finditer(r"%([\w.\-]+) = ([a-z0-9]+\[[0-9,]*\])[^\n]*?metadata=\{([^}]*)\}", hlo):
        name, shape, metadata = m.groups()
        op = re.search(r'op_name="([^"]*)"', metadata)
        frame = re.search(r"stack_frame_id=(\d+)", metadata)
        op_name = op.group(1) if op else ""
        # No effarch line (e.g. flax's Dense): the op's path, one entry for every layer.
        where = "no effarch line: " + re.sub(r"layer_\d+", "layer_*", op_name.split(")/")[-1])
        frame_id = int(frame.group(1)) if frame else 0
        seen = set()
        while frame_id in frames and frame_id not in seen:  # innermost frame first
            seen.add(frame_id)
            location, frame_id = frames[frame_id]
            path, line = locations[location]
            if path.startswith(os.path.join(root, "effarch")):
                text = linecache.getline(path, line).strip()
                where = f"{os.path.relpath(path, root)}:{line}  {text[:70]}"
                break
        sources.setdefault(name, (where, f"{op_name.split('/')[-1]} {shape}"))
    return sources


def trace_step(side: EffarchSide, steps: int) -> list[dict]:
    """Where effarch's jitted step spends its time: a ``jax.profiler`` trace, thunks grouped by source line.

    Each XLA thunk (a fusion, a matmul, ...) is charged to the innermost
    effarch line in its stack; ``ms_per_step`` sums the thunks' durations (on
    both threads: the total can exceed the wall time). ``largest`` is the
    line's costliest thunk, as op name and shape.
    """

    with jax.set_mesh(side.mesh), nn.logical_axis_rules(effarch_train.LOGICAL_RULES):
        sources = thunk_sources(side.step.lower(side.state, side.batch).compile().as_text())
    side.train()
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(steps):
                side.train()
        (path,) = glob.glob(os.path.join(folder, "plugins", "profile", "*", "perfetto_trace.json.gz"))
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    by_thunk = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("name") in sources:
            by_thunk[event["name"]] += event["dur"] / 1e3 / steps  # microseconds -> ms per step
    by_line, largest = collections.Counter(), {}
    for thunk, ms in by_thunk.most_common():
        where, what = sources[thunk]
        by_line[where] += ms
        largest.setdefault(where, what)
    total = sum(by_line.values())
    return [{"source": where, "ms_per_step": ms, "share": ms / total, "largest": largest[where]}
            for where, ms in by_line.most_common()]


# ---------------------------------------------------------------- main


def working_tree() -> dict:
    """The commit when the run starts (others may commit during it) and the library's uncommitted changes."""

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = ["effarch", "pallas_kernels"]
    try:
        run = lambda *cmd: subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True,  # noqa: E731
                                          timeout=30, check=True).stdout
        head = run("rev-parse", "HEAD").strip()
        modified = sorted(line[3:] for line in run("status", "--porcelain", "--", *paths).splitlines())
        diff = run("diff", "HEAD", "--", *paths)
    except Exception:  # no git, not a checkout, timeout ...
        return {"head_at_start": None, "modified": None, "diff_sha256": None}
    return {"head_at_start": head, "modified": modified,
            "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if modified else None}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", default="results/peer_train.json", help="the JSON file written")
    parser.add_argument("--archs", default=",".join(ARCHS), help=f"comma list of {', '.join(ARCHS)}")
    parser.add_argument("--sizes", default=None, help="comma list of the preset's sizes; default: all")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per side (median kept)")
    parser.add_argument("--seq_len", type=int, default=None, help="T for every arch; default: the preset's")
    parser.add_argument("--profile", action="store_true",
                        help="also time the pieces of effarch's Mamba-2 step (and Mamba's scan) at the largest size")
    parser.add_argument("--trace", action="store_true",
                        help="also trace effarch's Mamba-2 step at the largest size, time charged to source lines")
    args = parser.parse_args(argv)
    p = dict(PRESETS[args.preset])
    if args.repeats is not None:
        p["repeats"] = args.repeats
    if args.seq_len is not None:
        p["seq_len"] = {arch: args.seq_len for arch in ARCHS}
    if args.sizes is not None:
        names = [s for s in args.sizes.split(",") if s]
        unknown = [s for s in names if s not in p["sizes"]]
        if unknown:
            parser.error(f"unknown sizes {unknown}; the {args.preset} preset has {', '.join(p['sizes'])}")
        p["sizes"] = {s: p["sizes"][s] for s in names}
    args.archs = [a for a in args.archs.split(",") if a]
    unknown = [a for a in args.archs if a not in ARCHS]
    if unknown:
        parser.error(f"unknown archs {unknown}; valid: {', '.join(ARCHS)}")
    if p["warmup"] + p["repeats"] < 2:
        parser.error("warmup + repeats must be at least 2: the parity check compares the loss after one update")
    args.preset_settings = p
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch_loaded = "torch" in sys.modules  # libgomp reads OMP_WAIT_POLICY when torch loads it
    if not torch_loaded:
        os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    import torch
    import transformers

    p = args.preset_settings
    threads = xla_cpu_threads()
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    tree = working_tree()  # before the run: what the imported modules were read from
    rows, profile, trace = [], [], []
    for arch in args.archs:
        for size, (d_model, n_layers) in p["sizes"].items():
            pair = build_pair(arch, size, d_model, n_layers, p)
            rows += measure(pair, make_batch(p, arch), p)
    size, (d_model, n_layers) = list(p["sizes"].items())[-1]
    if args.profile or args.trace:
        pair = build_pair("mamba2", size, d_model, n_layers, p)
    if args.profile:
        profile = profile_mamba2(pair, make_batch(p, "mamba2"), p["repeats"])
    if args.trace:
        trace = trace_step(EffarchSide(pair, make_batch(p, "mamba2")), steps=p["repeats"])
    if args.profile and "mamba" in args.archs:
        pair = build_pair("mamba", size, d_model, n_layers, p)
        profile += profile_selective_scan(pair, make_batch(p, "mamba"), p["repeats"])
    load_after = os.getloadavg()

    print()
    harness.print_table(rows, ["arch", "size", "mode", "params", "effarch_ms", "torch_ms", "effarch_tokens_per_s",
                               "torch_tokens_per_s", "ratio", "loss_rel_diff", "loss_after_update_rel_diff",
                               "prefill_logits_rel_rmse"])
    if profile:
        print()
        harness.print_table(profile, ["piece", "count", "ms_each", "step_ms", "gflops_each", "gbytes_each"])
    if trace:
        print()
        harness.print_table(trace[:TRACE_ROWS_PRINTED], ["source", "ms_per_step", "share", "largest"])
    print(f"\nthreads: XLA {threads}, torch {torch.get_num_threads()}; load average {load_before} -> {load_after}")

    settings = {k: v for k, v in p.items() if k != "sizes"}
    settings.update(sizes={k: {"d_model": d, "n_layers": n} for k, (d, n) in p["sizes"].items()},
                    lr=LR, weight_decay=WEIGHT_DECAY, betas=list(BETAS), eps=EPS, grad_clip=GRAD_CLIP, seed=SEED,
                    dtype="float32", xla_flags=os.environ.get("XLA_FLAGS"))
    harness.save_json(args.out, rows, preset=args.preset, settings=settings, profile=profile, trace=trace,
                      working_tree=tree,
                      threads={"xla": threads, "torch": torch.get_num_threads(),
                               "torch_interop": torch.get_num_interop_threads(),
                               "omp_wait_policy": ("unknown: torch was loaded before main()" if torch_loaded
                                                   else os.environ["OMP_WAIT_POLICY"] or "libgomp's default (unset)")},
                      versions={"jax": jax.__version__, "torch": torch.__version__,
                                "transformers": transformers.__version__},
                      load_average={"before": list(load_before), "after": list(load_after)})
    return {"rows": rows, "profile": profile, "trace": trace, "path": args.out}


if __name__ == "__main__":
    main()
