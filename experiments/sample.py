r"""Samples text from a run of experiments/train_lm.py, or from converted Hugging Face weights.

    python experiments/sample.py --workdir runs/cpu-small --prompt "def main(" --max_new_tokens 200
    python experiments/sample.py --workdir runs/cpu-small --step 200 --greedy
    python experiments/sample.py --workdir runs/cpu-small --temperature 0.8 --top_p 0.95 --num_samples 4
    python experiments/sample.py --hf path/to/converted_model --prompt "The"
    python experiments/sample.py --workdir runs/cpu-small-exits --exit_threshold 0.9   # early exit

Loads the newest checkpoint of --workdir (or the one of --step) with
``effarch.train.load_run``, continues the prompt with
``effarch.models.generate``, prints every sample, then the speed: prefill
(the whole prompt in one call) and decode (one new token per step) in tokens/s,
timed as the fastest of --repeats calls after a first call that compiles them.

Tokens are bytes, as in train_lm.py: the corpus is each document's UTF-8 bytes
after the separator byte 0, so the prompt is encoded as 0 followed by its bytes
(the start of a document), and the printed text stops where the model emits 0
(the end of its document). With --hf, a model whose vocabulary is not bytes
uses the Hugging Face tokenizer saved beside the weights (needs transformers).

With --exit_threshold, a model trained with early exits (``LMConfig.early_exit``)
generates with ``effarch.models.early_exit.generate``: each new token leaves at
the first exit whose confidence (--exit_measure) passes the threshold, and the
layers used per token are printed after the samples.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import sys
import time
from collections.abc import Callable
from typing import NamedTuple, TextIO

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from effarch.data import SEPARATOR, VOCAB_SIZE
from effarch.models import LM, LMConfig, early_exit, generate
from effarch.train import count_params, load_run

FLAGS = flags.FLAGS
END_MARK = "[end of document]"
# Files of a saved Hugging Face tokenizer; --hf needs one of them for a vocabulary that is not bytes.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleOptions:
    """What to load and how to sample; one field per flag, checked when built.

    Attributes:
      workdir: a train_lm.py run folder (exactly one of ``workdir`` and ``hf``).
      hf: a folder of converted Hugging Face weights, read by ``effarch.convert.from_hf``.
      step: the checkpoint of ``workdir`` to load; None: the newest.
      prompt: the text to continue ("" starts a new document).
      max_new_tokens: tokens to generate after the prompt.
      temperature: divides the logits before sampling (> 0).
      top_k: keep the k most likely tokens (None: all).
      top_p: nucleus sampling: keep the most likely tokens up to this probability mass.
      greedy: always take the most likely token (temperature, top_k and top_p are then unused).
      seed: seed of the sampling key.
      num_samples: continuations drawn at once (the batch).
      repeats: timed calls after the compiling one; the fastest is reported.
      exit_threshold: early exit: a token leaves at the first exit whose confidence is above this
        (None: the full model; the model must have early exits).
      exit_measure: the confidence of ``exit_threshold`` (effarch.models.early_exit.CONFIDENCE_MEASURES).
    """

    workdir: str | None = None
    hf: str | None = None
    step: int | None = None
    prompt: str = ""
    max_new_tokens: int = 200
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False
    seed: int = 0
    num_samples: int = 1
    repeats: int = 5
    exit_threshold: float | None = None
    exit_measure: str = "max_prob"

    def __post_init__(self):
        if (self.workdir is None) == (self.hf is None):
            raise ValueError(f"--workdir={self.workdir!r}, --hf={self.hf!r}; give exactly one of them "
                             "(--workdir runs/cpu-small for a train_lm.py run, --hf PATH for converted weights).")
        if self.hf is not None and self.step is not None:
            raise ValueError(f"--step={self.step} with --hf; --step picks a checkpoint of --workdir only.")
        for name, least in (("max_new_tokens", 1), ("num_samples", 1), ("repeats", 1), ("seed", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < least:
                raise ValueError(f"--{name}={value!r}; expected an int >= {least}.")
        if self.step is not None and (not isinstance(self.step, int) or self.step < 0):
            raise ValueError(f"--step={self.step!r}; expected a saved step (an int >= 0), or none for the newest.")
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"--temperature={self.temperature!r}; expected a float > 0 (or --greedy).")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"--top_k={self.top_k!r}; expected an int >= 1 (or none for every token).")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top_p={self.top_p!r}; expected a float in (0, 1], e.g. --top_p=0.95.")
        if self.exit_threshold is not None and not -1.0 <= self.exit_threshold <= 1.0:
            raise ValueError(f"--exit_threshold={self.exit_threshold!r}; expected a float in [-1, 1] "
                             "(1.0 never exits early), e.g. --exit_threshold=0.9.")
        if self.exit_measure not in early_exit.CONFIDENCE_MEASURES:
            raise ValueError(f"--exit_measure={self.exit_measure!r}; expected one of "
                             f"{', '.join(early_exit.CONFIDENCE_MEASURES)}.")


class Codec(NamedTuple):
    """Text to token ids and back.

    Attributes:
      encode: the prompt's token ids (at least one).
      decode: the text of generated ids.
      end: the id that ends a document (the printed text stops there), or None.
    """

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    end: int | None


def byte_codec() -> Codec:
    """train_lm.py's encoding: a document is the separator byte, then its UTF-8 bytes."""
    return Codec(encode=lambda text: [SEPARATOR, *text.encode("utf-8")],
                 decode=lambda ids: bytes(ids).decode("utf-8", errors="replace"), end=SEPARATOR)


