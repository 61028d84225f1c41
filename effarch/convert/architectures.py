"""The Hugging Face layouts effarch reads and writes: config fields and tensor names.

Each :class:`Architecture` says, for one ``transformers`` class, how its
``config.json`` maps to an :class:`~effarch.models.LMConfig` (and back) and
which safetensors tensor is which effarch parameter, in which layout. The
machinery that applies a table (reading, checking, writing) is in
``effarch/convert/hf.py``; nothing here touches files.

Both Mamba layouts are the same model around a different mixer::

    backbone.embeddings.weight          [vocab, D]       embed/embedding
    backbone.layers.{i}.norm.weight     [D]              layer_{i}/mixer_norm/scale
    backbone.layers.{i}.mixer.*                          layer_{i}/mixer/*   (per architecture)
    backbone.norm_f.weight              [D]              final_norm/scale
    lm_head.weight                      [vocab, D]       unembed [D, vocab]  (absent when tied)

so an effarch model of one pattern letter, ``mlp="none"`` (the HF blocks have
no MLP) and RMSNorm epsilon ``layer_norm_epsilon``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from effarch.mixers.base import MixerConfig

# Mamba2Config's default time_step_limit: no clamp of the step sizes.
NO_TIME_STEP_LIMIT = (0.0, math.inf)


class Layout(NamedTuple):
    """How one tensor is stored on each side.

    Attributes:
      to_hf: effarch array -> HF array.
      from_hf: HF array -> effarch array.
      hf_shape: effarch shape -> HF shape.
    """

    to_hf: Callable[[np.ndarray], np.ndarray]
    from_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


LAYOUTS = {
    "same": Layout(lambda a: a, lambda a: a, lambda s: tuple(s)),
    # flax Dense kernel [in, out] <-> torch Linear weight [out, in].
    "linear": Layout(lambda a: a.T, lambda a: a.T, lambda s: tuple(s[::-1])),
    # ShortConv taps [W, C] (w[W-1] weighs the current token) <-> depthwise
    # torch Conv1d weight [C, 1, W] with padding W-1 (the same tap order).
    "conv": Layout(lambda a: a.T[:, None, :], lambda a: a[:, 0, :].T, lambda s: (s[1], 1, s[0])),
}


class Tensor(NamedTuple):
    """One HF tensor and the effarch parameter it is.

    Attributes:
      hf: the safetensors name; ``{i}`` stands for the layer index.
      effarch: the path under ``params``; ``{i}`` likewise.
      layout: a key of ``LAYOUTS``.
    """

    hf: str
    effarch: tuple[str, ...]
    layout: str = "same"


def _mixer(hf_name: str, effarch_path: str, layout: str = "same") -> Tensor:
    """A mixer tensor: ``backbone.layers.{i}.mixer.<hf_name>`` <-> ``layer_{i}/mixer/<path>``."""
    return Tensor(f"backbone.layers.{{i}}.mixer.{hf_name}", ("layer_{i}", "mixer", *effarch_path.split("/")), layout)


# The Mamba backbone around the mixer (module docstring).
BACKBONE = (
    Tensor("backbone.embeddings.weight", ("embed", "embedding")),
    Tensor("backbone.norm_f.weight", ("final_norm", "scale")),
)
BACKBONE_LAYER = (Tensor("backbone.layers.{i}.norm.weight", ("layer_{i}", "mixer_norm", "scale")),)
LM_HEAD = Tensor("lm_head.weight", ("unembed",), "linear")
EMBEDDING = BACKBONE[0]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Architecture:
    """One ``transformers`` causal-LM class as effarch sees it.

    Attributes:
      name: the class name in ``config.json``'s ``architectures``.
      model_type: its ``model_type``.
      mixer: the effarch mixer of every layer.
      letter: the pattern letter effarch gives that mixer.
      defaults: the HF config class's defaults of every field read here, for
        ``config.json`` files that leave fields out.
      fixed: HF fields effarch implements at one value only (e.g.
        ``use_bias=False``); another value is refused.
      mixer_options: HF config (defaults filled) -> effarch mixer options.
      hf_fields: ``(mixer config, LMConfig)`` -> the HF mixer fields.
      tensors: model-level tensors besides the LM head.
      layer_tensors: per-layer tensors (names with ``{i}``).
    """

    name: str
    model_type: str
    mixer: str
    letter: str
    defaults: Mapping[str, Any]
    fixed: Mapping[str, Any]
    mixer_options: Callable[[Mapping[str, Any]], dict[str, Any]]
    hf_fields: Callable[[MixerConfig, Any], dict[str, Any]]
    tensors: tuple[Tensor, ...] = BACKBONE
    layer_tensors: tuple[Tensor, ...] = ()


def integer_expand(hf: Mapping[str, Any]) -> int:
    """``expand`` as an int; HF allows a float, effarch's inner width is ``expand * D``."""
    expand = hf["expand"]
    if float(expand) != int(expand):
        raise ValueError(f"expand={expand!r}; effarch's Mamba mixers need an integer expansion factor.")
    return int(expand)


