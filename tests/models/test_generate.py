"""Generation: cached greedy decoding equals repeated full forwards; sampling
filters; stop tokens; speculative decoding reproduces the target's greedy output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch.models import LM, LMConfig, generate, speculative_generate
from effarch.models.generate import sample_logits

B, PROMPT, NEW = 2, 5, 7
VOCAB = 64


@pytest.fixture(scope="module")
def model():
    # "MA": a recurrent state (Mamba-2) and a KV cache (attention) to carry and roll back.
    lm = LM(config=LMConfig.preset("tiny", vocab_size=VOCAB))
    prompt = jax.random.randint(jax.random.PRNGKey(0), (B, PROMPT), 0, VOCAB)
    variables = lm.init(jax.random.PRNGKey(1), prompt)
    return lm, variables, prompt


@pytest.fixture(scope="module")
def greedy_reference(model):
    """Greedy continuation by a full forward over the whole sequence per token.

    The forward always sees the full-length buffer (one compile); the model is
    causal (tests/models/test_lm.py), so the not-yet-written zeros after
    position t do not change the logits at t.
    """
    lm, variables, prompt = model
    seq = jnp.zeros((B, PROMPT + NEW), jnp.int32).at[:, :PROMPT].set(prompt)
    forward = jax.jit(lambda v, s: lm.apply(v, s)[0])
    for t in range(PROMPT, PROMPT + NEW):
        seq = seq.at[:, t].set(jnp.argmax(forward(variables, seq)[:, t - 1], -1).astype(jnp.int32))
    return seq


def test_greedy_equals_repeated_full_forwards(model, greedy_reference):
    lm, variables, prompt = model
    out = generate(lm, variables, prompt, max_new_tokens=NEW, key=jax.random.PRNGKey(2), greedy=True)
    np.testing.assert_array_equal(out, greedy_reference)


def test_stop_token_fills_the_rest(model, greedy_reference):
    lm, variables, prompt = model
    stop = int(greedy_reference[0, PROMPT + 2])  # row 0 emits it as its third new token
    out = np.asarray(generate(lm, variables, prompt, max_new_tokens=NEW, key=jax.random.PRNGKey(2),
                              greedy=True, stop_tokens=(stop,)))
    ref = np.asarray(greedy_reference)
    for row in range(B):
        hits = np.flatnonzero(ref[row, PROMPT:] == stop)
        end = PROMPT + (hits[0] + 1 if hits.size else NEW)
        np.testing.assert_array_equal(out[row, :end], ref[row, :end])
        assert np.all(out[row, end:] == stop)


def test_sampling_is_reproducible_and_in_range(model):
    lm, variables, prompt = model
    kwargs = dict(max_new_tokens=NEW, key=jax.random.PRNGKey(4), temperature=0.8, top_p=0.9)
    first = generate(lm, variables, prompt, **kwargs)
    np.testing.assert_array_equal(first, generate(lm, variables, prompt, **kwargs))
    np.testing.assert_array_equal(first[:, :PROMPT], prompt)
    assert first.shape == (B, PROMPT + NEW) and np.all((first >= 0) & (first < VOCAB))


def test_sample_logits_filters():
    probs = jnp.array([[0.5, 0.3, 0.12, 0.08]] * 4000)
    logits = jnp.log(probs)
    keys = jax.random.PRNGKey(0)
    nucleus = np.asarray(sample_logits(logits, keys, top_p=0.7))
    assert set(nucleus) == {0, 1}  # 0.5 < 0.7 needs the second token, not the third
    np.testing.assert_allclose(np.mean(nucleus == 0), 0.5 / 0.8, atol=0.03)
    top3 = np.asarray(sample_logits(logits, keys, top_k=3))
    assert set(top3) == {0, 1, 2}
    np.testing.assert_array_equal(sample_logits(logits[:2], keys, greedy=True), [0, 0])


def test_bad_arguments_raise(model):
    lm, variables, prompt = model
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match=r"prompt has shape \(5,\) and dtype int32; expected an integer array"):
        generate(lm, variables, prompt[0], max_new_tokens=2, key=key)
    with pytest.raises(ValueError, match=r"top_k=0; expected None or an int in \[1, vocab_size=64\]"):
        generate(lm, variables, prompt, max_new_tokens=2, key=key, top_k=0)
    with pytest.raises(ValueError, match=r"temperature=0.0; expected > 0"):
        generate(lm, variables, prompt, max_new_tokens=2, key=key, temperature=0.0)
    with pytest.raises(ValueError, match=r"num_draft_tokens=0; expected an int >= 1"):
        speculative_generate(lm, variables, lm, variables, prompt, max_new_tokens=2, num_draft_tokens=0)


def test_speculative_equals_target_greedy(model, greedy_reference):
    """Same architecture as draft: exact params accept everything, perturbed ones get rejected.

    The perturbed draft makes the target roll back its Mamba-2 state and KV cache
    after rejections; the output must still be exactly the target's greedy tokens.
    """
    lm, variables, prompt = model
    tokens, stats = speculative_generate(lm, variables, lm, variables, prompt, max_new_tokens=NEW,
                                         num_draft_tokens=3)
    np.testing.assert_array_equal(tokens, greedy_reference)
    assert float(stats["acceptance_rate"]) == 1.0
    assert float(stats["tokens_per_round"]) == 4.0

    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
    noisy = tree.unflatten([x + 0.5 * jnp.std(x) * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    tokens, stats = speculative_generate(lm, variables, lm, noisy, prompt, max_new_tokens=NEW, num_draft_tokens=3)
    np.testing.assert_array_equal(tokens, greedy_reference)
    assert 0.0 <= float(stats["acceptance_rate"]) < 1.0
    assert float(stats["target_calls"]) > float(stats["rounds"]) + 1, "some rounds must roll back"
