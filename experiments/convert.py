r"""Converting a trained attention LM into a recurrent one (LoLCATs / Mamba-in-the-Llama style).

    python experiments/convert.py --workdir runs/convert                  # cpu preset
    python experiments/convert.py --preset smoke --workdir /tmp/convert   # seconds
    python experiments/convert.py --targets gla,mamba2 --layers 0,1,2 --kl_weight 0
    python experiments/convert.py --teacher_workdir runs/my-attention-run # an existing effarch run

The teacher is an all-attention byte-level LM of the quick start's size
(``d_model`` 128, 4 layers, pattern ``"A"``, the embedded stdlib corpus),
trained once with ``effarch.train`` into ``WORKDIR/teacher`` (or read from
``--teacher_workdir`` with ``effarch.train.load_run``). For each target mixer
(``--targets``: linear_attention, gla, gated_deltanet, mamba2) the layers in
``--layers`` (default all) are replaced by the target, initialised from the
attention weights (``effarch.models.linearize``: q, k, v, o reused; feature
map, decay, gates, convolutions new), and then

1. ``transfer``: only the new parameters train, to reproduce each attention
   layer's output from the teacher's input to that layer (relative MSE);
2. ``finetune``: the whole model trains on the LM loss, plus ``--kl_weight``
   times the KL divergence from the teacher's next-byte distribution.

A ``scratch`` model of the same architecture trains from random
initialisation on the LM loss with as many tokens as transfer + finetune
together. Rows (one per (target, stage), ``results.jsonl``): held-out bits per
byte for ``teacher``, ``converted`` (before any training), ``transfer``,
``finetune`` and ``scratch``; the teacher's and the converted model's decode
ms/token (``benchmarks/inference.py``'s jitted greedy loop from a prefilled
cache) and cache bytes (``init_cache``). Parameters of each finished stage
are kept in ``WORKDIR/<target>/<stage>.msgpack``, so a killed run redoes only
unfinished stages. Writes ``convert.png``. See docs/results/convert.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

STAGES = ("converted", "transfer", "finetune", "scratch")
KEY_FIELDS = ("preset", "teacher", "target", "layers", "stage", "kl_weight")
BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of one preset.

    The teacher: ``n_layers`` attention layers of width ``d_model`` with
    ``num_heads`` heads and MLP width ``d_ff``, trained ``teacher_steps``
    updates of ``batch_size`` rows of ``seq_len`` bytes at peak ``teacher_lr``.
    Conversion: ``transfer_steps`` at ``transfer_lr`` (new parameters only),
    ``finetune_steps`` at ``finetune_lr``; the from-scratch model
    ``transfer_steps + finetune_steps`` at ``teacher_lr``. Every stage warms up
    over a tenth of its steps and decays (cosine) to a tenth of its peak.
    Bits per byte over ``eval_batches`` held-out batches; decode timed over
    ``decode_steps`` tokens after a ``decode_context``-byte prompt.
    """

    d_model: int
    n_layers: int
    num_heads: int
    d_ff: int
    seq_len: int
    batch_size: int
    teacher_steps: int
    teacher_lr: float
    transfer_steps: int
    transfer_lr: float
    finetune_steps: int
    finetune_lr: float
    kl_weight: float
    eval_batches: int
    corpus_bytes: int | None
    decode_context: int
    decode_steps: int
    decode_repeats: int
    chunk_size: int = 64
    dtype: str = "float32"


