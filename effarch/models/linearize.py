"""Converting a trained attention LM into a recurrent one: layer surgery and attention transfer.

    student_cfg = converted_config(teacher_cfg, "gla", layers=(0, 1, 2))     # layer 3 stays attention
    student, new = convert_params(teacher_cfg, teacher_params, student_cfg, key)
    # new: 1.0 where a parameter was initialised fresh, 0.0 where it came from the teacher
    captured = capture_mixers(LM(teacher_cfg), teacher_params, tokens, segment_ids=ids)
    loss, per_layer = transfer_loss(student_cfg, student, captured, segment_ids=ids)

Every converted layer reuses its attention layer's ``q, k, v, o`` projections
(LoLCATs, Zhang et al. 2024; "Mamba in the Llama", Wang et al. 2024) and adds
what the target has and attention lacks: a feature map, a decay, gates, a
short convolution. Attention transfer trains only those new parameters to
reproduce each attention layer's output from the same input (the teacher's
hidden state, so the layers train independently); fine-tuning then trains the
whole model on the LM loss. The mapping, per target (``H`` heads of width
``d``, ``H d = D``; key/value heads of a GQA teacher are repeated to ``H``):

| target | from the teacher | new (initialisation) |
|---|---|---|
| ``linear_attention`` | ``q_proj, k_proj, v_proj, o_proj`` | Hedgehog maps ``q_feature, k_feature`` (identity) |
| ``gla`` | ``q_proj, k_proj, v_proj, o_proj`` | decay ``gk_down`` (random), ``gk_up`` (kernel 0, bias: decay ``DECAY_RANGE``), ``g_proj``, ``head_norm`` (mixer defaults) |
| ``gated_deltanet`` | ``q_proj, k_proj, v_proj, o_proj`` | ``conv_{q,k,v}`` (identity taps), ``b_proj`` (0: beta 1/2), ``a_proj`` (0), ``A_log, dt_bias`` (decay ``DECAY_RANGE``, dt 1), ``g_proj``, ``o_norm`` (defaults) |
| ``mamba2`` | ``in_proj``'s x <- v, B <- k, C <- q columns; ``out_proj`` <- o | ``in_proj``'s z (default) and dt (0) columns, ``conv`` (identity taps, bias 0), ``A_log, dt_bias`` (decay ``DECAY_RANGE``, dt 1), ``D`` (0), ``norm`` (ones) |

Rotary positions: the recurrent mixers have none, so the converted layers see
the un-rotated ``q, k`` (as in Mamba in the Llama; LoLCATs keeps RoPE inside
its linear attention). Order enters through the decay (and the convolutions),
and attention transfer learns the rest. What cannot start equal: a softmax is
not a finite feature map, and GLA's, Gated DeltaNet's and Mamba-2's output
norms and gates have no attention counterpart. The one setting where the
converted linear attention equals attention exactly (all scores equal,
``q = 0``: both average the values of the prefix) is a test.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effarch import mixers
from effarch.mixers.attention import AttentionConfig
from effarch.models.config import DEFAULT_MIXERS, LMConfig
from effarch.models.lm import LM

TARGETS = ("linear_attention", "gla", "gated_deltanet", "mamba2")
# The pattern letter a converted layer gets (the defaults of effarch.models.config.DEFAULT_MIXERS).
TARGET_LETTERS = {name: next(l for l, (m, _) in DEFAULT_MIXERS.items() if m == name) for name in TARGETS}
# Initial per-step decay of the converted layers, spread log-evenly in (1 - a) over the heads:
# memories of ~10 to ~1000 tokens, the first heads local, the last nearly attention's unbounded one.
DECAY_RANGE = (0.9, 0.999)
# Initial step size dt of Gated DeltaNet and Mamba-2 (softplus(dt_bias) = 1, so v is not rescaled).
DT_INIT = 1.0


def parse_layers(text: str, n_layers: int) -> tuple[int, ...] | None:
    """``"all"`` -> None (every attention layer); ``"0,1,3"`` -> ``(0, 1, 3)``.

    Raises:
      ValueError: naming the value and the valid form.
    """
    text = text.strip()
    if text == "all":
        return None
    try:
        layers = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--layers={text!r}; expected 'all' or comma-separated layer indices such as 0,1,2 "
                         f"(0 .. {n_layers - 1}).") from None
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad or len(set(layers)) != len(layers) or not layers:
        raise ValueError(f"--layers={text!r}; expected distinct indices in 0 .. {n_layers - 1} "
                         f"(the model has {n_layers} layers), or 'all'.")
    return tuple(sorted(layers))


def attention_layers(config: LMConfig) -> tuple[int, ...]:
    """Indices of the softmax-attention layers of ``config``."""
    return tuple(i for i, spec in enumerate(config.layer_specs) if isinstance(spec.mixer, AttentionConfig))


def _check_teacher(config: LMConfig, layers: Sequence[int]) -> None:
    if config.scan_layers:
        raise ValueError("linearize: the teacher has scan_layers=True; unstack its parameters "
                         "(effarch.models.lm.unstack_layer_params) and use scan_layers=False.")
    if config.projection != "dense":
        raise ValueError(f"linearize: the teacher has projection={config.projection!r}; expected 'dense'.")
    available = attention_layers(config)
    for i in layers:
        if i not in available:
            raise ValueError(f"linearize: layer {i} of pattern {config.layer_pattern!r} is not attention; "
                             f"the attention layers are {list(available)}.")
        att = config.layer_specs[i].mixer
        unsupported = {name: getattr(att, name) for name in ("qk_norm", "softcap", "use_bias", "out_bias",
                                                              "output_gate") if getattr(att, name)}
        if unsupported:
            raise ValueError(f"linearize: attention layer {i} has {unsupported}; converting supports plain "
                             "q/k/v/o projections (no QK-norm, softcap, biases or output gate).")
        if att.num_heads * att.dim_per_head != config.d_model:
            raise ValueError(f"linearize: attention layer {i} has num_heads * head_dim = {att.num_heads} * "
                             f"{att.dim_per_head} != d_model = {config.d_model}; the targets' value widths "
                             "are d_model.")


def target_options(target: str, attention: AttentionConfig) -> dict[str, Any]:
    """The target mixer's options that make its q/k/v/o shapes those of ``attention``."""
    h, d = attention.num_heads, attention.dim_per_head
    if target == "linear_attention":
        return {"num_heads": h, "feature_map": "hedgehog", "normalization": "sum", "use_short_conv": False}
    if target == "gla":
        return {"num_heads": h, "expand_k": 1.0, "expand_v": 1.0, "use_short_conv": False}
    if target == "gated_deltanet":
        return {"head_dim": d, "num_heads": h, "expand_v": 1}
    if target == "mamba2":
        return {"expand": 1, "head_dim": d, "d_state": d, "ngroups": h}
    raise ValueError(f"linearize: target={target!r}; expected one of {TARGETS}.")


