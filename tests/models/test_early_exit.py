"""Early exit: exit heads, their training loss, and decoding that keeps to the early-exit model's definition.

The decode (effarch.models.early_exit: one token at a time from caches, layers
skipped under ``lax.cond``) is checked against ``LM(..., exits=True,
exit_at=...)``, which computes the same definition for a whole sequence at
once through the mixers' parallel forms.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch import train
from effarch.models import LM, LMConfig, early_exit, generate
from effarch.models.lm import residual_stream

EXITS = (0, 1, 2)
TOL = 1e-4  # a confidence this close to the threshold may fall either side between the two computations


def _model(pattern="MADA", **overrides):
    cfg = LMConfig.preset("tiny", n_layers=4, pattern=pattern, early_exit=EXITS, **overrides)
    lm = LM(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, cfg.vocab_size)
    params = lm.init(jax.random.key(1), tokens)
    # Sharpen the untrained exit heads so confidences spread over a useful range.
    params["params"]["embed"]["embedding"] = nn.unbox(params["params"]["embed"]["embedding"]) * 30.0
    return lm, params, tokens


def _confidences(measure, logits, streams):
    """Confidence ``[E-1, B, T]`` at every early exit from full-sequence logits ``[E,B,T,V]`` and streams ``[E+1,B,T,D]``."""
    out = []
    for k in range(logits.shape[0] - 1):
        flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
        c = early_exit.confidence(measure, flat(logits[k]), flat(streams[k + 1]), flat(streams[k]))
        out.append(c.reshape(logits.shape[1:3]))
    return np.asarray(jnp.stack(out))


def _reference(lm, params, tokens, exit_index, prompt_len):
    """Full-sequence logits of every exit ``[E,B,T,V]`` with position ``t`` frozen at its exit."""
    num_exits = len(lm.config.exit_layers)
    exit_at = jnp.concatenate([exit_index, jnp.full((tokens.shape[0], 1), num_exits - 1, jnp.int32)], axis=1)
    exit_at = exit_at.at[:, :prompt_len].set(num_exits - 1)
    logits, _, _ = lm.apply(params, tokens, exits=True, exit_at=exit_at)
    return np.asarray(logits), exit_at


def test_config_validation_names_the_value():
    with pytest.raises(ValueError, match=r"early_exit=\(3,\).*\[0, n_layers - 1 = 3\)"):
        LMConfig.preset("tiny", n_layers=4, pattern="MA", early_exit=(3,))
    with pytest.raises(ValueError, match="ascending distinct"):
        LMConfig.preset("tiny", n_layers=4, pattern="MA", early_exit=(2, 1))
    with pytest.raises(ValueError, match="scan_layers=False"):
        LMConfig.preset("tiny", n_layers=4, pattern="MA", early_exit=(1,), scan_layers=True)
    with pytest.raises(ValueError, match="early_exit_weights=.*2 non-negative"):
        LMConfig.preset("tiny", n_layers=4, pattern="MA", early_exit=(1,), early_exit_weights=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="None when early_exit is empty"):
        LMConfig.preset("tiny", early_exit_weights=(1.0,))


def test_exit_weights_default_to_calm_depth_weights_and_round_trip_json():
    cfg = LMConfig.preset("tiny", n_layers=4, pattern="MA", early_exit=[0, 2])
    assert cfg.early_exit == (0, 2) and cfg.exit_layers == (0, 2, 3)
    np.testing.assert_allclose(cfg.exit_weights, np.array([1, 3, 4]) / 8)
    assert LMConfig.from_dict(cfg.to_dict()) == cfg
    custom = LMConfig.preset("tiny", n_layers=4, pattern="MA", early_exit=(1,), early_exit_weights=(1, 3))
    np.testing.assert_allclose(custom.exit_weights, (0.25, 0.75))


def test_a_model_without_exits_keeps_its_parameters():
    lm = LM(LMConfig.preset("tiny"))
    params = lm.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert not any(name.startswith("exit_norm") for name in params["params"])


def test_exit_logits_and_exit_at_agree_with_the_plain_forward():
    lm, params, tokens = _model()
    plain, _, _ = lm.apply(params, tokens)
    every, _, _ = lm.apply(params, tokens, exits=True)
    assert every.shape == (len(EXITS) + 1, *plain.shape)
    np.testing.assert_allclose(every[-1], plain, rtol=1e-6, atol=1e-6)
    final = jnp.full(tokens.shape, len(EXITS), jnp.int32)
    forced, _, _ = lm.apply(params, tokens, exit_at=final)
    np.testing.assert_allclose(forced, plain, rtol=1e-6, atol=1e-6)
    # Exiting everything at exit 0 makes every later exit see the same frozen stream:
    # logits after layer 0 are then independent of layers 1.. (their outputs are discarded).
    first, _, _ = lm.apply(params, tokens, exits=True, exit_at=jnp.zeros_like(tokens))
    np.testing.assert_allclose(first[0], every[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(first[-1], every[-1], atol=1e-3)


def test_exit_at_rejects_bad_values():
    lm, params, tokens = _model()
    with pytest.raises(ValueError, match=r"exit_at holds values in \[4, 4\]; expected exit indices in \[0, 4\)"):
        lm.apply(params, tokens, exit_at=jnp.full(tokens.shape, 4, jnp.int32))
    with pytest.raises(ValueError, match="exit_at has shape"):
        lm.apply(params, tokens, exit_at=jnp.zeros((2, 3), jnp.int32))


# Threshold 1.0 takes the same path for every measure; max_prob stays in the default tier.
@pytest.mark.parametrize("measure", ["max_prob", pytest.param("margin", marks=pytest.mark.slow),
                                     pytest.param("saturation", marks=pytest.mark.slow)])
def test_threshold_one_is_the_full_model(measure):
    lm, params, tokens = _model()
    prompt = tokens[:, :5]
    out = early_exit.generate(lm, params, prompt, max_new_tokens=10, threshold=1.0, measure=measure,
                              key=jax.random.key(3), greedy=True)
    full = generate(lm, params, prompt, max_new_tokens=10, key=jax.random.key(3), greedy=True)
    np.testing.assert_array_equal(out.tokens, full)
    assert np.all(out.exit_index == len(EXITS)) and np.all(out.layers_used == 4)
    scored = early_exit.score(lm, params, tokens, threshold=1.0, measure=measure)
    logits, _, _ = lm.apply(params, tokens)
    nll, count = train.cross_entropy(logits[:, :-1], tokens[:, 1:], jnp.ones(tokens[:, 1:].shape))
    np.testing.assert_allclose(np.mean(scored.nll), nll / count, rtol=1e-5)


@pytest.mark.parametrize("measure", early_exit.CONFIDENCE_MEASURES)
def test_score_keeps_to_the_early_exit_definition(measure):
    """Every position's exit is the first whose confidence passes, and its loss is that exit's, under exit_at."""
    lm, params, tokens = _model()
    prompt_len = 4
    full, _, _ = lm.apply(params, tokens, exits=True)
    # A threshold inside the range of the full model's first-exit confidences gives a mix of exits.
    streams = _exit_streams(lm, params, tokens, None)
    threshold = float(np.median(_confidences(measure, np.asarray(full), streams)[0]))
    scored = early_exit.score(lm, params, tokens, threshold=threshold, measure=measure, prompt_len=prompt_len)
    index = np.asarray(scored.exit_index)
    assert len(np.unique(index[:, prompt_len:])) >= 2, f"threshold {threshold} gave exits {np.unique(index)}"

    logits, exit_at = _reference(lm, params, tokens, scored.exit_index, prompt_len)
    conf = _confidences(measure, logits, _exit_streams(lm, params, tokens, exit_at))  # [E-1, B, T]
    batch, steps = index.shape
    for b in range(batch):
        for t in range(steps):
            e = index[b, t]
            chosen = jax.nn.log_softmax(logits[e, b, t])
            np.testing.assert_allclose(scored.nll[b, t], -chosen[tokens[b, t + 1]], rtol=1e-4, atol=1e-4)
            if t < prompt_len:
                assert e == len(EXITS)
                continue
            for k in range(e):
                assert conf[k, b, t] <= threshold + TOL, (b, t, k, conf[k, b, t], threshold)
            if e < len(EXITS):
                assert conf[e, b, t] > threshold - TOL, (b, t, e, conf[e, b, t], threshold)


def _exit_streams(lm, params, tokens, exit_at):
    """Residual streams ``[E+1, B, T, D]``: the embedding, then the input of each early exit's norm."""
    # Captured: the embedding and every block's output; the frozen streams are rebuilt from them.
    _, state = lm.apply(params, tokens, exit_at=exit_at, mutable=["intermediates"],
                        capture_intermediates=lambda mdl, method: method == "__call__" and (
                            mdl.name == "embed" or (mdl.name or "").startswith("layer_")))
    inter = state["intermediates"]
    layers = inter
    streams = [residual_stream(lm.config, inter["embed"]["__call__"][0])]
    last = None if exit_at is None else np.asarray(lm.config.exit_layers)[np.asarray(exit_at)]
    x = streams[0]
    for i in range(lm.config.n_layers):
        y = layers[f"layer_{i}"]["__call__"][0][0]
        x = y if last is None else jnp.where(jnp.asarray(i > last)[..., None], x, y)
        if i in lm.config.early_exit:
            streams.append(x)
    return jnp.stack(streams)