PRESETS = {
    # Seconds: every stage runs, rows and the plot appear.
    "smoke": Preset(d_model=32, n_layers=2, num_heads=4, d_ff=64, seq_len=32, batch_size=4, teacher_steps=4,
                    teacher_lr=3e-3, transfer_steps=2, transfer_lr=1e-2, finetune_steps=2, finetune_lr=1e-3,
                    kl_weight=1.0, eval_batches=1, corpus_bytes=300_000, decode_context=16, decode_steps=4,
                    decode_repeats=2, chunk_size=16),
    # The quick start's model size (docs/training.md) as an all-attention teacher; one CPU slot.
    "cpu": Preset(d_model=128, n_layers=4, num_heads=4, d_ff=384, seq_len=128, batch_size=16, teacher_steps=250,
                  teacher_lr=3e-3, transfer_steps=40, transfer_lr=1e-2, finetune_steps=120, finetune_lr=1e-3,
                  kl_weight=1.0, eval_batches=8, corpus_bytes=4_000_000, decode_context=256, decode_steps=32,
                  decode_repeats=5),
    # One GPU: a 12-layer, 768-wide teacher on the whole corpus (not yet run).
    "gpu": Preset(d_model=768, n_layers=12, num_heads=12, d_ff=2048, seq_len=1024, batch_size=32,
                  teacher_steps=3000, teacher_lr=1e-3, transfer_steps=300, transfer_lr=3e-3, finetune_steps=600,
                  finetune_lr=3e-4, kl_weight=1.0, eval_batches=16, corpus_bytes=None, decode_context=4096,
                  decode_steps=64, decode_repeats=5, chunk_size=128, dtype="bfloat16"),
}


def check_targets(targets: Sequence[str]) -> tuple[str, ...]:
    """``targets`` as a tuple; a ValueError naming them and the valid names if any is not a target."""
    from effarch.models.linearize import TARGETS  # pylint: disable=import-outside-toplevel

    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"--targets={','.join(targets)!r}; expected a comma-separated subset of {','.join(TARGETS)}.")
    return tuple(targets)