def converted_config(teacher: LMConfig, target: str, layers: Sequence[int] | None = None,
                     options: Mapping[str, Any] | None = None) -> LMConfig:
    """The teacher's config with ``layers`` (None: every attention layer) replaced by ``target``.

    Args:
      teacher: the attention model's config (``scan_layers=False``, dense projections).
      target: one of ``TARGETS``.
      layers: indices of attention layers to convert; the others stay as they are.
      options: extra options of the target mixer (e.g. ``chunk_size``), over :func:`target_options`.
    """
    if target not in TARGETS:
        raise ValueError(f"linearize: target={target!r}; expected one of {TARGETS}.")
    layers = attention_layers(teacher) if layers is None else tuple(layers)
    _check_teacher(teacher, layers)
    letter = TARGET_LETTERS[target]
    used = set(teacher.layer_pattern)
    if letter in used:
        raise ValueError(f"linearize: the teacher's pattern {teacher.layer_pattern!r} already uses letter "
                         f"{letter!r}, the letter of {target!r}.")
    shapes = {(a.num_heads, a.dim_per_head) for a in (teacher.layer_specs[i].mixer for i in layers)}
    if len(shapes) > 1:
        raise ValueError(f"linearize: layers {list(layers)} have different attention shapes {sorted(shapes)}.")
    att = teacher.layer_specs[layers[0]].mixer
    mixer_options = {**target_options(target, att), **(options or {})}
    pattern = "".join(letter if i in layers else c for i, c in enumerate(teacher.layer_pattern))
    return dataclasses.replace(teacher, pattern=pattern, attention_ratio=None,
                               mixers={**teacher.mixers, letter: (target, mixer_options)})


def converted_layers(teacher: LMConfig, student: LMConfig) -> tuple[int, ...]:
    """Layers that are attention in ``teacher`` and something else in ``student``."""
    return tuple(i for i in attention_layers(teacher)
                 if not isinstance(student.layer_specs[i].mixer, AttentionConfig))


