"""Early exit: each generated token leaves the model at the first confident exit (CALM-style).

A model with ``LMConfig(early_exit=(i, j, ...))`` has exit heads after layers
``i, j, ...`` (each its own RMSNorm, then the shared output head) besides the
final one, trained on a weighted sum of every exit's loss (effarch.train).
Here, at decode time, a token stops at the first exit whose confidence passes
``threshold`` (strictly: ``confidence > threshold``, so ``threshold=1.0``
never exits early and reproduces the full model):

* ``"max_prob"``: the largest next-token probability at that exit.
* ``"margin"``: the top-1 minus top-2 probability (CALM's softmax response).
* ``"saturation"``: the cosine similarity of the residual stream at this exit
  and at the previous one (the embedding for the first); CALM's hidden-state
  saturation: the stream stopped changing.

The layers a token skips still need its state for the tokens after it. As in
CALM, the exited residual stream is copied into every skipped layer, and each
skipped layer's mixer reads it (through that layer's norm) to advance its
cache; the layer's output, its MLP and the later exit heads are not computed.
For attention this is CALM's state propagation (the skipped layers' keys and
values are projected from the copied stream). For recurrent mixers we do the
same rather than freeze their state: a recurrence that saw no input at a
position would treat the next token as its neighbour across a gap the model
never trained on, while the copied stream is the representation the model
itself chose for that token. The price is that a skipped recurrent layer
still costs its input projections and state update; the saving is its output
projection, its MLP and the exit heads.

Definition and exactness: a token ``t`` with exit index ``e_t`` (into
``config.exit_layers``) runs layers ``0 .. exit_layers[e_t]``; its stream is
frozen after that, and later layers read the frozen stream. ``LM(...,
exit_at=e)`` computes exactly this for a whole sequence at once, so the
decode here can be checked against it. Prompt tokens run every layer (their
exit is the final one); every generated token chooses its own.

Batches: each row exits on its own (the others' streams are masked); the
remaining layers are skipped, down to state propagation, once every row of
the batch has exited (``lax.cond``). The saving is therefore largest at batch
size 1. A layer whose cache grows with the context (attention's keys and
values) runs its mixer outside the ``lax.cond``, which skips only its MLP and
exit head: XLA copies a conditional's operands in and out, and a copy of the
KV cache costs more than the attention read it would save (seen on CPU).

    out = generate(lm, params, prompt, max_new_tokens=100, threshold=0.9, key=key)
    out.tokens       # [B, T + 100]
    out.exit_index   # [B, 100] exit of each new token (len(config.exit_layers) - 1: the final one)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from effarch import mixers
from effarch.models.generate import check_prompt, check_sampling, sample_logits
from effarch.models.lm import (
    LM, V_FIRST, Block, block_norm, layer_lower_bounds, output_logits, residual_stream, takes_value_residual,
)

CONFIDENCE_MEASURES = ("max_prob", "margin", "saturation")


class EarlyExitOutput(NamedTuple):
    """What :func:`generate` returns.

    Attributes:
      tokens: ``[B, T + N]`` int32: the prompt, then the ``N`` new tokens.
      exit_index: ``[B, N]`` int32: the exit each new token was predicted at
        (an index into ``config.exit_layers``; the first new token comes
        from the prompt's last position, which ran every layer).
      layers_used: ``[B, N]`` int32: layers run for the token that predicted it.
    """

    tokens: jax.Array
    exit_index: jax.Array
    layers_used: jax.Array


class ScoreOutput(NamedTuple):
    """What :func:`score` returns, per predicted position.

    Attributes:
      nll: ``[B, T - 1]`` float32 negative log-likelihood (nats) of
        ``tokens[:, t + 1]`` at the exit position ``t`` chose.
      exit_index: ``[B, T - 1]`` int32 exit index of position ``t``.
      layers_used: ``[B, T - 1]`` int32 layers position ``t`` ran.
    """

    nll: jax.Array
    exit_index: jax.Array
    layers_used: jax.Array


def confidence(measure: str, logits: jax.Array, stream: jax.Array, previous: jax.Array) -> jax.Array:
    """Confidence ``[B]`` at an exit from its ``logits [B, V]`` and streams ``[B, D]`` (this and the previous exit)."""
    if measure == "saturation":
        dot = jnp.sum(stream * previous, axis=-1)
        norms = jnp.linalg.norm(stream, axis=-1) * jnp.linalg.norm(previous, axis=-1)
        return dot / jnp.maximum(norms, 1e-12)
    log_normaliser = jax.nn.logsumexp(logits, axis=-1)
    if measure == "max_prob":
        return jnp.exp(jnp.max(logits, axis=-1) - log_normaliser)
    top2 = jnp.exp(jax.lax.top_k(logits, 2)[0] - log_normaliser[:, None])
    return top2[:, 0] - top2[:, 1]


def _check(name: str, lm: LM, threshold: float, measure: str) -> None:
    cfg = lm.config
    if not cfg.early_exit:
        raise ValueError(
            f"{name}: the model has no early exits (early_exit={cfg.early_exit!r}); build it with "
            "LMConfig(early_exit=(i, ...)) and train the exit heads, or use effarch.models.generate."
        )
    if cfg.has_mod:
        raise ValueError(f"{name}: mod_capacity={cfg.mod_capacity}; Mixture-of-Depths models cannot decode.")
    if measure not in CONFIDENCE_MEASURES:
        raise ValueError(f"{name}: measure={measure!r}; expected one of {CONFIDENCE_MEASURES}.")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1.0 <= threshold <= 1.0:
        raise ValueError(
            f"{name}: threshold={threshold!r}; expected a float in [-1, 1] (exit when confidence > threshold; "
            "1.0 never exits early)."
        )


def _head(cfg, params):
    return params["embed"]["embedding"] if cfg.tie_embeddings else params["unembed"]


def _step(lm: LM, variables, token: jax.Array, caches: tuple, threshold: jax.Array, measure: str):
    """One token ``[B]`` through the model with exits: ``(logits [B, V], exit index [B], caches)``."""
    cfg = lm.config
    params = nn.unbox(variables)["params"]
    head = _head(cfg, params)
    num_exits = len(cfg.exit_layers)
    batch = token.shape[0]

    embedded = jnp.take(params["embed"]["embedding"].astype(cfg.dtype), token[:, None], axis=0)
    x = residual_stream(cfg, embedded)  # [B, 1, D]
    state = dict(x=x, previous=x[:, 0].astype(jnp.float32), exited=jnp.zeros((batch,), bool),
                 index=jnp.full((batch,), num_exits - 1, jnp.int32),
                 logits=jnp.zeros((batch, cfg.vocab_size), jnp.float32))

    def exit_head(state, k, norm_name):
        h = state["x"]
        logits = output_logits(cfg, block_norm(cfg).apply({"params": params[norm_name]}, h), head)[:, 0]
        stream = h[:, 0].astype(jnp.float32)
        if k == num_exits - 1:  # the final exit takes every row still running
            passes = ~state["exited"]
        else:
            passes = ~state["exited"] & (confidence(measure, logits, stream, state["previous"]) > threshold)
        return dict(state, previous=stream, exited=state["exited"] | passes,
                    index=jnp.where(passes, k, state["index"]),
                    logits=jnp.where(passes[:, None], logits, state["logits"]))

    def head_if_exit(state, i):
        if i not in cfg.exit_layers:
            return state
        k = cfg.exit_layers.index(i)
        return exit_head(state, k, "final_norm" if k == num_exits - 1 else f"exit_norm_{k}")

    def keep_running(state, x_new):
        return dict(state, x=jnp.where(state["exited"][:, None, None], state["x"], x_new))

    new_caches = []
    bounds = layer_lower_bounds(cfg, params)
    # RWKV-7's value residual: the stack's first such layer hands its values on to the later ones.
    residual_layers = [i for i, spec in enumerate(cfg.layer_specs) if takes_value_residual(spec)]
    if residual_layers:
        state["v_first"] = jnp.zeros((batch, 1, cfg.d_model), cfg.dtype)
    for i, (spec, cache) in enumerate(zip(cfg.layer_specs, caches)):
        block, layer, bound = Block(cfg, spec), {"params": params[f"layer_{i}"]}, bounds[i]
        first = bool(residual_layers) and i == residual_layers[0]

        def v_in(state, spec=spec, first=first):
            return None if first or not takes_value_residual(spec) else state["v_first"]

        def run(state, cache, block=block, layer=layer, i=i, bound=bound, first=first):
            y, cache, aux = block.apply(layer, state["x"], cache, None, bound, v_in(state))
            state = dict(state, v_first=aux[V_FIRST]) if first else state
            return head_if_exit(keep_running(state, y), i), cache

        def propagate(state, cache, block=block, layer=layer, bound=bound, first=first):
            _, cache, *passed = block.apply(layer, state["x"], cache, None, bound, v_in(state), method=Block.mix)
            return (dict(state, v_first=passed[0]) if first else state), cache

        def finish(state, h, block=block, layer=layer, i=i):
            x_new, _ = block.apply(layer, state["x"], h, method=Block.finish)
            return head_if_exit(keep_running(state, x_new), i)

        if i <= cfg.exit_layers[0]:  # nobody has exited before the first exit
            state, cache = run(state, cache)
        elif _cache_grows(spec.mixer):
            # A cache that grows with the context (attention's keys and values) would be copied in
            # and out of a lax.cond; its mixer runs unconditionally, only the rest is skipped.
            h, cache, *_ = block.apply(layer, state["x"], cache, None, bound, v_in(state), method=Block.mix)
            state = jax.lax.cond(jnp.all(state["exited"]), lambda state, h: state, finish, state, h)
        else:
            state, cache = jax.lax.cond(jnp.all(state["exited"]), propagate, run, state, cache)
        new_caches.append(cache)
    return state["logits"], state["index"], tuple(new_caches)


@functools.lru_cache(maxsize=None)
def _cache_grows(mixer_config) -> bool:
    """Whether a mixer's decode cache grows with the context (a KV cache) rather than being a fixed state."""
    mixer = mixers.from_config(mixer_config)
    sizes = [sum(leaf.size for leaf in jax.tree.leaves(jax.eval_shape(lambda: mixer.init_cache(1, length))))
             for length in (16, 32)]
    return sizes[1] > sizes[0]


def _layers_used(cfg, index: jax.Array) -> jax.Array:
    return jnp.asarray(cfg.exit_layers, jnp.int32)[index] + 1


def generate(
    lm: LM,
    params,
    prompt: jax.Array,
    *,
    max_new_tokens: int,
    threshold: float,
    measure: str = "max_prob",
    key: jax.Array,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
) -> EarlyExitOutput:
    """Continues ``prompt`` by ``max_new_tokens`` tokens, each from its first confident exit.

    Args:
      lm: a model with ``config.early_exit``.
      params: its variables.
      prompt: ``[B, T]`` int tokens (run through every layer).
      max_new_tokens: tokens to add.
      threshold: a token exits where ``confidence > threshold``; 1.0 never exits
        early (the full model's output).
      measure: ``"max_prob"``, ``"margin"`` or ``"saturation"`` (module docstring).
      key, temperature, top_k, top_p, greedy: sampling, as effarch.models.generate.

    Returns:
      :class:`EarlyExitOutput`.
    """
    _check("early_exit.generate", lm, threshold, measure)
    check_prompt("early_exit.generate", prompt, max_new_tokens)
    check_sampling("early_exit.generate", lm.config.vocab_size, temperature, top_k, top_p, greedy)
    prompt = prompt.astype(jnp.int32)
    empty = jnp.zeros((prompt.shape[0], 0), jnp.int32)
    if max_new_tokens == 0:
        return EarlyExitOutput(prompt, empty, empty)
    new, index = _generate(lm, params, prompt, key, jnp.float32(temperature), jnp.float32(threshold),
                           max_new_tokens=max_new_tokens, measure=measure, top_k=top_k, top_p=top_p,
                           greedy=greedy)
    return EarlyExitOutput(jnp.concatenate([prompt, new], axis=1), index, _layers_used(lm.config, index))


@functools.partial(jax.jit, static_argnames=("lm", "max_new_tokens", "measure", "top_k", "top_p", "greedy"))
def _generate(lm, params, prompt, key, temperature, threshold, *, max_new_tokens, measure, top_k, top_p, greedy):
    batch, time = prompt.shape
    cfg = lm.config
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    cache = lm.init_cache(batch, time + max_new_tokens, cfg.dtype)
    logits, _, cache = lm.apply(params, prompt, cache=cache)
    key, step_key = jax.random.split(key)
    first = sample(logits[:, -1], step_key)  # [B]

    def step(carry, _):
        token, cache, key = carry
        logits, index, cache = _step(lm, params, token, cache, threshold, measure)
        key, step_key = jax.random.split(key)
        new = sample(logits, step_key)
        return (new, cache, key), (new, index)

    (_, _, _), (tokens, index) = jax.lax.scan(step, (first, cache, key), None, length=max_new_tokens - 1)
    final = jnp.full((batch, 1), len(cfg.exit_layers) - 1, jnp.int32)
    return (jnp.concatenate([first[:, None], tokens.T], axis=1),
            jnp.concatenate([final, index.T], axis=1))


def score(lm: LM, params, tokens: jax.Array, *, threshold: float, measure: str = "max_prob",
          prompt_len: int = 1) -> ScoreOutput:
    """Teacher-forced early exit: the likelihood of ``tokens`` when every position exits by confidence.

    Positions ``< prompt_len`` run every layer (a prompt); each later position
    is fed the true token and exits at its first confident exit, exactly as in
    :func:`generate`, so the mean ``nll`` is the early-exit model's held-out
    loss at this threshold.

    Args:
      lm: a model with ``config.early_exit``.
      params: its variables.
      tokens: ``[B, T]`` int tokens, ``T >= 2``.
      threshold, measure: as :func:`generate`.
      prompt_len: leading positions that run every layer, in ``[1, T)``.

    Returns:
      :class:`ScoreOutput` over the ``T - 1`` predicted positions.
    """
    _check("early_exit.score", lm, threshold, measure)
    if tokens.ndim != 2 or tokens.shape[1] < 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"early_exit.score: tokens has shape {tuple(tokens.shape)} and dtype {tokens.dtype}; expected an "
            "integer array [B,T] with T >= 2."
        )
    if not isinstance(prompt_len, int) or not 1 <= prompt_len < tokens.shape[1]:
        raise ValueError(
            f"early_exit.score: prompt_len={prompt_len!r}; expected an int in [1, T={tokens.shape[1]})."
        )
    nll, index = _score(lm, params, tokens.astype(jnp.int32), jnp.float32(threshold), measure=measure,
                        prompt_len=prompt_len)
    return ScoreOutput(nll, index, _layers_used(lm.config, index))


def _nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames=("lm", "measure", "prompt_len"))
def _score(lm, params, tokens, threshold, *, measure, prompt_len):
    batch, time = tokens.shape
    cfg = lm.config
    cache = lm.init_cache(batch, time, cfg.dtype)
    logits, _, cache = lm.apply(params, tokens[:, :prompt_len], cache=cache)
    prompt_nll = _nll(logits[:, :-1], tokens[:, 1:prompt_len])  # [B, prompt_len - 1]
    last_nll = _nll(logits[:, -1], tokens[:, prompt_len])  # [B]

    def step(cache, inputs):
        token, target = inputs
        logits, index, cache = _step(lm, params, token, cache, threshold, measure)
        return cache, (_nll(logits, target), index)

    _, (nll, index) = jax.lax.scan(step, cache, (tokens[:, prompt_len:-1].T, tokens[:, prompt_len + 1:].T))
    final = jnp.full((batch, prompt_len), len(cfg.exit_layers) - 1, jnp.int32)
    return (jnp.concatenate([prompt_nll, last_nll[:, None], nll.T], axis=1),
            jnp.concatenate([final, index.T], axis=1))
