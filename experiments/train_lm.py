r"""Trains a byte-level hybrid LM on Python's standard library (or your text).

    python experiments/train_lm.py --workdir runs/cpu-small             # CPU, minutes
    python experiments/train_lm.py --preset gpu-base --workdir runs/gpu-base
    python experiments/train_lm.py --data my_texts/ --model d_model=192 --model pattern=MMA
    python experiments/train_lm.py --init_from path/to/hf_checkpoint --data my_texts/ --save_hf out/  # fine-tune

Rerunning the same command resumes from the newest checkpoint in --workdir
and reaches the same losses as an uninterrupted run; a workdir holding a run
with another configuration is refused. Writes, in --workdir: config.json,
metrics.jsonl (timestamped), checkpoints/, tb/ (TensorBoard, if tensorboardX is
installed), results.json (headline numbers with device, versions, commit,
command and date) and loss.png (if matplotlib is installed). Rerunning a
finished run says so and leaves its results as they are; a run that fails
before its first step leaves no workdir behind. See docs/training.md.

--init_from starts from a Hugging Face checkpoint folder (read by
``effarch.convert.from_hf``) or another run's --workdir (its newest
checkpoint): the model is that checkpoint's, --model may change only how it
runs (dtype, remat, ...), and --preset gives the training defaults. A model
whose vocabulary is not bytes trains on the text tokenised by --tokenizer (a
folder with a saved Hugging Face tokenizer; default: the --init_from folder, or
the tokenizer a run saved in <workdir>/tokenizer), and its "bpb" figures are
then bits per token. --save_hf writes the trained
model back as a Hugging Face checkpoint when the run finishes.

Multi-host: start one process per host with --coordinator_address host:port
--num_processes N --process_id i (or --distributed on a managed cluster);
every process computes the same global batch and feeds its own devices.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging as py_logging
import pathlib
import statistics
import sys
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS

flags.DEFINE_enum("preset", "cpu-small", ["tiny", "cpu-small", "gpu-base"], "Model preset and its training defaults.")
flags.DEFINE_string("workdir", None, "Run folder (default runs/<preset>); rerun to resume.")
flags.DEFINE_integer("steps", None, "Optimiser updates (default: the preset's).")
flags.DEFINE_integer("batch_size", None, "Global batch size in rows.")
flags.DEFINE_integer("seq_len", None, "Tokens (bytes) per row.")
flags.DEFINE_integer("grad_accum", None, "Microbatches per update.")
flags.DEFINE_float("lr", None, "Peak learning rate.")
flags.DEFINE_integer("warmup_steps", None, "Linear warmup steps.")
flags.DEFINE_float("weight_decay", None, "AdamW weight decay.")
flags.DEFINE_list("data", ["stdlib"], "'stdlib' (Python's own sources) or files/folders, comma separated.")
flags.DEFINE_integer("max_corpus_bytes", None, "Cap on corpus bytes read (default: the preset's; 0 = all).")
flags.DEFINE_string("mesh", "data=-1,fsdp=1,tensor=1", "Device mesh sizes; -1 = the remaining devices.")
flags.DEFINE_integer("log_every", None, "Metrics line every N steps.")
flags.DEFINE_integer("eval_every", None, "Held-out evaluation every N steps (0: at the end only).")
flags.DEFINE_integer("eval_batches", None, "Batches per evaluation (0: none).")
flags.DEFINE_integer("ckpt_every", None, "Checkpoint every N steps (0: at the end only).")
flags.DEFINE_integer("seed", 0, "Seed of parameters, data order and randomness.")
flags.DEFINE_multi_string("model", [], "LMConfig override key=value (Python literal or dtype name), repeatable.")
flags.DEFINE_string("init_from", None, "Start from a Hugging Face checkpoint folder or another run's --workdir.")
flags.DEFINE_string("tokenizer", None, "Folder of a saved Hugging Face tokenizer (default: --init_from's) for a "
                    "model whose vocabulary is not bytes.")
flags.DEFINE_string("save_hf", None, "When the run finishes, write the model to this new folder as a Hugging "
                    "Face checkpoint (effarch.convert.to_hf).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (cluster auto-detection).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")

# Training defaults per preset; flags override them.
TRAIN_DEFAULTS = {
    "tiny": dict(steps=40, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5, max_corpus_bytes=300_000,
                 log_every=5, eval_every=20, eval_batches=2, ckpt_every=20),
    "cpu-small": dict(steps=250, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=25,
                      max_corpus_bytes=4_000_000, log_every=10, eval_every=50, eval_batches=8, ckpt_every=50),
    "gpu-base": dict(steps=3000, batch_size=32, seq_len=1024, lr=1e-3, warmup_steps=300, max_corpus_bytes=None,
                     log_every=50, eval_every=500, eval_batches=16, ckpt_every=500),
}


def parse_overrides(items: list[str]) -> dict:
    """``["d_model=192", "dtype=bfloat16"]`` -> ``{"d_model": 192, "dtype": jnp.bfloat16}``."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model {item!r}; expected key=value, e.g. --model d_model=192.")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if key in ("dtype", "param_dtype"):
            value = jnp.dtype(value)
        out[key.strip()] = value
    from effarch.models import LMConfig  # pylint: disable=import-outside-toplevel

    fields = sorted(f.name for f in dataclasses.fields(LMConfig))
    for key in out:
        if key not in fields:
            raise ValueError(f"--model {key}=...: LMConfig has no field {key!r}; valid fields: {', '.join(fields)}.")
    return out