def hf_codec(path: str, vocab_size: int) -> Codec:
    """The Hugging Face tokenizer saved in ``path``, for a model whose vocabulary is not bytes."""
    if not any((pathlib.Path(path) / name).is_file() for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer from the model type alone.
        raise ValueError(f"--hf {path}: vocab_size={vocab_size} is not bytes and the folder holds none of "
                         f"{', '.join(TOKENIZER_FILES)}; save the model's tokenizer there (tokenizer.save_pretrained).")
    try:
        from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise ValueError(f"--hf {path}: vocab_size={vocab_size} is not bytes, and reading its tokenizer needs "
                         "transformers (pip install transformers).") from err
    tokenizer = AutoTokenizer.from_pretrained(path)

    def encode(text: str) -> list[int]:
        ids = tokenizer(text)["input_ids"]
        return ids or ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [])

    return Codec(encode=encode, decode=tokenizer.decode, end=tokenizer.eos_token_id)


class Loaded(NamedTuple):
    """A model ready to sample: its config, variables, codec and a line saying where it came from."""

    config: LMConfig
    variables: dict
    codec: Codec
    source: str


def load(options: SampleOptions) -> Loaded:
    """The model of ``options.workdir`` (through ``effarch.train.load_run``) or of ``options.hf``."""
    if options.hf is not None:
        from effarch.convert import from_hf  # pylint: disable=import-outside-toplevel

        config, variables = from_hf(options.hf)
        codec = byte_codec() if config.vocab_size == VOCAB_SIZE else hf_codec(options.hf, config.vocab_size)
        source = f"{options.hf} (converted Hugging Face weights)"
    else:
        config, _, params, step = load_run(options.workdir, step=options.step)
        variables = {"params": params}
        # A run of a subword model (train_lm.py --init_from) keeps its tokenizer in <workdir>/tokenizer.
        tokenizer_dir = str(pathlib.Path(options.workdir) / "tokenizer")
        codec = byte_codec() if config.vocab_size == VOCAB_SIZE else hf_codec(tokenizer_dir, config.vocab_size)
        source = f"{options.workdir} at step {step}"
    source += f": {count_params(variables):,} params, pattern {config.layer_pattern}, max_len {config.max_len}"
    return Loaded(config=config, variables=variables, codec=codec, source=source)