def _heads_repeated(kernel: jax.Array, kv_heads: int, heads: int) -> jax.Array:
    """``[D, Hkv*d] -> [D, H*d]``: each key/value head's columns repeated for its ``H / Hkv`` query heads."""
    dim, width = kernel.shape
    split = kernel.reshape(dim, kv_heads, width // kv_heads)
    return jnp.repeat(split, heads // kv_heads, axis=1).reshape(dim, -1)


def initial_decays(heads: int) -> np.ndarray:
    """``[H]`` per-step decays ``a`` with ``1 - a`` log-spaced over ``DECAY_RANGE``."""
    low, high = (math.log(1.0 - a) for a in DECAY_RANGE)
    return 1.0 - np.exp(np.linspace(low, high, heads))


def _identity_taps(kernel: jax.Array) -> jax.Array:
    """Conv taps ``[W, C]`` that pass the current token through: ``weight[W-1] = 1``, the rest 0."""
    return jnp.zeros_like(kernel).at[-1].set(1.0)


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def _map_layer(target: str, att: AttentionConfig, teacher: Mapping[str, Any], fresh: Mapping[str, Any]):
    """One converted mixer's parameters and new-parameter mask from an attention layer's parameters."""
    h, hkv, d = att.num_heads, att.kv_heads, att.dim_per_head
    wq = teacher["q_proj"]["kernel"]  # [D, H*d]
    wk = _heads_repeated(teacher["k_proj"]["kernel"], hkv, h)  # [D, H*d]
    wv = _heads_repeated(teacher["v_proj"]["kernel"], hkv, h)
    wo = teacher["o_proj"]["kernel"]  # [H*d, D]
    params = jax.tree.map(jnp.asarray, dict(fresh))
    new = jax.tree.map(jnp.ones_like, params)
    decays = initial_decays(h)

    def copy(name, kernel):
        params[name] = {"kernel": kernel.astype(params[name]["kernel"].dtype)}
        new[name] = {"kernel": jnp.zeros_like(kernel)}

    if target == "mamba2":
        di = h * d
        w = params["in_proj"]["kernel"]  # [D, z | x | B | C | dt] = [D, di | di | H d | H d | H]
        w = w.at[:, di:2 * di].set(wv).at[:, 2 * di:3 * di].set(wk).at[:, 3 * di:4 * di].set(wq)
        params["in_proj"] = {"kernel": w.at[:, 4 * di:].set(0.0)}
        new["in_proj"] = {"kernel": jnp.ones_like(w).at[:, di:4 * di].set(0.0)}
        copy("out_proj", wo)
        params["conv"] = {"kernel": _identity_taps(params["conv"]["kernel"]),
                          "bias": jnp.zeros_like(params["conv"]["bias"])}
        params["D"] = jnp.zeros_like(params["D"])
    else:
        for name, kernel in (("q_proj", wq), ("k_proj", wk), ("v_proj", wv), ("o_proj", wo)):
            copy(name, kernel)
    if target == "gla":
        cfg_norm = mixers.make_config("gla", att.d_model, **target_options("gla", att)).gate_logit_normalizer
        # log a = log_sigmoid(bias) / normalizer  =>  bias = logit(a ** normalizer), per channel of each head.
        per_head = np.log(decays ** cfg_norm) - np.log1p(-decays ** cfg_norm)
        bias = np.repeat(per_head, d).astype(np.float32)
        params["gk_up"] = {"kernel": jnp.zeros_like(params["gk_up"]["kernel"]),
                           "bias": jnp.asarray(bias, params["gk_up"]["bias"].dtype)}
    if target in ("gated_deltanet", "mamba2"):
        # log a = -exp(A_log) * softplus(dt_bias) with softplus(dt_bias) = DT_INIT.
        params["A_log"] = jnp.asarray(np.log(-np.log(decays) / DT_INIT), params["A_log"].dtype)
        params["dt_bias"] = jnp.full_like(params["dt_bias"], _softplus_inverse(DT_INIT))
    if target == "gated_deltanet":
        for stream in "qkv":
            params[f"conv_{stream}"] = {"kernel": _identity_taps(params[f"conv_{stream}"]["kernel"])}
        params["b_proj"] = {"kernel": jnp.zeros_like(params["b_proj"]["kernel"])}
        params["a_proj"] = {"kernel": jnp.zeros_like(params["a_proj"]["kernel"])}
    return params, new


def convert_params(teacher_config: LMConfig, teacher_params: Mapping[str, Any], student_config: LMConfig,
                   key: jax.Array) -> tuple[dict[str, Any], dict[str, Any]]:
    """The student's parameters from the teacher's, and the mask of the new ones.

    Args:
      teacher_config: the attention model's config.
      teacher_params: its parameters (``variables["params"]``, unboxed).
      student_config: :func:`converted_config` of the teacher.
      key: initialises the new parameters that have no attention counterpart.

    Returns:
      ``(params, new)``: the student's parameters, and a tree of the same
      shapes, 1.0 where the value was initialised fresh and 0.0 where it came
      from the teacher (embeddings, norms, MLPs, kept attention layers, and
      the converted layers' q/k/v/o).
    """
    layers = converted_layers(teacher_config, student_config)
    _check_teacher(teacher_config, layers)
    tokens = jnp.zeros((1, 8), jnp.int32)  # the parameter shapes do not depend on the length
    student = nn.unbox(jax.jit(lambda k: LM(config=student_config).init(k, tokens)["params"])(key))
    teacher_params = nn.unbox(teacher_params)
    params = jax.tree.map(jnp.asarray, dict(teacher_params))
    new = jax.tree.map(jnp.zeros_like, params)
    for i in layers:
        name = f"layer_{i}"
        target = student_config.layer_specs[i].mixer
        mixed, fresh = _map_layer(mixers_name(target),
                                  teacher_config.layer_specs[i].mixer, teacher_params[name]["mixer"],
                                  student[name]["mixer"])
        params[name] = {**params[name], "mixer": mixed}
        new[name] = {**new[name], "mixer": fresh}
    expected = jax.tree.map(lambda x: (x.shape, x.dtype), student)
    got = jax.tree.map(lambda x: (x.shape, x.dtype), params)
    if jax.tree.structure(expected) != jax.tree.structure(got) or expected != got:
        raise ValueError("linearize: the converted parameters do not match the student's shapes; "
                         "is student_config converted_config(teacher_config, ...)?")
    return params, new


def mixers_name(config: mixers.MixerConfig) -> str:
    """The registered name of a mixer config (e.g. ``"gla"``)."""
    return next(n for n in mixers.names() if type(config) is mixers.config_class(n))


def capture_mixers(model: nn.Module, params: Mapping[str, Any], tokens: jax.Array, *,
                   segment_ids: jax.Array | None = None, layers: Sequence[int] | None = None
                   ) -> dict[int, tuple[jax.Array, jax.Array]]:
    """Each attention layer's input and output in one forward pass of the teacher.

    Args:
      model: the teacher ``LM`` (unscanned).
      params: its parameters.
      tokens, segment_ids: ``[B,T]``.
      layers: which layers (None: every attention layer).

    Returns:
      ``{layer: (x [B,T,D] the mixer's input (after its norm), y [B,T,D] its output)}``.
    """
    layers = attention_layers(model.config) if layers is None else tuple(layers)
    wanted = {f"layer_{i}" for i in layers}

    def keep(module, method_name):
        parent = module.scope.path[-2] if len(module.scope.path) > 1 else None
        return method_name == "__call__" and parent in wanted and module.name in ("mixer_norm", "mixer")

    _, state = model.apply({"params": params}, tokens, segment_ids=segment_ids, capture_intermediates=keep,
                           mutable=["intermediates"])
    inter = state["intermediates"]
    return {i: (inter[f"layer_{i}"]["mixer_norm"]["__call__"][0], inter[f"layer_{i}"]["mixer"]["__call__"][0][0])
            for i in layers}


def transfer_loss(student_config: LMConfig, student_params: Mapping[str, Any],
                  captured: Mapping[int, tuple[jax.Array, jax.Array]], *, segment_ids: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """Attention transfer: each converted layer's output against its attention layer's, from the same input.

    The loss of a layer is its MSE divided by the mean square of the attention
    output (a relative MSE, so layers of different output scale weigh alike);
    the total is the mean over the layers of ``captured``.

    Returns:
      ``(loss, per_layer [L])`` float32.
    """
    losses = []
    for i, (x, target) in sorted(captured.items()):
        mixer = mixers.from_config(student_config.layer_specs[i].mixer)
        y, _ = mixer.apply({"params": student_params[f"layer_{i}"]["mixer"]}, x, segment_ids=segment_ids)
        t32 = target.astype(jnp.float32)
        err = jnp.mean(jnp.square(y.astype(jnp.float32) - t32)) / (jnp.mean(jnp.square(t32)) + 1e-12)
        losses.append(err)
    per_layer = jnp.stack(losses)
    return jnp.mean(per_layer), per_layer


__all__ = ["DECAY_RANGE", "DT_INIT", "TARGETS", "TARGET_LETTERS", "attention_layers",
           "capture_mixers", "convert_params", "converted_config", "converted_layers", "initial_decays",
           "mixers_name", "parse_layers", "target_options", "transfer_loss"]