# Where a run that tokenised its text keeps the tokenizer, for --init_from and sample.py.
TOKENIZER_DIR = "tokenizer"


def initial_model(overrides: dict):
    """``(LMConfig, params or None, Hugging Face config.json or None)``: --init_from's model, or the preset's."""
    from effarch.models import LMConfig  # pylint: disable=import-outside-toplevel

    if FLAGS.init_from is None:
        return LMConfig.preset(FLAGS.preset, **overrides), None, None
    source = pathlib.Path(FLAGS.init_from)
    config_path = source / "config.json"
    if not config_path.is_file():
        raise ValueError(f"--init_from={FLAGS.init_from}: no config.json there; expected a Hugging Face checkpoint "
                         "folder (config.json + model.safetensors) or the --workdir of a train_lm.py run.")
    saved = json.loads(config_path.read_text())
    if "model" in saved and "train" in saved:  # an effarch run
        from effarch.train import load_run  # pylint: disable=import-outside-toplevel

        run = load_run(source)
        return dataclasses.replace(run.model_config, **overrides), run.params, None
    from effarch.convert import from_hf  # pylint: disable=import-outside-toplevel

    config, variables = from_hf(source, **overrides)
    return config, variables["params"], saved


def token_data(corpus_parts, vocab_size: int):
    """``(corpora, tokenizer or None)``: the byte corpora as they are, or tokenised for a model whose
    vocabulary is not bytes."""
    from effarch import data  # pylint: disable=import-outside-toplevel

    if vocab_size == data.VOCAB_SIZE:
        return corpus_parts, None
    folder = FLAGS.tokenizer
    if folder is None and FLAGS.init_from is not None:  # a run keeps its tokenizer in <workdir>/tokenizer
        saved = pathlib.Path(FLAGS.init_from) / TOKENIZER_DIR
        folder = str(saved) if saved.is_dir() else FLAGS.init_from
    if folder is None:
        raise ValueError(f"the model's vocab_size={vocab_size} is not bytes ({data.VOCAB_SIZE}); give --tokenizer "
                         "(a folder with a saved Hugging Face tokenizer) to tokenise --data.")
    try:
        from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise ValueError("tokenising --data for a model whose vocabulary is not bytes needs transformers "
                         "(pip install transformers).") from err
    if not any((pathlib.Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json",
                                                                     "tokenizer.model", "vocab.json")):
        raise ValueError(f"--tokenizer {folder}: no saved tokenizer there (tokenizer.json, tokenizer_config.json, "
                         "...); save the checkpoint's tokenizer with tokenizer.save_pretrained, or pass --tokenizer.")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if separator is None:
        raise ValueError(f"--tokenizer {folder}: the tokenizer has no eos or bos token to separate documents.")
    if len(tokenizer) > vocab_size:
        raise ValueError(f"--tokenizer {folder} has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{vocab_size}; use the checkpoint's own tokenizer.")

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    return [data.tokenize(part, encode, separator) for part in corpus_parts], tokenizer