def check_prompt(options: SampleOptions, prompt_ids: list[int], config: LMConfig) -> None:
    """The prompt and the new tokens must fit in the model's ``max_len``; the ids and top_k in its vocabulary."""
    prompt_tokens = len(prompt_ids)
    if not prompt_tokens:
        raise ValueError(f"--prompt={options.prompt!r} encodes to no tokens and the tokenizer has no "
                         "beginning-of-sequence token; give a non-empty --prompt.")
    new, longest = options.max_new_tokens, config.max_len
    if prompt_tokens + new > longest:
        fix = (f"e.g. --max_new_tokens={longest - prompt_tokens}" if prompt_tokens < longest
               else f"the prompt alone is {prompt_tokens} >= {longest} tokens: shorten it")
        raise ValueError(
            f"--prompt is {prompt_tokens} tokens (as encoded, with the start-of-document token) and "
            f"--max_new_tokens={new}: {prompt_tokens + new} in all, more than the model's max_len={longest}; "
            f"the two must sum to at most {longest} ({fix})."
        )
    if max(prompt_ids) >= config.vocab_size:
        raise ValueError(f"--prompt encodes to token ids up to {max(prompt_ids)}, outside the model's "
                         f"vocab_size={config.vocab_size}; the tokenizer does not match the model.")
    if options.top_k is not None and options.top_k > config.vocab_size:
        raise ValueError(f"--top_k={options.top_k}; expected at most the model's vocab_size={config.vocab_size}.")


def timed(fn: Callable, repeats: int) -> tuple[object, float, float]:
    """``(fn's result, seconds of the first call (compiling), fastest of repeats more)``.

    The fastest call, not the median: on a shared machine the others carry other processes' time.
    """
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return out, compile_s, min(times)


@functools.partial(jax.jit, static_argnames=("lm", "cache_len"))
def prefill(lm: LM, variables, prompt: jax.Array, *, cache_len: int):
    """generate's first call on its own: the prompt ``[B, T]`` into empty caches of ``cache_len`` positions.

    Returns:
      the last position's logits ``[B, vocab]`` and the filled caches.
    """
    cache = lm.init_cache(prompt.shape[0], cache_len, lm.config.dtype)
    logits, _, cache = lm.apply(variables, prompt, cache=cache)
    return logits[:, -1], cache


class Report(NamedTuple):
    """What :func:`run` printed: the continuations and the measured speeds.

    Attributes:
      samples: each sample's generated text (the prompt not included), cut at the end of its document.
      prefill_tokens_per_s: prompt tokens (all rows) per second of the prefill call.
      decode_tokens_per_s: tokens after the first (all rows) per second of generate's time less the
        prefill's; None when there are none or the difference is not positive.
    """

    samples: list[str]
    prefill_tokens_per_s: float
    decode_tokens_per_s: float | None