def _step_range(hf: Mapping[str, Any]) -> dict[str, float]:
    """The initial step-size range (initialisation only; kept for the round trip)."""
    return dict(dt_min=hf["time_step_min"], dt_max=hf["time_step_max"], dt_init_floor=hf["time_step_floor"])


def _hf_step_range(cfg) -> dict[str, float]:
    return dict(time_step_min=cfg.dt_min, time_step_max=cfg.dt_max, time_step_floor=cfg.dt_init_floor)


# Fields both Mamba layouts fix: effarch's mixers have no projection biases,
# always a convolution bias, and SiLU.
_MAMBA_FIXED = {"use_bias": False, "use_conv_bias": True, "hidden_act": "silu"}
_MAMBA_DEFAULTS = {
    **_MAMBA_FIXED,
    "layer_norm_epsilon": 1e-5,
    "expand": 2,
    "conv_kernel": 4,
    "residual_in_fp32": True,
    "time_step_min": 0.001,
    "time_step_max": 0.1,
    "time_step_floor": 1e-4,
}


def _mamba_options(hf: Mapping[str, Any]) -> dict[str, Any]:
    expand = integer_expand(hf)
    inner = expand * hf["hidden_size"]
    if hf.get("intermediate_size", inner) != inner:
        raise ValueError(f"intermediate_size={hf['intermediate_size']}; effarch's mamba mixer has inner width "
                         f"expand * hidden_size = {inner}.")
    rank = hf["time_step_rank"]
    rank = math.ceil(hf["hidden_size"] / 16) if rank == "auto" else int(rank)
    return dict(d_state=hf["state_size"], d_conv=hf["conv_kernel"], expand=expand, dt_rank=rank, **_step_range(hf))


def _mamba_fields(cfg, lm_config) -> dict[str, Any]:
    del lm_config
    return dict(state_size=cfg.d_state, conv_kernel=cfg.d_conv, expand=cfg.expand, intermediate_size=cfg.d_inner,
                time_step_rank=cfg.rank, **_hf_step_range(cfg))


def _mamba2_options(hf: Mapping[str, Any]) -> dict[str, Any]:
    expand = integer_expand(hf)
    inner = expand * hf["hidden_size"]
    if hf["num_heads"] * hf["head_dim"] != inner:
        raise ValueError(f"num_heads={hf['num_heads']}, head_dim={hf['head_dim']}; their product must be the "
                         f"inner width expand * hidden_size = {inner}.")
    limit = tuple(float(v) for v in hf["time_step_limit"])
    if limit != NO_TIME_STEP_LIMIT:
        raise ValueError(f"time_step_limit={list(hf['time_step_limit'])}; effarch's mamba2 mixer does not clamp "
                         f"its step sizes, so only {list(NO_TIME_STEP_LIMIT)} (no clamp) is supported.")
    # Mamba2Mixer's gated RMSNorm uses the one layer_norm_epsilon too.
    return dict(d_state=hf["state_size"], d_conv=hf["conv_kernel"], expand=expand, head_dim=hf["head_dim"],
                ngroups=hf["n_groups"], chunk_size=hf["chunk_size"], norm_eps=hf["layer_norm_epsilon"],
                **_step_range(hf))