def test_generation_is_exact_under_its_own_exits_and_rows_are_independent():
    lm, params, tokens = _model()
    prompt = tokens[:, :4]
    full, _, _ = lm.apply(params, tokens, exits=True)
    threshold = float(np.median(jax.nn.softmax(full[0], axis=-1).max(-1)))
    out = early_exit.generate(lm, params, prompt, max_new_tokens=12, threshold=threshold,
                              key=jax.random.key(5), greedy=True)
    index = np.asarray(out.exit_index)
    assert len(np.unique(index[:, 1:])) >= 2
    # The reference sees the generated sequence with each position frozen at the exit that predicted from it.
    seq = out.tokens
    prompt_len = prompt.shape[1]
    exit_index = jnp.concatenate([jnp.full((2, prompt_len - 1), len(EXITS), jnp.int32), out.exit_index], axis=1)
    logits, _ = _reference(lm, params, seq, exit_index[:, : seq.shape[1] - 1], prompt_len)
    for b in range(2):
        for t in range(prompt_len - 1, seq.shape[1] - 1):
            assert int(np.argmax(logits[exit_index[b, t], b, t])) == int(seq[b, t + 1]), (b, t)
    for b in range(2):  # each row alone decodes the same tokens and exits
        alone = early_exit.generate(lm, params, prompt[b:b + 1], max_new_tokens=12, threshold=threshold,
                                    key=jax.random.key(5), greedy=True)
        np.testing.assert_array_equal(alone.tokens[0], out.tokens[b])
        np.testing.assert_array_equal(alone.exit_index[0], out.exit_index[b])