def run(options: SampleOptions, stream: TextIO = sys.stdout) -> Report:
    """Loads the model, samples, prints the samples and the speeds to ``stream``."""
    loaded = load(options)
    config, variables, codec = loaded.config, loaded.variables, loaded.codec
    prompt_ids = codec.encode(options.prompt)
    check_prompt(options, prompt_ids, config)
    lm = LM(config=config)
    batch, prompt_len, new = options.num_samples, len(prompt_ids), options.max_new_tokens
    prompt = jnp.tile(jnp.asarray(prompt_ids, jnp.int32)[None], (batch, 1))  # [B, T]
    key = jax.random.key(options.seed)
    print(f"{loaded.source}; {jax.device_count()} x {jax.devices()[0].device_kind}", file=stream, flush=True)

    first_call = functools.partial(prefill, lm, variables, prompt, cache_len=prompt_len + new)
    _, prefill_compile_s, prefill_s = timed(first_call, options.repeats)
    sampling = dict(max_new_tokens=new, key=key, temperature=options.temperature, top_k=options.top_k,
                    top_p=options.top_p, greedy=options.greedy)
    if options.exit_threshold is None:
        sample = functools.partial(generate, lm, variables, prompt, **sampling)
    else:
        sample = functools.partial(early_exit.generate, lm, variables, prompt, threshold=options.exit_threshold,
                                   measure=options.exit_measure, **sampling)
    tokens, generate_compile_s, generate_s = timed(sample, options.repeats)
    exits = None
    if options.exit_threshold is not None:
        tokens, exits = tokens.tokens, tokens

    how = "greedy" if options.greedy else (
        f"temperature {options.temperature}, top_k {options.top_k}, top_p {options.top_p}, seed {options.seed}")
    texts = []
    for row, ids in enumerate(jax.device_get(tokens)[:, prompt_len:].tolist()):
        ended = codec.end is not None and codec.end in ids
        text = codec.decode(ids[: ids.index(codec.end)] if ended else ids)
        texts.append(text)
        print(f"--- sample {row + 1} of {batch} ({how}) ---\n{options.prompt}{text}", file=stream)
        if ended:
            print(END_MARK, file=stream)

    if exits is not None and new > 1:  # the first new token comes from the prompt, at full depth
        used = jax.device_get(exits.layers_used)[:, 1:]
        shares = ", ".join(f"{(jax.device_get(exits.exit_index)[:, 1:] == k).mean():.0%} after layer {layer}"
                           for k, layer in enumerate(config.exit_layers))
        print(f"--- early exit ({options.exit_measure} > {options.exit_threshold}): {used.mean():.2f} of "
              f"{config.n_layers} layers per token; {shares} ---", file=stream)
    decode_tokens, decode_s = batch * (new - 1), generate_s - prefill_s
    prefill_rate = batch * prompt_len / prefill_s
    decode_rate = decode_tokens / decode_s if decode_tokens and decode_s > 0 else None
    print(f"--- speed: fastest of {options.repeats} call(s) after a compiling one "
          f"(compiled prefill in {prefill_compile_s:.1f} s, generate in {generate_compile_s:.1f} s) ---", file=stream)
    print(f"prefill: {prefill_rate:,.0f} tokens/s ({batch} x {prompt_len} prompt tokens in one call, "
          f"{1e3 * prefill_s:.2f} ms)", file=stream)
    if decode_rate is None:
        why = "no tokens after the first" if not decode_tokens else "generate took no longer than the prefill alone"
        print(f"decode: n/a ({why})", file=stream)
    else:
        print(f"decode: {decode_rate:,.0f} tokens/s ({batch} x {new - 1} tokens one step at a time, "
              f"{1e3 * decode_s:.1f} ms: generate's {1e3 * generate_s:.1f} ms less the prefill's)", file=stream)
    stream.flush()
    return Report(samples=texts, prefill_tokens_per_s=prefill_rate, decode_tokens_per_s=decode_rate)


def define_flags() -> None:
    """The command-line flags (defined only when run as a script, so importing this module beside
    another experiment script defines no clashing flags)."""
    flags.DEFINE_string("workdir", None, "A train_lm.py run folder, e.g. runs/cpu-small.")
    flags.DEFINE_string("hf", None, "Instead of --workdir: a folder of converted Hugging Face weights.")
    flags.DEFINE_integer("step", None, "The checkpoint of --workdir to load (default: the newest).")
    flags.DEFINE_string("prompt", "", "Text to continue (default: the start of a new document).")
    flags.DEFINE_integer("max_new_tokens", 200, "Tokens (bytes) to generate.")
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature (> 0).")
    flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens only.")
    flags.DEFINE_float("top_p", None, "Nucleus sampling: the most likely tokens up to this probability, in (0, 1].")
    flags.DEFINE_bool("greedy", False, "Always take the most likely token.")
    flags.DEFINE_integer("seed", 0, "Seed of the sampling.")
    flags.DEFINE_integer("num_samples", 1, "Continuations drawn at once (one batch).")
    flags.DEFINE_integer("repeats", 5, "Timed calls after the compiling one (the fastest is reported).")
    flags.DEFINE_float("exit_threshold", None, "Early exit: leave at the first exit whose confidence is above this.")
    flags.DEFINE_enum("exit_measure", "max_prob", list(early_exit.CONFIDENCE_MEASURES),
                      "The confidence of --exit_threshold.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # absl INFO lines (orbax's bookkeeping) stay quiet
    try:
        options = SampleOptions(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(SampleOptions)})
        run(options)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"{pathlib.Path(__file__).name}: {err}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
