"""Autoregressive generation with the mixers' decode caches, and speculative decoding.

:func:`generate` runs the prompt through the model once (prefill), then one token
per step inside a jitted ``lax.while_loop``; every mixer carries its own state
(a KV cache for attention, a fixed-size recurrent state for the rest), so the
cost per token does not grow with the context for recurrent layers.

:func:`speculative_generate` (Leviathan et al., 2023; Chen et al., 2023) lets a
small draft model propose ``num_draft_tokens`` tokens greedily, checks them
with one multi-token target call, and keeps the longest agreeing prefix plus the
target's own next token, so the output is exactly the target's greedy output.

Rolling back after rejected drafts: a mixer's cache is opaque (a KV buffer, an
SSM state, a conv window ...) and a multi-token call returns only the state
after its last token, so there is no per-position state to cut back to.

* The target keeps the cache from before verification and, once it knows how
  many drafts it accepted (n), re-runs the accepted prefix (``n + 1`` tokens)
  from that saved cache: one ``lax.switch`` branch per possible length keeps
  shapes static, only the taken branch runs, and when every draft is accepted
  the verification cache is already right (no re-run).
* The draft runs token by token anyway, so it snapshots its cache after each
  step (``lax.scan`` stacks them) and simply picks snapshot n.

This works for every mixer without asking it for rollback support; the price
is one extra target call of ``n + 1`` tokens in rounds with a rejection.
Batch rows advance in lockstep: a round accepts the smallest n over the rows
(each row's target tokens up to that point are already correct, so the output
stays exactly greedy).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from effarch.models.lm import LM


def sample_logits(
    logits: jax.Array,
    key: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
) -> jax.Array:
    """Draws one token per row.

    Args:
      logits: ``[B, vocab]`` float32.
      key: PRNG key.
      temperature: divides the logits (> 0).
      top_k: keep only the k most likely tokens.
      top_p: nucleus sampling: keep the most likely tokens whose cumulative
        probability first reaches ``top_p`` (the top token always stays).
      greedy: take the argmax (the other options are then ignored).

    Returns:
      ``[B]`` int32 tokens.
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, vocab] descending
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        threshold = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def check_prompt(name: str, prompt: jax.Array, max_new_tokens: int) -> None:
    """Raises a ValueError naming ``name`` unless ``prompt`` is int ``[B, T >= 1]`` and ``max_new_tokens >= 0``."""
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(
            f"{name}: prompt has shape {tuple(prompt.shape)} and dtype {prompt.dtype}; expected an "
            "integer array [B,T] with T >= 1."
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"{name}: max_new_tokens={max_new_tokens!r}; expected an int >= 0.")


def check_sampling(name: str, vocab: int, temperature: float, top_k: int | None, top_p: float | None,
                   greedy: bool) -> None:
    """Raises a ValueError naming ``name`` for sampling options :func:`sample_logits` cannot take."""
    if not greedy and not temperature > 0:
        raise ValueError(f"{name}: temperature={temperature!r}; expected > 0 (or greedy=True).")
    if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= vocab):
        raise ValueError(f"{name}: top_k={top_k!r}; expected None or an int in [1, vocab_size={vocab}].")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"{name}: top_p={top_p!r}; expected None or a float in (0, 1].")