def _mamba2_fields(cfg, lm_config) -> dict[str, Any]:
    if cfg.norm_eps != lm_config.norm_eps:
        raise ValueError(f"the mamba2 gated norm has norm_eps={cfg.norm_eps} and the block norms norm_eps="
                         f"{lm_config.norm_eps}; Mamba2Config has one layer_norm_epsilon for both.")
    return dict(state_size=cfg.d_state, conv_kernel=cfg.d_conv, expand=cfg.expand, num_heads=cfg.num_heads,
                head_dim=cfg.head_dim, n_groups=cfg.ngroups, chunk_size=cfg.chunk_size,
                time_step_limit=list(NO_TIME_STEP_LIMIT), time_step_rank=math.ceil(cfg.d_model / 16),
                **_hf_step_range(cfg))


MAMBA = Architecture(
    name="MambaForCausalLM",
    model_type="mamba",
    mixer="mamba",
    letter="S",
    defaults={**_MAMBA_DEFAULTS, "vocab_size": 50280, "hidden_size": 768, "num_hidden_layers": 32, "state_size": 16,
              "time_step_rank": "auto", "tie_word_embeddings": True},
    fixed=_MAMBA_FIXED,
    mixer_options=_mamba_options,
    hf_fields=_mamba_fields,
    layer_tensors=BACKBONE_LAYER + (
        _mixer("in_proj.weight", "in_proj/kernel", "linear"),  # [2 E*D, D]: x, then the gate z
        _mixer("conv1d.weight", "conv/kernel", "conv"),
        _mixer("conv1d.bias", "conv/bias"),
        _mixer("x_proj.weight", "x_proj/kernel", "linear"),  # [R + 2N, E*D]: dt, B, C
        _mixer("dt_proj.weight", "dt_proj/kernel", "linear"),
        _mixer("dt_proj.bias", "dt_bias"),
        _mixer("A_log", "A_log"),
        _mixer("D", "D"),
        _mixer("out_proj.weight", "out_proj/kernel", "linear"),
    ),
)

MAMBA2 = Architecture(
    name="Mamba2ForCausalLM",
    model_type="mamba2",
    mixer="mamba2",
    letter="M",
    defaults={**_MAMBA_DEFAULTS, "vocab_size": 32768, "hidden_size": 4096, "num_hidden_layers": 64,
              "state_size": 128, "num_heads": 128, "head_dim": 64, "n_groups": 8,
              "chunk_size": 256, "time_step_limit": NO_TIME_STEP_LIMIT, "tie_word_embeddings": False},
    fixed=_MAMBA_FIXED,
    mixer_options=_mamba2_options,
    hf_fields=_mamba2_fields,
    layer_tensors=BACKBONE_LAYER + (
        _mixer("in_proj.weight", "in_proj/kernel", "linear"),  # [E*D + conv_dim + H, D]: z, xBC, dt
        _mixer("conv1d.weight", "conv/kernel", "conv"),
        _mixer("conv1d.bias", "conv/bias"),
        _mixer("dt_bias", "dt_bias"),
        _mixer("A_log", "A_log"),
        _mixer("D", "D"),
        _mixer("norm.weight", "norm/scale"),
        _mixer("out_proj.weight", "out_proj/kernel", "linear"),
    ),
)

# Every layout, by the class name ``config.json`` gives in ``architectures``.
ARCHITECTURES = {arch.name: arch for arch in (MAMBA, MAMBA2)}