def train_config(preset: str):
    """The TrainConfig of ``preset`` with every flag that was given applied."""
    from effarch.train import TrainConfig, parse_mesh  # pylint: disable=import-outside-toplevel

    fields = dict(TRAIN_DEFAULTS[preset])
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "lr", "warmup_steps", "weight_decay",
                 "log_every", "eval_every", "eval_batches", "ckpt_every"):
        if FLAGS[name].value is not None:
            fields[name] = FLAGS[name].value
    if FLAGS.max_corpus_bytes is not None:
        fields["max_corpus_bytes"] = FLAGS.max_corpus_bytes or None
    return TrainConfig(**fields, seed=FLAGS.seed, data=tuple(FLAGS.data), mesh=parse_mesh(FLAGS.mesh))


def summarize(records: list[dict], num_params: int, config, workdir: pathlib.Path, wall_s: float) -> dict:
    """The run's headline numbers from its metrics records."""
    from effarch.train import bits_per_byte  # pylint: disable=import-outside-toplevel

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    # The first line's throughput includes compilation; leave it out.
    speeds = [r["tokens_per_s"] for r in train[1:]] or [r["tokens_per_s"] for r in train]
    return {
        "params": num_params,
        "steps": config.steps,
        "tokens": config.steps * config.batch_size * config.seq_len,
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "first_loss": train[0]["loss"] if train else None,
        "first_bpb": bits_per_byte(train[0]["loss"]) if train else None,
        "last_loss": train[-1]["loss"] if train else None,
        "last_bpb": bits_per_byte(train[-1]["loss"]) if train else None,
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "eval_bpb": evals[-1]["eval_bpb"] if evals else None,
        "wall_s_this_process": wall_s,
        "metrics": str(workdir / "metrics.jsonl"),
        "checkpoints": str(workdir / "checkpoints"),
    }


