"""The one mixer interface, checked on every registered mixer.

Parameterized over ``mixers.names()`` with each mixer's ``"tiny"`` preset
(and any other ``"tiny_*"`` preset it defines, e.g. local attention):

- a prefill + token-by-token decode equals one full-sequence call;
- every implementation of the mixer's op gives the same outputs and parameter
  gradients (the first entry of the config's ``IMPLEMENTATIONS`` is the reference);
- jit, grad and vmap work; bfloat16 compute with float32 parameters gives the
  float32 outputs within ``BF16_OUTPUT_TOLERANCE`` at T = 20 (by default for
  ``BF16_OUTPUT_DEFAULT``, every mixer under ``-m slow``; parameter gradients
  within ``BF16_GRADIENT_TOLERANCE`` under ``-m slow``),
  and is finite at T = 256 (by default for the mixers in tests/conftest.py's
  ``BF16_DEFAULT``, all under ``-m slow``, which adds T = 2048);
- packed ``segment_ids`` equal separate sequences;
- a mixer runs inside a Flax NNX model through ``flax.nnx.bridge``.

A mixer that cannot offer a capability is listed in ``NOT_APPLICABLE`` with
the reason.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effarch import mixers
from effarch.testing import assert_relative_close, relative_rmse

D_MODEL = 32
BATCH = 2
SEQ = 20  # longer than the local-attention window of "tiny_local" (8)
PROMPTS = (1, 12)
MAX_LEN = 24

# (mixer, capability) -> why it does not apply.
# Capabilities: "segment_ids", "decode", "float32_state".
NOT_APPLICABLE: dict[tuple[str, str], str] = {
    ("attention", "float32_state"): "the KV cache holds keys and values, not an accumulated sum; "
                                    "it is stored in the dtype passed to init_cache",
}

# Implementations that need hardware (run where present), or that are slow on CPU.
HARDWARE_IMPLEMENTATIONS = {"cudnn": "gpu"}
SLOW_IMPLEMENTATIONS = ("pallas",)  # Pallas kernels in interpret mode


def _cases():
    cases = []
    for name in mixers.names():
        for preset in sorted(mixers.config_class(name).PRESETS):
            if preset == "tiny" or preset.startswith("tiny_"):
                cases.append(pytest.param(name, preset, id=f"{name}-{preset}"))
    return cases


CASES = _cases()


def _skip_if_not_applicable(name, capability):
    reason = NOT_APPLICABLE.get((name, capability))
    if reason:
        pytest.skip(f"{name} {capability}: {reason}")


@functools.cache
def _setup(name, preset, dtype=jnp.float32, seq=SEQ, batch=BATCH):
    """The mixer, its parameters, an input ``[B,T,D]`` and its jitted ``apply`` (cached per case)."""
    mixer = mixers.build(name, d_model=D_MODEL, preset=preset, dtype=dtype)
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, seq, D_MODEL), jnp.float32).astype(dtype)
    params = mixer.init(jax.random.PRNGKey(0), x[:, :4])
    return mixer, params, x, jax.jit(mixer.apply)


def _loss(mixer, params, x, **kwargs):
    y, _ = mixer.apply(params, x, **kwargs)
    probe = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    return jnp.sum(y.astype(jnp.float32) * probe), y


def _reference(name):
    """The reference implementation of mixer ``name`` (None: it has a single form)."""
    impls = mixers.config_class(name).IMPLEMENTATIONS
    return impls[0] if impls else None


# Packed rows: three sequences (one of a single token) in row 0, one in row 1.
SEGMENTS = ((0, 7), (7, 8), (8, SEQ))
SEGMENT_IDS = jnp.array([[0] * 7 + [1] + [2] * (SEQ - 8), [5] * SEQ])


@functools.cache
def _output_and_grads(name, preset, implementation=None, dtype=jnp.float32):
    """Outputs and parameter gradients on ``SEGMENT_IDS``-packed input (cached per case).

    With ``dtype`` bfloat16 the mixer computes in bfloat16 from the same float32
    parameters and the same input, rounded to bfloat16.
    """
    mixer, params, x, _ = _setup(name, preset)
    if implementation is not None or dtype != jnp.float32:
        options = {} if implementation is None else {"implementation": implementation}
        mixer = mixers.build(name, d_model=D_MODEL, preset=preset, dtype=dtype, **options)
        x = x.astype(dtype)
    kwargs = {}
    if (name, "segment_ids") not in NOT_APPLICABLE:
        kwargs["segment_ids"] = SEGMENT_IDS
    grad_fn = jax.jit(jax.grad(lambda p: _loss(mixer, p, x, **kwargs), has_aux=True))
    grads, y = grad_fn(params)
    return y, grads


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: f"prompt{p}")
@pytest.mark.parametrize("name,preset", CASES)
def test_prefill_then_decode_equals_full(name, preset, prompt):
    _skip_if_not_applicable(name, "decode")
    mixer, params, x, apply = _setup(name, preset)
    full, none_cache = apply(params, x)
    assert none_cache is None, "a full-sequence call returns cache=None"
    chex.assert_shape(full, (BATCH, SEQ, D_MODEL))
    assert full.dtype == jnp.float32

    cache = mixer.init_cache(BATCH, MAX_LEN, jnp.float32)
    y_prompt, cache = apply(params, x[:, :prompt], cache)
    outs = [y_prompt]
    for t in range(prompt, SEQ):
        y_t, cache = apply(params, x[:, t : t + 1], cache)
        outs.append(y_t)
    assert_relative_close(jnp.concatenate(outs, axis=1), full, name=f"{name} decoded")
    empty = mixer.init_cache(BATCH, MAX_LEN, jnp.float32)
    assert jax.tree.structure(cache) == jax.tree.structure(empty), "the cache keeps its structure"


def _implementation_params():
    params = []
    for name, preset in (c.values for c in CASES):
        impls = mixers.config_class(name).IMPLEMENTATIONS
        for impl in impls[1:]:
            marks = []
            if impl in SLOW_IMPLEMENTATIONS:
                marks.append(pytest.mark.slow)
            if impl in HARDWARE_IMPLEMENTATIONS:
                marks.append(getattr(pytest.mark, HARDWARE_IMPLEMENTATIONS[impl]))
            params.append(pytest.param(name, preset, impls[0], impl, marks=marks, id=f"{name}-{preset}-{impl}"))
    return params


@pytest.mark.parametrize("name,preset,reference,implementation", _implementation_params())
def test_implementations_agree(name, preset, reference, implementation):
    hardware = HARDWARE_IMPLEMENTATIONS.get(implementation)
    if hardware and jax.default_backend() != hardware:
        pytest.skip(f"implementation={implementation!r} needs a {hardware}")
    y_ref, g_ref = _output_and_grads(name, preset, reference)
    y, g = _output_and_grads(name, preset, implementation)
    assert_relative_close(y, y_ref, name=f"{name} {implementation} output")
    assert_relative_close(g, g_ref, name=f"{name} {implementation} param grads")


@pytest.mark.parametrize("name,preset", CASES)
def test_jit_grad_vmap(name, preset):
    mixer, params, x, apply = _setup(name, preset)
    _, grads = _output_and_grads(name, preset, _reference(name))
    for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.all(np.isfinite(np.asarray(leaf))), f"{jax.tree_util.keystr(path)}: non-finite gradient"
    assert any(float(jnp.max(jnp.abs(leaf))) > 0 for leaf in jax.tree.leaves(grads)), "parameters get gradients"
    stacked = jnp.stack([x, x[::-1]])  # [2, B, T, D]: vmap over an outer axis
    y_vmap, _ = jax.jit(jax.vmap(lambda x: mixer.apply(params, x)))(stacked)
    y_each = jnp.stack([apply(params, x)[0], apply(params, x[::-1])[0]])
    assert_relative_close(y_vmap, y_each, name="vmap")


def _bf16_check(name, preset, seq):
    mixer, params, x, _ = _setup(name, preset, dtype=jnp.bfloat16, seq=seq, batch=1)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params)), "float32 parameters"
    grads, y = jax.jit(jax.grad(lambda p: _loss(mixer, p, x), has_aux=True))(params)
    assert y.dtype == jnp.bfloat16 and y.shape == (1, seq, D_MODEL)
    assert np.all(np.isfinite(np.asarray(y, np.float32))), "finite bf16 outputs"
    for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert leaf.dtype == jnp.float32, f"{jax.tree_util.keystr(path)} gradient dtype {leaf.dtype}"
        assert np.all(np.isfinite(np.asarray(leaf))), f"{jax.tree_util.keystr(path)}: non-finite bf16 gradient"


# bfloat16 compute against float32 through a whole mixer (projections, short
# convolutions, norms, gates and the op). The 1e-2 of docs/design.md §5 is one
# op's error with bfloat16 inputs; a mixer chains several roundings. Measured
# at T = 20 (relative RMS, CPU): outputs 4.5e-3 (S4D) to 1.2e-2 (mLSTM);
# parameter gradients, per leaf, up to 3.2e-2 (mLSTM's forget-gate bias). The
# bounds sit above those.
BF16_OUTPUT_TOLERANCE = 2e-2
BF16_GRADIENT_TOLERANCE = 4e-2
# The output check runs by default for these families (one compilation each);
# for every mixer under -m slow.
BF16_OUTPUT_DEFAULT = {"attention", "mamba2", "gated_deltanet", "mlstm", "rwkv7"}


def _assert_within(out, ref, tolerance, name):
    for (path, o), (_, r) in zip(jax.tree_util.tree_flatten_with_path(out)[0],
                                 jax.tree_util.tree_flatten_with_path(ref)[0]):
        error = relative_rmse(o, r)
        assert error <= tolerance, (
            f"{name}{jax.tree_util.keystr(path)}: relative RMS error {error:.3e} of bfloat16 "
            f"compute against float32 > {tolerance:.0e}")


@pytest.mark.parametrize("name,preset", [
    c if c.values[0] in BF16_OUTPUT_DEFAULT and c.values[1] == "tiny"
    else pytest.param(*c.values, marks=pytest.mark.slow, id=c.id) for c in CASES])
def test_bfloat16_output_matches_float32(name, preset):
    """bfloat16 compute (float32 parameters, the input rounded to bfloat16) against float32, T = 20."""
    mixer, params, x, apply = _setup(name, preset)
    bf16 = mixers.build(name, d_model=D_MODEL, preset=preset, dtype=jnp.bfloat16)
    y, _ = jax.jit(bf16.apply)(params, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    y_ref, _ = apply(params, x.astype(jnp.bfloat16).astype(jnp.float32))
    _assert_within(y, y_ref, BF16_OUTPUT_TOLERANCE, f"{name} bf16 output")


@pytest.mark.slow
@pytest.mark.parametrize("name,preset", CASES)
def test_bfloat16_gradients_match_float32(name, preset):
    """Parameter gradients of bfloat16 compute against float32, packed input, T = 20."""
    _, g_ref = _output_and_grads(name, preset, _reference(name))
    _, g = _output_and_grads(name, preset, _reference(name), jnp.bfloat16)
    _assert_within(g, g_ref, BF16_GRADIENT_TOLERANCE, f"{name} bf16 param grads")


@pytest.mark.parametrize("name,preset", CASES)
def test_bfloat16_compute_is_finite(name, preset):
    _bf16_check(name, preset, seq=256)


@pytest.mark.slow
@pytest.mark.parametrize("name,preset", CASES)
def test_bfloat16_long_sequence_is_finite(name, preset):
    _bf16_check(name, preset, seq=2048)


@pytest.mark.parametrize("name,preset", CASES)
def test_packed_segments_equal_separate_sequences(name, preset):
    _skip_if_not_applicable(name, "segment_ids")
    mixer, params, x, apply = _setup(name, preset)
    packed, _ = _output_and_grads(name, preset, _reference(name))
    # Each sequence alone, right-padded to SEQ (causal: padding never reaches earlier outputs).
    alone = [apply(params, jnp.pad(x[:, s:e], ((0, 0), (0, SEQ - (e - s)), (0, 0))))[0][:1, : e - s]
             for s, e in SEGMENTS]
    assert_relative_close(packed[:1], jnp.concatenate(alone, axis=1), name=f"{name} packed row")
    assert_relative_close(packed[1:], apply(params, x)[0][1:], name=f"{name} one-segment row")


def test_inside_an_nnx_model():
    """A Linen mixer wrapped by ``nnx.bridge.ToNNX`` trains inside an NNX module."""

    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.mixer = nnx.bridge.ToNNX(mixers.build("retnet", d_model=D_MODEL, preset="tiny"), rngs=rngs)
            self.head = nnx.Linear(D_MODEL, 3, rngs=rngs)

        def __call__(self, x):
            y, _ = self.mixer(x)
            return self.head(x + y)

    x = jax.random.normal(jax.random.PRNGKey(0), (BATCH, 6, D_MODEL))
    model = Block(nnx.Rngs(0))
    nnx.bridge.lazy_init(model.mixer, x)
    out = model(x)
    assert out.shape == (BATCH, 6, 3)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    mixer_grads = jax.tree.leaves(nnx.state(grads.mixer))
    assert mixer_grads and all(np.all(np.isfinite(np.asarray(g))) for g in mixer_grads)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in mixer_grads)


@pytest.mark.parametrize("name,preset", CASES)
def test_cache_state_is_float32(name, preset):
    """Recurrent states are float32 even when activations are bfloat16."""
    _skip_if_not_applicable(name, "float32_state")
    mixer, *_ = _setup(name, preset)
    cache = mixer.init_cache(BATCH, MAX_LEN, jnp.bfloat16)
    floats = [leaf.dtype for leaf in jax.tree.leaves(cache) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    assert jnp.float32 in floats or jnp.complex64 in floats, f"{name}: no float32 state in {floats}"


def test_unknown_options_and_presets_name_the_valid_ones():
    with pytest.raises(ValueError, match="has no option"):
        mixers.build(mixers.names()[0], d_model=D_MODEL, not_an_option=1)
    with pytest.raises(ValueError, match="has no preset"):
        mixers.build(mixers.names()[0], d_model=D_MODEL, preset="enormous")