def teacher_config(preset: Preset):
    """The all-attention teacher's ``LMConfig`` (cache long enough for the decode measurement)."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from effarch.models import LMConfig  # pylint: disable=import-outside-toplevel

    return LMConfig(vocab_size=256, d_model=preset.d_model, n_layers=preset.n_layers, pattern="A",
                    d_ff=preset.d_ff, dtype=jnp.dtype(preset.dtype),
                    mixers={"A": ("attention", {"num_heads": preset.num_heads, "chunk_size": preset.chunk_size})},
                    max_len=preset.decode_context + preset.decode_steps + 2)


def stage_config(preset: Preset, steps: int, lr: float, weight_decay: float = 0.1):
    """The ``TrainConfig`` of one stage: its steps and peak lr, a tenth of them warmup."""
    from effarch.train import TrainConfig  # pylint: disable=import-outside-toplevel

    return TrainConfig(steps=steps, batch_size=preset.batch_size, seq_len=preset.seq_len, lr=lr,
                       warmup_steps=max(1, steps // 10), weight_decay=weight_decay,
                       max_corpus_bytes=preset.corpus_bytes, eval_every=0, eval_batches=preset.eval_batches,
                       log_every=max(1, steps // 5), ckpt_every=0)


def train_teacher(preset: Preset, workdir: pathlib.Path, splits, stream):
    """Trains (or resumes, or finds finished) the attention teacher in ``workdir`` with ``effarch.train``."""
    import logging  # pylint: disable=import-outside-toplevel

    from effarch import data, train  # pylint: disable=import-outside-toplevel
    from effarch.models import LM  # pylint: disable=import-outside-toplevel

    log = logging.getLogger("effarch")
    if not log.handlers:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("    %(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    config = dataclasses.replace(stage_config(preset, preset.teacher_steps, preset.teacher_lr),
                                 eval_every=preset.teacher_steps, ckpt_every=max(1, preset.teacher_steps // 5))
    model_config = teacher_config(preset)
    train_split, held_out = splits
    shape = dict(batch_size=preset.batch_size, seq_len=preset.seq_len, seed=0)
    trainer = train.Trainer.create(model=LM(config=model_config), model_config=model_config, config=config,
                                   train_data=data.PackedText(train_split, **shape),
                                   eval_data=data.PackedText(held_out, **shape, shuffle=False), workdir=workdir)
    if int(trainer.state.step) < config.steps:
        trainer.run()
    trainer.close()
    return train.load_run(workdir)


class Stages:
    """The jitted pieces every stage shares: evaluation, a training loop with a frozen mask, decoding cost."""

    def __init__(self, preset: Preset, splits, teacher, stream):
        import jax  # pylint: disable=import-outside-toplevel

        from effarch import data  # pylint: disable=import-outside-toplevel
        from effarch.models import LM  # pylint: disable=import-outside-toplevel

        self.preset, self.stream = preset, stream
        train_split, held_out = splits
        shape = dict(batch_size=preset.batch_size, seq_len=preset.seq_len, seed=0)
        self.train_data = data.PackedText(train_split, **shape)
        self.eval_data = data.PackedText(held_out, **shape, shuffle=False)
        self.teacher_config, self.teacher_params = teacher.model_config, teacher.params
        self.teacher = LM(config=self.teacher_config)
        self.jax = jax

    def batch(self, step: int):
        return {k: self.jax.numpy.asarray(v) for k, v in self.train_data.batch(step).items()}

    def bits_per_byte(self, config, params) -> float:
        from effarch.models import LM  # pylint: disable=import-outside-toplevel
        from effarch.train import make_eval_step  # pylint: disable=import-outside-toplevel

        step = self.jax.jit(make_eval_step(LM(config=config)))
        nll = count = 0.0
        for i in range(self.preset.eval_batches):
            batch = {k: self.jax.numpy.asarray(v) for k, v in self.eval_data.batch(i).items()}
            s, n = step(params, batch)
            nll, count = nll + float(s), count + float(n)
        return nll / max(count, 1.0) / math.log(2)

    def train(self, params, loss_fn, *, steps: int, lr: float, first_step: int, frozen=None, weight_decay=0.1,
              name: str = ""):
        """``steps`` AdamW updates of ``loss_fn(params, batch) -> (loss, metrics)``; ``frozen`` 1 where updates apply."""
        import optax  # pylint: disable=import-outside-toplevel

        from effarch.train import make_optimizer  # pylint: disable=import-outside-toplevel

        jax = self.jax
        optimizer = make_optimizer(stage_config(self.preset, steps, lr, weight_decay))
        # The step donates its input, so train on a copy; one committed placement, so one compilation.
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        params = jax.device_put(jax.tree.map(jax.numpy.copy, params), device)
        opt_state = jax.device_put(optimizer.init(params), device)

        def step_fn(params, opt_state, batch):
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            if frozen is not None:
                updates = jax.tree.map(lambda u, m: u * m, updates, frozen)
            return optax.apply_updates(params, updates), opt_state, loss, metrics

        step_fn = jax.jit(step_fn, donate_argnums=(0, 1))
        start, every = time.perf_counter(), max(1, steps // 5)
        for s in range(steps):
            params, opt_state, loss, metrics = step_fn(params, opt_state, self.batch(first_step + s))
            if (s + 1) % every == 0 or s + 1 == steps:
                extra = " ".join(f"{k} {float(v):.4f}" for k, v in metrics.items())
                took = time.perf_counter() - start
                eta = took / (s + 1) * (steps - s - 1)
                print(f"    {name} step {s + 1}/{steps}: loss {float(loss):.4f} {extra} "
                      f"({took:.0f} s, ETA {eta:.0f} s)", file=self.stream, flush=True)
        return params

    def decode_cost(self, config, params) -> dict[str, Any]:
        """Decode ms/token (benchmarks/inference.py's timed loop) and cache bytes for one sequence."""
        if str(BENCHMARKS) not in sys.path:
            sys.path.insert(0, str(BENCHMARKS))
        import inference  # pylint: disable=import-outside-toplevel

        from effarch.models import LM  # pylint: disable=import-outside-toplevel

        jax, jnp, p = self.jax, self.jax.numpy, self.preset
        lm = LM(config=config)
        max_len = p.decode_context + p.decode_steps + 1
        prompt = jnp.asarray(self.eval_data.batch(0)["tokens"][:1, :1]).repeat(p.decode_context, axis=1)
        variables = {"params": params}
        token, cache = jax.jit(inference.prefill_fn(lm, 1, max_len))(variables, prompt)
        decode = jax.jit(inference.decode_fn(lm, p.decode_steps), donate_argnums=(1,))
        ms, _, _ = inference.time_decode(decode, variables, cache, token, p.decode_repeats)
        cache_bytes = inference.tree_bytes(jax.eval_shape(lambda: lm.init_cache(1, max_len, config.dtype)))
        return {"decode_ms_per_token": ms / p.decode_steps, "cache_bytes": cache_bytes,
                "decode_context": p.decode_context, "decode_steps": p.decode_steps}


def lm_loss(model, teacher=None, teacher_params=None, kl_weight: float = 0.0):
    """``(params, batch) -> (CE + kl_weight * KL(teacher || model), metrics)``, per masked byte, in nats."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from effarch.train import cross_entropy  # pylint: disable=import-outside-toplevel

    def loss_fn(params, batch):
        logits, _, _ = model.apply({"params": params}, batch["tokens"], segment_ids=batch["segment_ids"])
        nll, count = cross_entropy(logits, batch["targets"], batch["loss_mask"])
        ce = nll / jnp.maximum(count, 1.0)
        if not kl_weight:
            return ce, {"ce": ce}
        t_logits, _, _ = teacher.apply({"params": teacher_params}, batch["tokens"], segment_ids=batch["segment_ids"])
        t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(t_logits), axis=-1)
        s_logp = jax.nn.log_softmax(logits, axis=-1)
        kl_tok = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)  # [B,T]
        kl = jnp.sum(kl_tok * batch["loss_mask"]) / jnp.maximum(count, 1.0)
        return ce + kl_weight * kl, {"ce": ce, "kl": kl}

    return loss_fn


def _save(path: pathlib.Path, params) -> None:
    from flax import serialization  # pylint: disable=import-outside-toplevel

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(serialization.to_bytes(params))
    tmp.replace(path)


def _load(path: pathlib.Path, template):
    from flax import serialization  # pylint: disable=import-outside-toplevel

    return serialization.from_bytes(template, path.read_bytes())


def run(preset_name: str = "cpu", workdir: str | pathlib.Path = "runs/convert", targets: Sequence[str] | None = None,
        layers: str = "all", kl_weight: float | None = None, teacher_workdir: str | None = None,
        stream=sys.stdout) -> list[dict]:
    """Runs (or resumes) the conversions; returns the rows of this configuration. See the module docstring."""
    if preset_name not in PRESETS:
        raise ValueError(f"--preset={preset_name!r}; expected one of {sorted(PRESETS)}.")
    preset = PRESETS[preset_name]
    from effarch.models.linearize import TARGETS, parse_layers  # pylint: disable=import-outside-toplevel

    targets = check_targets(targets or TARGETS)
    kl_weight = preset.kl_weight if kl_weight is None else kl_weight
    if not (isinstance(kl_weight, (int, float)) and math.isfinite(kl_weight) and kl_weight >= 0):
        raise ValueError(f"--kl_weight={kl_weight!r}; expected a number >= 0 (0: no distillation).")
    workdir = pathlib.Path(workdir)

    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel

    from effarch import data, train  # pylint: disable=import-outside-toplevel
    from effarch.models import LM  # pylint: disable=import-outside-toplevel
    from effarch.models import linearize  # pylint: disable=import-outside-toplevel
    from effarch.train import sweep  # pylint: disable=import-outside-toplevel

    if teacher_workdir is not None:
        teacher_dir, teacher_label = pathlib.Path(teacher_workdir), str(teacher_workdir)
        saved = train.load_run(teacher_dir)
        corpus_config = saved.train_config
        preset = dataclasses.replace(preset, seq_len=corpus_config.seq_len, batch_size=corpus_config.batch_size,
                                     corpus_bytes=corpus_config.max_corpus_bytes)
        corpus = data.load_corpus(list(corpus_config.data), max_bytes=corpus_config.max_corpus_bytes)
    else:
        teacher_dir, teacher_label, saved = workdir / "teacher", "trained", None
        corpus = data.load_corpus(max_bytes=preset.corpus_bytes)
    splits = data.split(corpus, eval_fraction=0.05)
    # Validate --layers against the teacher's depth before any training.
    n_layers = saved.model_config.n_layers if saved is not None else preset.n_layers
    layer_list = parse_layers(layers, n_layers)
    layers_label = "all" if layer_list is None else ",".join(map(str, layer_list))

    log = sweep.ResultsLog(workdir / "results.jsonl", KEY_FIELDS)
    base = {"preset": preset_name, "teacher": teacher_label}

    def key(target, stage):
        return {**base, "target": target, "layers": "-" if stage == "teacher" else layers_label, "stage": stage,
                "kl_weight": kl_weight if stage == "finetune" else None}

    jobs = [("attention", "teacher")] + [(t, s) for t in targets for s in STAGES]
    done = sum(log.has(key(t, s)) for t, s in jobs)
    progress = sweep.Progress(len(jobs), done=done, stream=stream)
    if done:
        print(f"{done} of {len(jobs)} rows already in {log.path}; skipping them", file=stream, flush=True)

    def record(target, stage, figures, started):
        row = {**key(target, stage), **figures, "wall_s": time.perf_counter() - started,
               "preset_sizes": dataclasses.asdict(preset), **sweep.provenance()}
        log.append(row)
        progress.finish(f"{target} {stage}", f"{figures['bits_per_byte']:.3f} bits/byte")

    started = time.perf_counter()
    if not log.has(key("attention", "teacher")):
        progress.start("attention teacher")
    if saved is None:
        saved = train_teacher(preset, teacher_dir, splits, stream)
    stages = Stages(preset, splits, saved, stream)
    tokens_per_step = preset.batch_size * preset.seq_len
    if not log.has(key("attention", "teacher")):
        record("attention", "teacher", {
            "bits_per_byte": stages.bits_per_byte(saved.model_config, saved.params),
            "params": train.count_params(saved.params), "steps": saved.step, "tokens": saved.step * tokens_per_step,
            "pattern": saved.model_config.layer_pattern, "config": saved.model_config.to_dict(),
            **stages.decode_cost(saved.model_config, saved.params)}, started)

    for target in targets:
        student_cfg = linearize.converted_config(saved.model_config, target, layer_list,
                                                 options={"chunk_size": preset.chunk_size})
        student = LM(config=student_cfg)
        params, new = linearize.convert_params(saved.model_config, saved.params, student_cfg, jax.random.key(1))
        converted = linearize.converted_layers(saved.model_config, student_cfg)
        common = {"pattern": student_cfg.layer_pattern, "params": train.count_params(params),
                  "new_params": int(sum(float(m.sum()) for m in jax.tree.leaves(new))),
                  "converted_layers": list(converted), "config": student_cfg.to_dict()}
        folder = workdir / target / layers_label.replace(",", "-")

        def stage_params(stage, make, template):
            path = folder / (f"{stage}-kl{kl_weight:g}.msgpack" if stage == "finetune" else f"{stage}.msgpack")
            if path.exists():
                return _load(path, template)
            out = make()
            _save(path, out)
            return out

        # Stage 0: converted, untrained.
        if not log.has(key(target, "converted")):
            progress.start(f"{target} converted")
            t0 = time.perf_counter()
            record(target, "converted", {**common, "steps": 0, "tokens": 0,
                                         "bits_per_byte": stages.bits_per_byte(student_cfg, params),
                                         **stages.decode_cost(student_cfg, params)}, t0)

        # Stage 1: attention transfer, new parameters only.
        def transfer():
            teacher_model, teacher_params = stages.teacher, saved.params

            def loss_fn(p, batch):
                captured = linearize.capture_mixers(teacher_model, teacher_params, batch["tokens"],
                                                    segment_ids=batch["segment_ids"], layers=converted)
                loss, per_layer = linearize.transfer_loss(student_cfg, p, captured, segment_ids=batch["segment_ids"])
                return loss, {f"layer_{i}": v for i, v in zip(converted, per_layer)}

            return stages.train(params, loss_fn, steps=preset.transfer_steps, lr=preset.transfer_lr, first_step=0,
                                frozen=new, weight_decay=0.0, name=f"{target} transfer")

        need_transfer = not log.has(key(target, "transfer")) or not log.has(key(target, "finetune"))
        if need_transfer:
            if not log.has(key(target, "transfer")):
                progress.start(f"{target} transfer")
            t0 = time.perf_counter()
            transferred = stage_params("transfer", transfer, params)
            if not log.has(key(target, "transfer")):
                record(target, "transfer", {**common, "steps": preset.transfer_steps,
                                            "tokens": preset.transfer_steps * tokens_per_step,
                                            "bits_per_byte": stages.bits_per_byte(student_cfg, transferred)}, t0)

        # Stage 2: fine-tune everything on the LM loss (+ KL to the teacher).
        if not log.has(key(target, "finetune")):
            progress.start(f"{target} finetune")
            t0 = time.perf_counter()
            tuned = stage_params("finetune", lambda: stages.train(
                transferred, lm_loss(student, stages.teacher, saved.params, kl_weight),
                steps=preset.finetune_steps, lr=preset.finetune_lr, first_step=preset.transfer_steps,
                name=f"{target} finetune"), params)
            steps = preset.transfer_steps + preset.finetune_steps
            record(target, "finetune", {**common, "steps": steps, "tokens": steps * tokens_per_step,
                                        "bits_per_byte": stages.bits_per_byte(student_cfg, tuned)}, t0)

        # The same architecture from scratch, with the conversion's token budget.
        if not log.has(key(target, "scratch")):
            progress.start(f"{target} scratch")
            t0 = time.perf_counter()
            steps = preset.transfer_steps + preset.finetune_steps
            init = jax.jit(lambda k: student.init(k, jax.numpy.zeros((1, 8), jax.numpy.int32))["params"])
            fresh = nn.unbox(init(jax.random.key(2)))
            scratch = stage_params("scratch", lambda: stages.train(
                fresh, lm_loss(student), steps=steps, lr=preset.teacher_lr, first_step=0,
                name=f"{target} scratch"), fresh)
            record(target, "scratch", {**common, "new_params": common["params"], "steps": steps,
                                       "tokens": steps * tokens_per_step,
                                       "bits_per_byte": stages.bits_per_byte(student_cfg, scratch)}, t0)
        plot(log.rows(), workdir)
    plot(log.rows(), workdir)
    wanted = {json.dumps(key(t, s), sort_keys=True) for t, s in jobs}
    return [r for r in log.rows() if json.dumps({f: r.get(f) for f in KEY_FIELDS}, sort_keys=True) in wanted]


def plot(rows: list[dict[str, Any]], workdir: pathlib.Path) -> pathlib.Path | None:
    """``convert.png``: bits/byte per target and stage beside the teacher; decode cost against cache bytes."""
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    teacher = [r for r in rows if r["stage"] == "teacher"]
    others = [r for r in rows if r["stage"] != "teacher"]
    if not teacher:
        return None
    models = list(dict.fromkeys((r["target"], r["layers"]) for r in others))  # [(target, layers)]

    def name(target, layers):
        return target if layers == "all" else f"{target}\nlayers {layers}"

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(max(12, 2.2 * len(models) + 4), 4.5))
    width = 0.8 / len(STAGES)
    for j, stage in enumerate(STAGES):
        values = [next((r["bits_per_byte"] for r in others if (r["target"], r["layers"]) == m
                        and r["stage"] == stage), float("nan")) for m in models]
        bars = ax.bar([i + (j - 1.5) * width for i in range(len(models))], values, width, label=stage)
        for bar, v in zip(bars, values):
            if math.isfinite(v):
                ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=7)
    ax.axhline(teacher[-1]["bits_per_byte"], color="k", linestyle="--",
               label=f"attention teacher ({teacher[-1]['bits_per_byte']:.2f})")
    ax.set_xticks(range(len(models)), [name(*m) for m in models], fontsize=8)
    top = max([r["bits_per_byte"] for r in rows if math.isfinite(r["bits_per_byte"])])
    ax.set_ylim(0, top * 1.3)  # room for the legend above the bars
    ax.set_ylabel("held-out bits/byte (lower is better)")
    ax.set_xlabel("target mixer of the converted layers")
    ax.set_title("Attention -> recurrent conversion")
    ax.legend(fontsize=7, ncol=3, loc="upper center")
    ax.grid(alpha=0.3, axis="y")
    points = teacher[-1:] + [r for r in others if r["stage"] == "converted"]
    for r in points:
        label = "attention teacher" if r["stage"] == "teacher" else name(r["target"], r["layers"]).replace("\n", ", ")
        bx.plot(r["cache_bytes"], r["decode_ms_per_token"], "o", label=label)
    bx.set_xscale("log")
    bx.set_xlabel(f"decode cache bytes per sequence (context {teacher[-1]['decode_context']})")
    bx.set_ylabel("decode ms/token (batch 1)")
    bx.set_title("Decoding cost")
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    path = workdir / "convert.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per target with every stage's bits/byte, and the decode cost."""
    teacher = [r for r in rows if r["stage"] == "teacher"]
    lines = ["| model | layers | converted | transfer | finetune (KL weight) | scratch | tokens (conversion) "
             "| decode ms/token | cache bytes |", "|---|---|---|---|---|---|---|---|---|"]
    for r in teacher[-1:]:
        lines.append(f"| attention teacher `{r['pattern']}` | - | - | - | {r['bits_per_byte']:.3f} | - "
                     f"| {r['tokens']:,} (training) | {r['decode_ms_per_token']:.2f} | {r['cache_bytes']:,} |")
    for target in dict.fromkeys(r["target"] for r in rows if r["stage"] != "teacher"):
        for layers in dict.fromkeys(r["layers"] for r in rows if r["target"] == target):
            sel = {r["stage"]: r for r in rows if r["target"] == target and r["layers"] == layers}
            cells = [f"{sel[s]['bits_per_byte']:.3f}" if s in sel else "-" for s in ("converted", "transfer")]
            ft = [r for r in rows if r["target"] == target and r["layers"] == layers and r["stage"] == "finetune"]
            cells.append(", ".join(f"{r['bits_per_byte']:.3f} ({r['kl_weight']:g})" for r in ft) or "-")
            cells.append(f"{sel['scratch']['bits_per_byte']:.3f}" if "scratch" in sel else "-")
            tokens = f"{sel['scratch']['tokens']:,}" if "scratch" in sel else "-"
            conv = sel.get("converted")
            pattern = f" `{conv['pattern']}`" if conv else ""
            cost = (f"{conv['decode_ms_per_token']:.2f} | {conv['cache_bytes']:,}" if conv else "- | -")
            lines.append(f"| {target}{pattern} | {layers} | " + " | ".join(cells) + f" | {tokens} | {cost} |")
    return "\n".join(lines)


def main(argv):
    del argv
    from absl import flags, logging  # pylint: disable=import-outside-toplevel

    logging.set_verbosity(logging.WARNING)  # orbax's bookkeeping stays quiet

    f = flags.FLAGS
    workdir = f.workdir or f"runs/convert-{f.preset}"
    if f.table:
        from effarch.train.sweep import ResultsLog  # pylint: disable=import-outside-toplevel

        print(table(ResultsLog(pathlib.Path(workdir) / "results.jsonl", KEY_FIELDS).rows()))
        return
    try:
        run(f.preset, workdir, f.targets, f.layers, f.kl_weight, f.teacher_workdir)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"convert.py: {err}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_enum("preset", "cpu", sorted(PRESETS), "Sizes: smoke (seconds), cpu (one CPU slot), gpu.")
    flags.DEFINE_string("workdir", None, "Folder of every output (default runs/convert-<preset>).")
    flags.DEFINE_list("targets", None, "Target mixers, of linear_attention,gla,gated_deltanet,mamba2 (default all).")
    flags.DEFINE_string("layers", "all", "Layers to convert: 'all' or indices such as 0,1,2 (the rest stay attention).")
    flags.DEFINE_float("kl_weight", None, "Weight of KL(teacher || student) in fine-tuning (default: the preset's; 0: none).")
    flags.DEFINE_string("teacher_workdir", None, "Use this effarch training run as the teacher instead of training one.")
    flags.DEFINE_bool("table", False, "Print the markdown table of --workdir's results and exit.")
    app.run(main)