def generate(
    lm: LM,
    params,
    prompt: jax.Array,
    *,
    max_new_tokens: int,
    key: jax.Array,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: tuple[int, ...] = (),
    greedy: bool = False,
) -> jax.Array:
    """Continues ``prompt`` by ``max_new_tokens`` tokens.

    Args:
      lm: the model (``effarch.models.LM``).
      params: its variables (``lm.init`` output).
      prompt: ``[B, T]`` int tokens.
      max_new_tokens: tokens to add.
      key: PRNG key for sampling.
      temperature, top_k, top_p, greedy: see :func:`sample_logits`.
      stop_tokens: once a row emits one of these, the rest of that row repeats
        it; the loop ends early when every row has stopped.

    Returns:
      ``[B, T + max_new_tokens]`` int32: the prompt, then the new tokens.
    """
    check_prompt("generate", prompt, max_new_tokens)
    vocab = lm.config.vocab_size
    check_sampling("generate", vocab, temperature, top_k, top_p, greedy)
    stop_tokens = tuple(int(s) for s in stop_tokens)
    if any(not 0 <= s < vocab for s in stop_tokens):
        raise ValueError(f"generate: stop_tokens={stop_tokens}; expected token ids in [0, {vocab}).")
    prompt = prompt.astype(jnp.int32)
    if max_new_tokens == 0:
        return prompt
    new = _generate(lm, params, prompt, key, jnp.float32(temperature), max_new_tokens=max_new_tokens,
                    top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, greedy=greedy)
    return jnp.concatenate([prompt, new], axis=1)


@functools.partial(jax.jit, static_argnames=("lm", "max_new_tokens", "top_k", "top_p", "stop_tokens", "greedy"))
def _generate(lm, params, prompt, key, temperature, *, max_new_tokens, top_k, top_p, stop_tokens, greedy):
    """Prefill, then a while loop of single-token steps; returns ``[B, max_new_tokens]``."""
    batch, time = prompt.shape
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    stops = jnp.asarray(stop_tokens, jnp.int32)

    cache = lm.init_cache(batch, time + max_new_tokens, lm.config.dtype)
    logits, _, cache = lm.apply(params, prompt, cache=cache)
    key, step_key = jax.random.split(key)
    token = sample(logits[:, -1], step_key)  # [B]
    done = jnp.isin(token, stops)
    out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(token)

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def step(carry):
        i, out, cache, token, done, key = carry
        logits, _, cache = lm.apply(params, token[:, None], cache=cache)
        key, step_key = jax.random.split(key)
        new = jnp.where(done, token, sample(logits[:, 0], step_key))  # a stopped row repeats its stop token
        out = jax.lax.dynamic_update_slice(out, new[:, None], (0, i))
        return i + 1, out, cache, new, done | jnp.isin(new, stops), key

    i, out, _, token, _, _ = jax.lax.while_loop(cond, step, (1, out, cache, token, done, key))
    # An early exit means every row stopped: fill the rest with each row's stop token.
    return jnp.where(jnp.arange(max_new_tokens) < i, out, token[:, None])