def test_training_minimises_the_weighted_exit_losses():
    lm, params, tokens = _model(pattern="MA", early_exit_weights=(1.0, 0.0, 2.0, 1.0))
    params = nn.unbox(params["params"])
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": jnp.ones_like(tokens[:, 1:]),
             "loss_mask": jnp.ones(tokens[:, 1:].shape, jnp.float32)}
    config = train.TrainConfig(steps=4, batch_size=2, seq_len=23, warmup_steps=1)
    optimizer = train.make_optimizer(config)
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
    step = jax.jit(train.make_train_step(lm, optimizer, config, train.learning_rate(config)))
    with train.make_mesh((1, 1, 1)):
        _, metrics = step(state, batch)
    logits, _, _ = lm.apply({"params": params}, batch["tokens"], exits=True)
    losses = [float(train.cross_entropy(lg, batch["targets"], batch["loss_mask"])[0]) / batch["targets"].size
              for lg in logits]
    np.testing.assert_allclose(metrics["loss"], losses[-1], rtol=1e-5)
    for k in range(3):
        np.testing.assert_allclose(metrics[f"exit_{k}_loss"], losses[k], rtol=1e-5)
    np.testing.assert_allclose(metrics["total_loss"], np.dot([0.25, 0.0, 0.5, 0.25], losses), rtol=1e-5)


def test_decoding_rejects_bad_input():
    lm, params, tokens = _model()
    prompt = tokens[:, :3]
    with pytest.raises(ValueError, match="threshold=1.5; expected a float in \\[-1, 1\\]"):
        early_exit.generate(lm, params, prompt, max_new_tokens=2, threshold=1.5, key=jax.random.key(0))
    with pytest.raises(ValueError, match="measure='entropy'"):
        early_exit.generate(lm, params, prompt, max_new_tokens=2, threshold=0.5, measure="entropy",
                            key=jax.random.key(0))
    with pytest.raises(ValueError, match="prompt_len=24"):
        early_exit.score(lm, params, tokens, threshold=0.5, prompt_len=24)
    plain = LM(LMConfig.preset("tiny"))
    with pytest.raises(ValueError, match="no early exits"):
        early_exit.generate(plain, plain.init(jax.random.key(0), prompt), prompt, max_new_tokens=2,
                            threshold=0.5, key=jax.random.key(0))