def plot(records: list[dict], path: pathlib.Path) -> bool:
    """Loss curves (train and held-out, in bits per byte) to ``path``; False without matplotlib."""
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    except ImportError:
        return False
    from effarch.train import bits_per_byte  # pylint: disable=import-outside-toplevel

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train], [bits_per_byte(r["loss"]) for r in train], label="train")
    ax.plot([r["step"] for r in evals], [r["eval_bpb"] for r in evals], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    # Our progress lines at INFO; orbax's bookkeeping (absl INFO) stays quiet.
    logging.set_verbosity(logging.WARNING)
    handler = py_logging.StreamHandler(sys.stdout)
    handler.setFormatter(py_logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    effarch_log = py_logging.getLogger("effarch")
    effarch_log.setLevel(py_logging.INFO)
    effarch_log.addHandler(handler)
    effarch_log.propagate = False

    import jax  # pylint: disable=import-outside-toplevel

    if FLAGS.coordinator_address or FLAGS.distributed:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)

    from effarch import data, train  # pylint: disable=import-outside-toplevel
    from effarch.train import sweep  # pylint: disable=import-outside-toplevel
    from effarch.models import LM  # pylint: disable=import-outside-toplevel

    start = time.perf_counter()
    try:
        model_config, init_params, hf_config = initial_model(parse_overrides(FLAGS.model))
        config = train_config(FLAGS.preset)
        save_to = None if FLAGS.save_hf is None else pathlib.Path(FLAGS.save_hf)
        if save_to is not None and save_to.exists() and (not save_to.is_dir() or any(save_to.iterdir())):
            raise ValueError(f"--save_hf={FLAGS.save_hf} exists and is not an empty folder; choose a new folder.")
        workdir = pathlib.Path(FLAGS.workdir or f"runs/{FLAGS.preset}")
        corpus = data.load_corpus(list(config.data), max_bytes=config.max_corpus_bytes)
        (train_split, held_out), tokenizer = token_data(data.split(corpus, config.eval_fraction),
                                                        model_config.vocab_size)
        shape = dict(batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed,
                     vocab_size=model_config.vocab_size)
        trainer = train.Trainer.create(
            model=LM(config=model_config), model_config=model_config, config=config,
            train_data=data.PackedText(train_split, **shape),
            eval_data=data.PackedText(held_out, **shape, shuffle=False), workdir=workdir, init_params=init_params,
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        sys.exit(f"train_lm.py: {error}")
    is_main = jax.process_index() == 0
    if is_main:
        unit = "bytes" if tokenizer is None else f"tokens (tokenizer {tokenizer.name_or_path})"
        if tokenizer is not None and not (workdir / TOKENIZER_DIR).exists():
            tokenizer.save_pretrained(workdir / TOKENIZER_DIR)
        source = "" if FLAGS.init_from is None else f" from {FLAGS.init_from}"
        print(f"{FLAGS.preset}{source}: {trainer.num_params:,} params, pattern {model_config.layer_pattern}; "
              f"corpus {len(train_split.data):,} train / {len(held_out.data):,} held-out {unit}; "
              f"{jax.device_count()} {jax.devices()[0].platform} devices, mesh {dict(trainer.mesh.shape)}",
              flush=True)
    results_path = workdir / "results.json"
    if int(trainer.state.step) >= config.steps and results_path.exists():
        trainer.close()
        if is_main:
            print(f"{workdir} already holds a finished run ({config.steps} steps); its results stay in "
                  f"{results_path}. Raise --steps to train on, or give a new --workdir.", flush=True)
            if save_to is not None:
                save_hf(model_config, trainer.state.params, save_to, hf_config, workdir, tokenizer)
        return
    records = trainer.run()
    trainer.close()
    if not is_main:
        return
    summary = summarize(records, trainer.num_params, config, workdir, time.perf_counter() - start)
    summary["preset"] = FLAGS.preset
    summary["init_from"] = FLAGS.init_from
    summary.update(sweep.provenance())
    results_path.write_text(json.dumps(summary, indent=2) + "\n")
    plotted = plot(records, workdir / "loss.png")
    held_out_text = "no evaluation" if summary["eval_bpb"] is None else f"held-out {summary['eval_bpb']:.3f} bits/byte"
    print(
        f"\n{FLAGS.preset}: {summary['params']:,} params, {summary['tokens']:,} tokens "
        f"at {summary['tokens_per_s'] or 0:,.0f} tokens/s ({summary['device']})\n"
        f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} nats/byte "
        f"({summary['first_bpb']:.2f} -> {summary['last_bpb']:.2f} bits/byte); {held_out_text}\n"
        f"metrics {summary['metrics']}, checkpoints {summary['checkpoints']}, "
        f"results {workdir / 'results.json'}" + (f", plot {workdir / 'loss.png'}" if plotted else ""),
        flush=True,
    )
    if save_to is not None:
        save_hf(model_config, trainer.state.params, save_to, hf_config, workdir, tokenizer)


def save_hf(model_config, params, path: pathlib.Path, hf_config, workdir: pathlib.Path, tokenizer) -> None:
    """--save_hf: the trained model as a Hugging Face checkpoint folder (with its tokenizer, if any)."""
    import jax  # pylint: disable=import-outside-toplevel

    from effarch.convert import to_hf  # pylint: disable=import-outside-toplevel

    try:
        to_hf(model_config, {"params": jax.device_get(params)}, path, base_config=hf_config)
    except ValueError as error:
        sys.exit(f"train_lm.py: --save_hf: {error} (the trained run stays in {workdir}).")
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    print(f"saved the model as a Hugging Face checkpoint in {path}", flush=True)


if __name__ == "__main__":
    app.run(main)