def speculative_generate(
    target: LM,
    target_params,
    draft: LM,
    draft_params,
    prompt: jax.Array,
    *,
    max_new_tokens: int,
    num_draft_tokens: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Greedy speculative decoding: the target's greedy tokens, fewer target calls.

    Args:
      target: the model whose output is reproduced.
      target_params: its variables.
      draft: a cheaper model with the same vocabulary that proposes tokens.
      draft_params: its variables.
      prompt: ``[B, T]`` int tokens.
      max_new_tokens: tokens to add.
      num_draft_tokens: drafts proposed per round (gamma >= 1).

    Returns:
      ``tokens [B, T + max_new_tokens]`` (equal to greedy :func:`generate` with
      the target) and stats: ``"acceptance_rate"`` (accepted / proposed
      drafts), ``"rounds"``, ``"tokens_per_round"`` (new tokens per target
      verification), ``"target_calls"`` (prefill, verifications and rollback
      re-runs).
    """
    check_prompt("speculative_generate", prompt, max_new_tokens)
    if not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
        raise ValueError(f"speculative_generate: num_draft_tokens={num_draft_tokens!r}; expected an int >= 1.")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(
            f"speculative_generate: draft vocab_size={draft.config.vocab_size} differs from target "
            f"vocab_size={target.config.vocab_size}; the models must share a vocabulary."
        )
    prompt = prompt.astype(jnp.int32)
    if max_new_tokens == 0:
        zero = jnp.zeros((), jnp.float32)
        return prompt, {"acceptance_rate": zero, "rounds": zero, "tokens_per_round": zero, "target_calls": zero}
    return _speculative(target, target_params, draft, draft_params, prompt,
                        max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens)


@functools.partial(jax.jit, static_argnames=("target", "draft", "max_new_tokens", "num_draft_tokens"))
def _speculative(target, target_params, draft, draft_params, prompt, *, max_new_tokens, num_draft_tokens):
    gamma = num_draft_tokens
    batch, time = prompt.shape
    total = time + max_new_tokens
    room = total + gamma + 1  # a round may write gamma tokens past the end

    def greedy(logits):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    t_logits, _, t_cache = target.apply(target_params, prompt,
                                        cache=target.init_cache(batch, room, target.config.dtype))
    _, _, d_cache = draft.apply(draft_params, prompt, cache=draft.init_cache(batch, room, draft.config.dtype))
    # Invariant: `out[:, :cur]` is final; both caches have seen out[:, :cur-1];
    # `pending = out[:, cur-1]` is the newest token, not yet fed to either model.
    pending = greedy(t_logits[:, -1])  # [B]
    out = jnp.zeros((batch, room), jnp.int32).at[:, :time].set(prompt).at[:, time].set(pending)

    def draft_step(carry, _):
        token, cache = carry
        logits, _, cache = draft.apply(draft_params, token[:, None], cache=cache)
        token = greedy(logits[:, 0])
        return (token, cache), (token, cache)

    def rerun(length):
        def branch(cache, verify, _):
            return target.apply(target_params, verify[:, :length], cache=cache)[2]
        return branch

    # Branch n re-runs pending + n accepted drafts; branch gamma keeps the verification cache.
    rollbacks = [rerun(n + 1) for n in range(gamma)] + [lambda cache, verify, verified: verified]

    def cond(carry):
        return carry[1] < total

    def round_(carry):
        out, cur, pending, t_cache, d_cache, accepted, rounds, reruns = carry
        # Draft gamma + 1 steps: drafts d_1..d_gamma and snapshots after pending, d_1, ..., d_gamma.
        _, (drafts, snapshots) = jax.lax.scan(draft_step, (pending, d_cache), None, length=gamma + 1)
        drafts = drafts[:gamma].T  # [B, gamma]
        verify = jnp.concatenate([pending[:, None], drafts], axis=1)  # [B, gamma + 1]
        v_logits, _, verified = target.apply(target_params, verify, cache=t_cache)
        best = greedy(v_logits)  # [B, gamma + 1]: the target's t_1..t_{gamma+1}
        agree = jnp.cumprod((drafts == best[:, :gamma]).astype(jnp.int32), axis=1)
        n = jnp.min(jnp.sum(agree, axis=1))  # accepted drafts, lockstep over rows
        # t_1..t_n equal the accepted drafts and t_{n+1} is the correction (or bonus).
        out = jax.lax.dynamic_update_slice(out, best, (0, cur))
        pending = jax.lax.dynamic_index_in_dim(best, n, axis=1, keepdims=False)
        t_cache = jax.lax.switch(n, rollbacks, t_cache, verify, verified)
        d_cache = jax.tree.map(lambda s: s[n], snapshots)
        return (out, cur + n + 1, pending, t_cache, d_cache, accepted + n, rounds + 1,
                reruns + (n < gamma).astype(jnp.int32))

    zero = jnp.zeros((), jnp.int32)
    carry = (out, jnp.int32(time + 1), pending, t_cache, d_cache, zero, zero, zero)
    out, cur, _, _, _, accepted, rounds, reruns = jax.lax.while_loop(cond, round_, carry)
    rounds_f = rounds.astype(jnp.float32)
    stats = {
        "acceptance_rate": jnp.where(rounds > 0, accepted / jnp.maximum(rounds_f * gamma, 1.0), 0.0),
        "rounds": rounds_f,
        "tokens_per_round": jnp.where(rounds > 0, (cur - time - 1) / jnp.maximum(rounds_f, 1.0), 0.0),
        "target_calls": (1 + rounds + reruns).astype(jnp.float32),
    }
    return out[:, :total], stats
