"""The Hugging Face layouts effarch reads and writes: config fields and tensor names.

Each :class:`Architecture` says, for one ``transformers`` class, how its
``config.json`` maps to an :class:`~effarch.models.LMConfig` (and back) and
which safetensors tensors are which effarch parameters, in which layout. The
machinery that applies a table (reading, checking, writing) is in
``effarch/convert/hf.py``; nothing here touches files.

The tensor tables, per layer ``i`` (``{i}``), effarch paths under ``params``:

    Mamba, Mamba-2          backbone.embeddings / backbone.norm_f / lm_head
      backbone.layers.{i}.norm.weight            layer_{i}/mixer_norm/scale
      backbone.layers.{i}.mixer.*                layer_{i}/mixer/*        (mamba / mamba2)
    RecurrentGemma          model.embed_tokens / model.final_norm / lm_head
      model.layers.{i}.temporal_pre_norm.weight  layer_{i}/mixer_norm/scale   (1 + weight)
      model.layers.{i}.temporal_block.*          layer_{i}/mixer/*        (rglru / attention)
      model.layers.{i}.channel_pre_norm.weight   layer_{i}/mlp_norm/scale
      model.layers.{i}.mlp_block.*               layer_{i}/mlp/*          (GeGLU with biases)
    Jamba                   model.embed_tokens / model.final_layernorm / lm_head
      model.layers.{i}.input_layernorm.weight    layer_{i}/mixer_norm/scale
      model.layers.{i}.mamba.* | .self_attn.*    layer_{i}/mixer/*        (mamba / attention)
      model.layers.{i}.pre_ff_layernorm.weight   layer_{i}/mlp_norm/scale
      model.layers.{i}.feed_forward.*            layer_{i}/mlp/*          (SwiGLU / MoE)
    Qwen3-Next              model.embed_tokens / model.norm / lm_head
      model.layers.{i}.input_layernorm.weight    layer_{i}/mixer_norm/scale   (1 + weight)
      model.layers.{i}.linear_attn.* | .self_attn.*   layer_{i}/mixer/*   (gated_deltanet / gated attention)
      model.layers.{i}.post_attention_layernorm.weight   layer_{i}/mlp_norm/scale
      model.layers.{i}.mlp.*                     layer_{i}/mlp/*          (SwiGLU / MoE with a shared expert)

A :class:`Tensor` groups HF tensors with effarch parameters: usually one with
one, but Qwen3-Next fuses projections that effarch keeps apart (``in_proj_qkvz``
holds q, k, v and the output gate, head by head), and MoE experts are ``E`` HF
tensors per effarch parameter
(``experts.{j}.gate_proj.weight [F, D]`` <-> ``mlp/gate [E, D, F]``, the form
``save_pretrained`` writes and the Hub holds), or, in transformers 5's fused
in-memory form, one HF tensor for two effarch parameters
(``experts.gate_up_proj [E, 2F, D]`` <-> ``mlp/gate``, ``mlp/up``). from_hf
reads either spelling (``Architecture.variants``); to_hf writes the first.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from effarch import mixers
from effarch.layers.rotary import rotary_dim

# Mamba2Config's default time_step_limit: no clamp of the step sizes.
NO_TIME_STEP_LIMIT = (0.0, math.inf)


class Layout(NamedTuple):
    """How a group of tensors is stored on each side.

    Attributes:
      to_hf: effarch arrays -> HF arrays (in the group's orders).
      from_hf: HF arrays -> effarch arrays.
      hf_shapes: effarch shapes -> HF shapes.
    """

    to_hf: Callable[[Sequence[np.ndarray]], list[np.ndarray]]
    from_hf: Callable[[Sequence[np.ndarray]], list[np.ndarray]]
    hf_shapes: Callable[[Sequence[tuple[int, ...]]], list[tuple[int, ...]]]


def one_to_one(to_hf: Callable, from_hf: Callable, hf_shape: Callable) -> Layout:
    """A layout of one HF tensor and one effarch parameter."""
    return Layout(lambda a: [to_hf(a[0])], lambda a: [from_hf(a[0])], lambda s: [tuple(hf_shape(s[0]))])


def _swap_last(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2)


def _swapped(shape) -> tuple[int, ...]:
    return (*shape[:-2], shape[-1], shape[-2])


def per_expert(num_experts: int) -> Layout:
    """``[E, in, out]`` (effarch) <-> ``E`` torch Linear weights ``[out, in]``, one per expert."""
    return Layout(to_hf=lambda a: [a[0][j].T for j in range(num_experts)],
                  from_hf=lambda a: [np.stack([w.T for w in a])],
                  hf_shapes=lambda s: [(s[0][2], s[0][1])] * num_experts)


def head_groups(groups: int, widths: Sequence[int]) -> Layout:
    """Kernels ``[D, G * w_i]`` (effarch) <-> one torch Linear weight ``[G * sum(w), D]`` whose rows go group by
    group, each ``[w_0 rows, w_1 rows, ...]`` (Qwen3-Next's ``in_proj_qkvz``, ``in_proj_ba``, gated ``q_proj``)."""
    total = sum(widths)
    cuts = np.cumsum(widths)[:-1]

    def to_hf(arrays):
        d = arrays[0].shape[0]
        parts = [a.reshape(d, groups, w) for a, w in zip(arrays, widths)]
        return [np.concatenate(parts, axis=2).reshape(d, groups * total).T]

    def from_hf(arrays):
        d = arrays[0].shape[1]
        grouped = arrays[0].T.reshape(d, groups, total)
        return [part.reshape(d, -1) for part in np.split(grouped, cuts, axis=2)]

    return Layout(to_hf, from_hf, lambda s: [(groups * total, s[0][0])])


def concatenated_convs(widths: Sequence[int]) -> Layout:
    """ShortConv taps ``[W, C_i]`` (effarch) <-> one depthwise torch Conv1d ``[sum(C), 1, W]`` over the
    concatenated channels (Qwen3-Next's ``conv1d`` over ``[q, k, v]``)."""
    cuts = np.cumsum(widths)[:-1]
    return Layout(to_hf=lambda a: [np.concatenate([k.T for k in a])[:, None, :]],
                  from_hf=lambda a: [part.T for part in np.split(a[0][:, 0, :], cuts)],
                  hf_shapes=lambda s: [(sum(widths), 1, s[0][0])])


def _fused_gate_up_from_hf(a):
    half = a[0].shape[1] // 2
    return [_swap_last(a[0][:, :half]), _swap_last(a[0][:, half:])]


LAYOUTS = {
    "same": one_to_one(lambda a: a, lambda a: a, lambda s: s),
    # flax Dense kernel [in, out] <-> torch Linear weight [out, in].
    "linear": one_to_one(lambda a: a.T, lambda a: a.T, lambda s: s[::-1]),
    # ShortConv taps [W, C] (w[W-1] weighs the current token) <-> depthwise
    # torch Conv1d weight [C, 1, W] with padding W-1 (the same tap order).
    "conv": one_to_one(lambda a: a.T[:, None, :], lambda a: a[:, 0, :].T, lambda s: (s[1], 1, s[0])),
    # transformers 5's fused experts: gate, up [E, D, F] <-> gate_up_proj [E, 2F, D] (gate rows first).
    "fused_gate_up": Layout(to_hf=lambda a: [_swap_last(np.concatenate(a, axis=-1))],
                            from_hf=_fused_gate_up_from_hf,
                            hf_shapes=lambda s: [(s[0][0], 2 * s[0][2], s[0][1])]),
    # ... and down [E, F, D] <-> down_proj [E, D, F].
    "fused_down": one_to_one(_swap_last, _swap_last, _swapped),
}


class Tensor(NamedTuple):
    """HF tensors and the effarch parameters they hold (one and one, most often).

    Attributes:
      hf: the safetensors names.
      effarch: the paths under ``params``.
      layout: a key of ``LAYOUTS``, or a :class:`Layout`.
    """

    hf: tuple[str, ...]
    effarch: tuple[tuple[str, ...], ...]
    layout: str | Layout = "same"

    def under(self, hf_prefix: str, effarch_prefix: str) -> Tensor:
        """The same group with ``hf_prefix`` before every name and ``effarch_prefix`` ("a/b/") before every path."""
        parents = path(effarch_prefix)
        return Tensor(tuple(hf_prefix + n for n in self.hf), tuple(parents + p for p in self.effarch), self.layout)


def path(text: str) -> tuple[str, ...]:
    """An effarch parameter path written "a/b/c"."""
    return tuple(p for p in text.split("/") if p)


def tensor(hf: str, effarch: str, layout: str | Layout = "same") -> Tensor:
    """One HF tensor <-> one effarch parameter (its path written "a/b/c")."""
    return Tensor((hf,), (path(effarch),), layout)


def under(hf_prefix: str, effarch_prefix: str, tensors: Sequence[Tensor]) -> list[Tensor]:
    return [t.under(hf_prefix, effarch_prefix) for t in tensors]


LM_HEAD = tensor("lm_head.weight", "unembed", "linear")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Architecture:
    """One ``transformers`` causal-LM class as effarch sees it.

    Attributes:
      name: the class name in ``config.json``'s ``architectures``.
      model_type: its ``model_type``.
      mixers: the effarch mixers its layers are made of; the first is in
        every model of the layout, the others may be.
      selects: mixer -> options that pick this layout over another one of the
        same mixers (Mamba: a ``mamba`` mixer without Jamba's dt/B/C norms).
      defaults: the HF config class's defaults of every field read here, for
        ``config.json`` files that leave fields out.
      fixed: HF fields effarch implements at one value only (e.g.
        ``use_bias=False``); another value is refused.
      lm_fields: HF config (defaults filled) -> the LMConfig fields besides
        ``vocab_size``, ``d_model``, ``n_layers`` and ``tie_embeddings``.
      hf_fields: LMConfig -> the HF config fields besides those four; raises a
        ValueError naming what the layout cannot hold.
      tensors: ``(LMConfig, variant)`` -> every tensor but the LM head.
      embedding: the HF name of the embedding (the tied head's twin).
      variants: the spellings of the tensor table on disk; to_hf writes the first.
      ignored: name prefixes of stored tensors from_hf leaves unread (parts
        of the checkpoint transformers' causal LM does not load either).
      padding_idx: the HF model's embedding is ``nn.Embedding(...,
        padding_idx=pad_token_id)`` (no lookup gradient for the pad token):
        from_hf carries ``pad_token_id`` into ``LMConfig``, to_hf writes it.
    """

    name: str
    model_type: str
    mixers: tuple[str, ...]
    selects: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    defaults: Mapping[str, Any]
    fixed: Mapping[str, Any]
    lm_fields: Callable[[Mapping[str, Any]], dict[str, Any]]
    hf_fields: Callable[[Any], dict[str, Any]]
    tensors: Callable[[Any, str], list[Tensor]]
    embedding: str
    variants: tuple[str, ...] = ("default",)
    ignored: tuple[str, ...] = ()
    padding_idx: bool = False


# --- shared pieces ---------------------------------------------------------------------------


def integer_expand(expand: Any, field: str = "expand") -> int:
    """``expand`` as an int; HF allows a float, effarch's inner width is ``expand * D``."""
    if float(expand) != int(expand):
        raise ValueError(f"{field}={expand!r}; effarch's Mamba mixers need an integer expansion factor.")
    return int(expand)


def check_model(config, arch: str, **expected) -> None:
    """LMConfig fields the layout has at one value only; a ValueError names every other value."""
    problems = [f"{field}={getattr(config, field)!r}, but {arch} has {field}={value!r}"
                for field, value in expected.items() if getattr(config, field) != value]
    if problems:
        raise ValueError("; ".join(problems))


def check_mixer(cfg, mixer: str, arch: str, **expected) -> None:
    """Mixer options the layout has at one value only."""
    problems = [f"the {mixer} layers have {field}={getattr(cfg, field)!r}, but {arch}'s have {field}={value!r}"
                for field, value in expected.items() if getattr(cfg, field) != value]
    if problems:
        raise ValueError("; ".join(problems))


def mixer_names(config) -> list[str]:
    """Each layer's mixer by its registered name (``"mamba"``, ``"attention"``, ...)."""
    return [mixers.from_config(spec.mixer).registry_name for spec in config.layer_specs]


def mixer_config(config, name: str):
    """The config of mixer ``name`` (of its first layer; hf.py checks they are one), or None if no layer uses it."""
    found = [spec.mixer for spec, n in zip(config.layer_specs, mixer_names(config)) if n == name]
    return found[0] if found else None


def compact_pattern(letters: str) -> str:
    """``letters`` (one per layer) as the shortest LMConfig pattern that tiles to them (its length divides)."""
    n = len(letters)
    return next(letters[:p] for p in range(1, n + 1) if n % p == 0 and letters[:p] * (n // p) == letters)


def shortest_cycle(items: Sequence[Any]) -> list[Any]:
    """The shortest prefix whose repetition, cut to ``len(items)``, gives ``items`` (its length need not divide)."""
    n = len(items)
    return next(list(items[:p]) for p in range(1, n + 1) if (list(items[:p]) * n)[:n] == list(items))


def period_and_offset(indices: set[int], n_layers: int, what: str) -> tuple[int, int]:
    """``(p, o)``, ``o < p``, with ``{i < n_layers : i % p == o} == indices``; the smallest p."""
    if not indices:
        return n_layers + 1, n_layers  # no layer i < n_layers has i % (n + 1) == n
    offset = min(indices)
    for p in range(offset + 1, n_layers + 1):
        if {i for i in range(n_layers) if i % p == offset} == indices:
            return p, offset
    raise ValueError(f"the {what} are layers {sorted(indices)}, which no period and offset describe "
                     f"(i % period == offset)")


def _step_range(hf: Mapping[str, Any]) -> dict[str, float]:
    """The initial step-size range (initialisation only; kept for the round trip)."""
    return dict(dt_min=hf["time_step_min"], dt_max=hf["time_step_max"], dt_init_floor=hf["time_step_floor"])


def _hf_step_range(cfg) -> dict[str, float]:
    return dict(time_step_min=cfg.dt_min, time_step_max=cfg.dt_max, time_step_floor=cfg.dt_init_floor)


def _dt_rank(rank: Any, hidden_size: int) -> int:
    return math.ceil(hidden_size / 16) if rank == "auto" else int(rank)


# The effarch mamba mixer's tensors, as MambaMixer and JambaMambaMixer name them.
MAMBA_MIXER = (
    tensor("in_proj.weight", "in_proj/kernel", "linear"),  # [2 E*D, D]: x, then the gate z
    tensor("conv1d.weight", "conv/kernel", "conv"),
    tensor("conv1d.bias", "conv/bias"),
    tensor("x_proj.weight", "x_proj/kernel", "linear"),  # [R + 2N, E*D]: dt, B, C
    tensor("dt_proj.weight", "dt_proj/kernel", "linear"),
    tensor("dt_proj.bias", "dt_bias"),
    tensor("A_log", "A_log"),
    tensor("D", "D"),
    tensor("out_proj.weight", "out_proj/kernel", "linear"),
)
# LlamaAttention's projections as the attention mixer's (``{q,k,v,o}_proj``), without biases.
ATTENTION_PROJECTIONS = tuple(tensor(f"{p}_proj.weight", f"{p}_proj/kernel", "linear") for p in "qkvo")
ATTENTION_QKV_BIASES = tuple(tensor(f"{p}_proj.bias", f"{p}_proj/bias") for p in "qkv")


def gated_mlp(hf_names: Mapping[str, str], bias: bool) -> list[Tensor]:
    """A GatedMLP's ``gate``, ``up``, ``down`` as HF Linears ``hf_names[gate]`` etc."""
    out = []
    for ours, theirs in hf_names.items():
        out.append(tensor(f"{theirs}.weight", f"{ours}/kernel", "linear"))
        if bias:
            out.append(tensor(f"{theirs}.bias", f"{ours}/bias"))
    return out


# --- Mamba and Mamba-2 -----------------------------------------------------------------------


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


def _mamba_family_fields(mixer: str, letter: str, options: dict[str, Any], hf: Mapping[str, Any]) -> dict[str, Any]:
    return dict(pattern=letter, mixers={letter: (mixer, options)}, mlp="none",
                norm_eps=float(hf["layer_norm_epsilon"]), residual_in_fp32=bool(hf["residual_in_fp32"]))


def _check_mamba_family_model(config, arch: str) -> None:
    if config.mlp != "none":
        raise ValueError(f"mlp={config.mlp!r}, but {arch} blocks have no MLP (use mlp='none')")
    check_model(config, arch, embed_scale=None, logits_softcap=None, norm_zero_centered=False)


def _mamba_backbone(mixer_tensors: Sequence[Tensor]):
    """The tensors of a Mamba backbone (module docstring) around ``mixer_tensors``."""

    def tensors(config, variant):
        del variant
        out = [tensor("backbone.embeddings.weight", "embed/embedding"),
               tensor("backbone.norm_f.weight", "final_norm/scale")]
        for i in range(config.n_layers):
            out.append(tensor(f"backbone.layers.{i}.norm.weight", f"layer_{i}/mixer_norm/scale"))
            out += under(f"backbone.layers.{i}.mixer.", f"layer_{i}/mixer/", mixer_tensors)
        return out

    return tensors


def _mamba_lm_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    expand = integer_expand(hf["expand"])
    inner = expand * hf["hidden_size"]
    if hf.get("intermediate_size", inner) != inner:
        raise ValueError(f"intermediate_size={hf['intermediate_size']}; effarch's mamba mixer has inner width "
                         f"expand * hidden_size = {inner}.")
    options = dict(d_state=hf["state_size"], d_conv=hf["conv_kernel"], expand=expand,
                   dt_rank=_dt_rank(hf["time_step_rank"], hf["hidden_size"]), **_step_range(hf))
    return _mamba_family_fields("mamba", "S", options, hf)


def _mamba_hf_fields(config) -> dict[str, Any]:
    _check_mamba_family_model(config, MAMBA.name)
    cfg = mixer_config(config, "mamba")
    return dict(state_size=cfg.d_state, conv_kernel=cfg.d_conv, expand=cfg.expand, intermediate_size=cfg.d_inner,
                time_step_rank=cfg.rank, layer_norm_epsilon=config.norm_eps,
                residual_in_fp32=config.residual_in_fp32, **_hf_step_range(cfg))


def _mamba2_lm_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    expand = integer_expand(hf["expand"])
    inner = expand * hf["hidden_size"]
    if hf["num_heads"] * hf["head_dim"] != inner:
        raise ValueError(f"num_heads={hf['num_heads']}, head_dim={hf['head_dim']}; their product must be the "
                         f"inner width expand * hidden_size = {inner}.")
    limit = tuple(float(v) for v in hf["time_step_limit"])
    if limit != NO_TIME_STEP_LIMIT:
        raise ValueError(f"time_step_limit={list(hf['time_step_limit'])}; effarch's mamba2 mixer does not clamp "
                         f"its step sizes, so only {list(NO_TIME_STEP_LIMIT)} (no clamp) is supported.")
    # Mamba2Mixer's gated RMSNorm uses the one layer_norm_epsilon too.
    options = dict(d_state=hf["state_size"], d_conv=hf["conv_kernel"], expand=expand, head_dim=hf["head_dim"],
                   ngroups=hf["n_groups"], chunk_size=hf["chunk_size"], norm_eps=hf["layer_norm_epsilon"],
                   **_step_range(hf))
    return _mamba_family_fields("mamba2", "M", options, hf)


def _mamba2_hf_fields(config) -> dict[str, Any]:
    _check_mamba_family_model(config, MAMBA2.name)
    cfg = mixer_config(config, "mamba2")
    if cfg.norm_eps != config.norm_eps:
        raise ValueError(f"the mamba2 gated norm has norm_eps={cfg.norm_eps} and the block norms norm_eps="
                         f"{config.norm_eps}; Mamba2Config has one layer_norm_epsilon for both.")
    return dict(state_size=cfg.d_state, conv_kernel=cfg.d_conv, expand=cfg.expand, num_heads=cfg.num_heads,
                head_dim=cfg.head_dim, n_groups=cfg.ngroups, chunk_size=cfg.chunk_size,
                time_step_limit=list(NO_TIME_STEP_LIMIT), time_step_rank=math.ceil(cfg.d_model / 16),
                layer_norm_epsilon=config.norm_eps, residual_in_fp32=config.residual_in_fp32,
                **_hf_step_range(cfg))


MAMBA = Architecture(
    name="MambaForCausalLM",
    model_type="mamba",
    mixers=("mamba",),
    selects={"mamba": {"dt_bc_norm": False}},
    defaults={**_MAMBA_DEFAULTS, "vocab_size": 50280, "hidden_size": 768, "num_hidden_layers": 32, "state_size": 16,
              "time_step_rank": "auto", "tie_word_embeddings": True},
    fixed=_MAMBA_FIXED,
    lm_fields=_mamba_lm_fields,
    hf_fields=_mamba_hf_fields,
    tensors=_mamba_backbone(MAMBA_MIXER),
    embedding="backbone.embeddings.weight",
)

MAMBA2 = Architecture(
    name="Mamba2ForCausalLM",
    model_type="mamba2",
    mixers=("mamba2",),
    defaults={**_MAMBA_DEFAULTS, "vocab_size": 32768, "hidden_size": 4096, "num_hidden_layers": 64,
              "state_size": 128, "num_heads": 128, "head_dim": 64, "n_groups": 8,
              "chunk_size": 256, "time_step_limit": NO_TIME_STEP_LIMIT, "tie_word_embeddings": False},
    fixed=_MAMBA_FIXED,
    lm_fields=_mamba2_lm_fields,
    hf_fields=_mamba2_hf_fields,
    tensors=_mamba_backbone((
        tensor("in_proj.weight", "in_proj/kernel", "linear"),  # [E*D + conv_dim + H, D]: z, xBC, dt
        tensor("conv1d.weight", "conv/kernel", "conv"),
        tensor("conv1d.bias", "conv/bias"),
        tensor("dt_bias", "dt_bias"),
        tensor("A_log", "A_log"),
        tensor("D", "D"),
        tensor("norm.weight", "norm/scale"),
        tensor("out_proj.weight", "out_proj/kernel", "linear"),
    )),
    embedding="backbone.embeddings.weight",
)


# --- RecurrentGemma --------------------------------------------------------------------------

# RecurrentGemmaConfig.block_types entries <-> effarch pattern letters.
RG_BLOCKS = {"recurrent": "Q", "attention": "A"}
# RecurrentGemmaRglru's fixed exponent: a_t = a^(8 r_t).
RG_LRU_C = 8.0
# RecurrentGemmaConfig's default partial_rotary_factor.
RG_ROTARY_FRACTION = 0.5


def rg_embed_scale(hidden_size: int) -> float:
    """RecurrentGemmaModel's embedding multiplier: ``sqrt(hidden_size)`` rounded to bfloat16 (its buffer's dtype)."""
    return float(jnp.asarray(hidden_size**0.5, jnp.bfloat16).astype(jnp.float32))


def rope(hf: Mapping[str, Any], default_factor: float, head_dim: int) -> tuple[float, float]:
    """``(rope_theta, partial_rotary_factor)`` from transformers 5's ``rope_parameters`` (or 4's top-level fields).

    Refuses a rope_type other than "default" and an odd number of rotated channels.
    """
    params = hf.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters.rope_type={params['rope_type']!r}; effarch implements only 'default' "
                         "rotary embeddings")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    factor = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", default_factor)))
    if int(head_dim * factor) != rotary_dim(head_dim, factor):
        raise ValueError(f"partial_rotary_factor={factor} rotates int(head_dim * factor) = {int(head_dim * factor)} "
                         f"of head_dim={head_dim} channels; effarch rotates an even number of them")
    return theta, factor


def check_rotary(attention, arch: str) -> dict[str, Any]:
    """The ``rope_parameters`` of an attention config with a partial rotary of an even channel count."""
    dh, factor = attention.dim_per_head, attention.rotary_fraction
    if factor == 0 or int(dh * factor) != rotary_dim(dh, factor):
        raise ValueError(f"the attention layers have rotary_fraction={factor}; {arch} rotates "
                         f"int(head_dim * partial_rotary_factor) > 0 channels, an even number")
    return {"rope_type": "default", "rope_theta": attention.rotary_base, "partial_rotary_factor": factor}


def _rg_lm_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    if d % heads:
        raise ValueError(f"num_attention_heads={heads} must divide hidden_size={d} (head_dim = hidden_size // "
                         "num_attention_heads)")
    unknown = sorted(set(hf["block_types"]) - set(RG_BLOCKS))
    if unknown:
        raise ValueError(f"block_types has {unknown}; expected entries of {sorted(RG_BLOCKS)}")
    theta, factor = rope(hf, RG_ROTARY_FRACTION, d // heads)
    n = hf["num_hidden_layers"]
    letters = "".join(RG_BLOCKS[b] for b in (list(hf["block_types"]) * n)[:n])
    kv_heads = hf["num_key_value_heads"] or heads
    return dict(
        pattern=compact_pattern(letters),
        mixers={"Q": ("rglru", dict(lru_width=hf["lru_width"] or d, num_heads=heads, conv_kernel=hf["conv1d_width"])),
                "A": ("attention", dict(num_heads=heads, num_kv_heads=kv_heads, window=hf["attention_window_size"],
                                        rotary_base=theta, rotary_fraction=factor, use_bias=hf["attention_bias"],
                                        out_bias=True))},
        mlp="geglu", d_ff=hf["intermediate_size"] // 2, mlp_bias=True, norm_eps=float(hf["rms_norm_eps"]),
        norm_zero_centered=True, embed_scale=rg_embed_scale(d), logits_softcap=float(hf["logits_soft_cap"]),
    )


def _rg_hf_fields(config) -> dict[str, Any]:
    arch = RECURRENT_GEMMA.name
    if config.logits_softcap is None:
        raise ValueError(f"logits_softcap=None, but {arch} always soft-caps its logits (logits_soft_cap)")
    check_model(config, arch, mlp="geglu", mlp_bias=True, norm_zero_centered=True,
                embed_scale=rg_embed_scale(config.d_model))
    lru = mixer_config(config, "rglru")
    check_mixer(lru, "rglru", arch, gates="block_diagonal", c=RG_LRU_C)
    fields = dict(lru_width=lru.width, conv1d_width=lru.conv_kernel, num_attention_heads=lru.num_heads,
                  intermediate_size=2 * config.mlp_width, rms_norm_eps=config.norm_eps,
                  logits_soft_cap=config.logits_softcap)
    attention = mixer_config(config, "attention")
    if attention is not None:
        if config.d_model % attention.num_heads or attention.dim_per_head != config.d_model // attention.num_heads:
            raise ValueError(f"the attention layers have head_dim={attention.dim_per_head}, but {arch}'s is "
                             f"hidden_size // num_attention_heads = {config.d_model // attention.num_heads}")
        if attention.window is None:
            raise ValueError(f"the attention layers are global (window=None), but {arch}'s attention is local "
                             "(attention_window_size)")
        check_mixer(attention, "attention", arch, num_heads=lru.num_heads, qk_norm=False, softcap=None, out_bias=True,
                    output_gate=False)
        fields.update(num_key_value_heads=attention.kv_heads, attention_window_size=attention.window,
                      attention_bias=attention.use_bias, head_dim=attention.dim_per_head,
                      rope_parameters=check_rotary(attention, arch))
    # RecurrentGemma repeats block_types and cuts the repetition at num_hidden_layers.
    fields["block_types"] = shortest_cycle(["recurrent" if name == "rglru" else "attention"
                                            for name in mixer_names(config)])
    return fields


RG_LRU_TENSORS = (
    tensor("linear_y.weight", "gate_proj/kernel", "linear"),  # the gelu branch
    tensor("linear_y.bias", "gate_proj/bias"),
    tensor("linear_x.weight", "in_proj/kernel", "linear"),  # the conv + RG-LRU branch
    tensor("linear_x.bias", "in_proj/bias"),
    tensor("conv_1d.weight", "conv/kernel", "conv"),
    tensor("conv_1d.bias", "conv/bias"),
    # Block-diagonal gates [H, W/H, W/H], each block [in, out] on both sides (torch.baddbmm).
    tensor("rg_lru.recurrent_gate_weight", "recurrence_gate/kernel"),
    tensor("rg_lru.recurrent_gate_bias", "recurrence_gate/bias"),
    tensor("rg_lru.input_gate_weight", "input_gate/kernel"),
    tensor("rg_lru.input_gate_bias", "input_gate/bias"),
    tensor("rg_lru.recurrent_param", "decay_param"),
    tensor("linear_out.weight", "out_proj/kernel", "linear"),
    tensor("linear_out.bias", "out_proj/bias"),
)


def _rg_tensors(config, variant) -> list[Tensor]:
    del variant
    out = [tensor("model.embed_tokens.weight", "embed/embedding"),
           tensor("model.final_norm.weight", "final_norm/scale")]
    mlp = gated_mlp({"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}, bias=True)
    for i, name in enumerate(mixer_names(config)):
        if name == "rglru":
            mixer = RG_LRU_TENSORS
        else:
            attention = config.layer_specs[i].mixer
            mixer = ATTENTION_PROJECTIONS + (tensor("o_proj.bias", "o_proj/bias"),) + (
                ATTENTION_QKV_BIASES if attention.use_bias else ())
        layer = f"model.layers.{i}."
        out += [tensor(f"{layer}temporal_pre_norm.weight", f"layer_{i}/mixer_norm/scale"),
                tensor(f"{layer}channel_pre_norm.weight", f"layer_{i}/mlp_norm/scale")]
        out += under(f"{layer}temporal_block.", f"layer_{i}/mixer/", mixer)
        out += under(f"{layer}mlp_block.", f"layer_{i}/mlp/", mlp)
    return out


RECURRENT_GEMMA = Architecture(
    name="RecurrentGemmaForCausalLM",
    model_type="recurrent_gemma",
    padding_idx=True,
    mixers=("rglru", "attention"),
    defaults={"vocab_size": 256000, "hidden_size": 2560, "num_hidden_layers": 26, "intermediate_size": 3 * 2560,
              "pad_token_id": 0,
              "num_attention_heads": 10, "num_key_value_heads": None, "lru_width": None,
              "attention_window_size": 2048, "conv1d_width": 4, "logits_soft_cap": 30.0, "rms_norm_eps": 1e-6,
              "hidden_activation": "gelu_pytorch_tanh", "block_types": ["recurrent", "recurrent", "attention"],
              "attention_bias": False, "tie_word_embeddings": True},
    # The GeGLU MLP and the recurrent block's gelu branch are tanh-approximated.
    fixed={"hidden_activation": "gelu_pytorch_tanh"},
    lm_fields=_rg_lm_fields,
    hf_fields=_rg_hf_fields,
    tensors=_rg_tensors,
    embedding="model.embed_tokens.weight",
)


# --- Jamba -----------------------------------------------------------------------------------

_JAMBA_FIXED = {"hidden_act": "silu", "mamba_conv_bias": True, "mamba_proj_bias": False}
# GatedMLP parameter -> the HF Linear's name, in Jamba's and Qwen3-Next's MLPs and experts.
JAMBA_MLP = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def _jamba_lm_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    d, n = hf["hidden_size"], hf["num_hidden_layers"]
    heads = hf["num_attention_heads"]
    letters = "".join("A" if i % hf["attn_layer_period"] == hf["attn_layer_offset"] else "S" for i in range(n))
    attention = dict(num_heads=heads, num_kv_heads=hf["num_key_value_heads"] or heads, rotary_fraction=0.0)
    # LlamaAttention takes config.head_dim when the file gives one, else hidden_size // num_attention_heads.
    if hf.get("head_dim") is not None and (d % heads or hf["head_dim"] != d // heads):
        attention["head_dim"] = hf["head_dim"]
    elif d % heads:
        raise ValueError(f"num_attention_heads={heads} must divide hidden_size={d} (no head_dim given)")
    fields = dict(
        pattern=compact_pattern(letters),
        mixers={"S": ("mamba", dict(d_state=hf["mamba_d_state"], d_conv=hf["mamba_d_conv"],
                                    expand=integer_expand(hf["mamba_expand"], "mamba_expand"),
                                    dt_rank=_dt_rank(hf["mamba_dt_rank"], d), dt_bc_norm=True,
                                    dt_bc_norm_eps=float(hf["rms_norm_eps"]))),
                "A": ("attention", attention)},
        mlp="swiglu", d_ff=hf["intermediate_size"], norm_eps=float(hf["rms_norm_eps"]),
    )
    period, offset = hf["expert_layer_period"], hf["expert_layer_offset"]
    if hf["num_experts"] > 1 and offset < n:
        fields.update(mlp="moe", moe_every=period, moe_offset=offset,
                      moe=dict(num_experts=hf["num_experts"], top_k=hf["num_experts_per_tok"], capacity_factor=None,
                               aux_loss_weight=hf["router_aux_loss_coef"]))
    return fields


def _check_moe_hybrid(config, arch: str, *, norm_zero_centered: bool) -> None:
    """What Jamba and Qwen3-Next blocks share: no embedding scale or soft-cap, SwiGLU or MoE MLPs without bias."""
    check_model(config, arch, embed_scale=None, logits_softcap=None, norm_zero_centered=norm_zero_centered,
                mlp_bias=False)
    if config.mlp not in ("swiglu", "moe"):
        raise ValueError(f"mlp={config.mlp!r}, but {arch} blocks have a SwiGLU or MoE MLP (mlp='swiglu' or 'moe')")


def _jamba_hf_fields(config) -> dict[str, Any]:
    arch = JAMBA.name
    _check_moe_hybrid(config, arch, norm_zero_centered=False)
    n = config.n_layers
    fields = dict(intermediate_size=config.mlp_width, rms_norm_eps=config.norm_eps, num_experts=1,
                  num_experts_per_tok=1)
    if config.mlp == "moe":
        moe = config.moe
        if moe.capacity_factor is not None:
            raise ValueError(f"moe.capacity_factor={moe.capacity_factor}, but {arch}'s MoE never drops a token "
                             "(use moe.capacity_factor=None)")
        if moe.d_ff not in (None, config.mlp_width):
            raise ValueError(f"moe.d_ff={moe.d_ff}, but {arch}'s experts have the dense MLP's width "
                             f"intermediate_size = d_ff = {config.mlp_width}")
        fields.update(num_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                      expert_layer_period=config.moe_every, expert_layer_offset=config.moe_offset,
                      router_aux_loss_coef=moe.aux_loss_weight)
    attention_layers = {i for i, name in enumerate(mixer_names(config)) if name == "attention"}
    fields["attn_layer_period"], fields["attn_layer_offset"] = period_and_offset(attention_layers, n,
                                                                                 "attention layers")
    mamba = mixer_config(config, "mamba")
    if mamba.dt_bc_norm_eps != config.norm_eps:
        raise ValueError(f"the mamba dt/B/C norms have dt_bc_norm_eps={mamba.dt_bc_norm_eps} and the block norms "
                         f"norm_eps={config.norm_eps}; JambaConfig has one rms_norm_eps for both")
    fields.update(mamba_d_state=mamba.d_state, mamba_d_conv=mamba.d_conv, mamba_expand=mamba.expand,
                  mamba_dt_rank=mamba.rank)
    attention = mixer_config(config, "attention")
    if attention is not None:
        if attention.rotary_fraction > 0 and rotary_dim(attention.dim_per_head, attention.rotary_fraction) > 0:
            raise ValueError(f"the attention layers have rotary_fraction={attention.rotary_fraction}, but {arch}'s "
                             "attention has no positional encoding (use rotary_fraction=0)")
        check_mixer(attention, "attention", arch, window=None, qk_norm=False, softcap=None, use_bias=False,
                    out_bias=False, output_gate=False)
        fields.update(num_attention_heads=attention.num_heads, num_key_value_heads=attention.kv_heads,
                      head_dim=attention.dim_per_head)
    return fields


def _jamba_tensors(config, variant) -> list[Tensor]:
    out = [tensor("model.embed_tokens.weight", "embed/embedding"),
           tensor("model.final_layernorm.weight", "final_norm/scale")]
    mamba = MAMBA_MIXER + tuple(tensor(f"{theirs}_layernorm.weight", f"{ours}_norm/scale")
                                for theirs, ours in (("dt", "dt"), ("b", "b"), ("c", "c")))
    for i, (spec, name) in enumerate(zip(config.layer_specs, mixer_names(config))):
        layer = f"model.layers.{i}."
        out += [tensor(f"{layer}input_layernorm.weight", f"layer_{i}/mixer_norm/scale"),
                tensor(f"{layer}pre_ff_layernorm.weight", f"layer_{i}/mlp_norm/scale")]
        if name == "mamba":
            out += under(f"{layer}mamba.", f"layer_{i}/mixer/", mamba)
        else:
            out += under(f"{layer}self_attn.", f"layer_{i}/mixer/", ATTENTION_PROJECTIONS)
        ff, mlp = f"{layer}feed_forward.", f"layer_{i}/mlp/"
        if spec.mlp != "moe":
            out += under(ff, mlp, gated_mlp(JAMBA_MLP, bias=False))
            continue
        out.append(tensor(f"{ff}router.weight", f"{mlp}router", "linear"))  # [E, D] <-> [D, E]
        out += experts(config.moe.num_experts, f"{ff}experts.", mlp, variant)
    return out


def experts(num_experts: int, hf_prefix: str, mlp: str, variant: str) -> list[Tensor]:
    """An MoE's expert weights ``mlp/{gate,up,down}``: one tensor per expert (``"per_expert"``, as
    ``save_pretrained`` writes them) or transformers 5's fused ``gate_up_proj`` and ``down_proj``."""
    if variant == "per_expert":
        return [Tensor(tuple(f"{hf_prefix}{j}.{theirs}.weight" for j in range(num_experts)), (path(mlp + ours),),
                       per_expert(num_experts)) for ours, theirs in JAMBA_MLP.items()]
    return [Tensor((f"{hf_prefix}gate_up_proj",), (path(f"{mlp}gate"), path(f"{mlp}up")), "fused_gate_up"),
            tensor(f"{hf_prefix}down_proj", f"{mlp}down", "fused_down")]


JAMBA = Architecture(
    name="JambaForCausalLM",
    model_type="jamba",
    padding_idx=True,
    mixers=("mamba", "attention"),
    selects={"mamba": {"dt_bc_norm": True}},
    defaults={**_JAMBA_FIXED, "pad_token_id": 0, "vocab_size": 65536, "tie_word_embeddings": False, "hidden_size": 4096,
              "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "rms_norm_eps": 1e-6, "router_aux_loss_coef": 0.001,
              "num_experts_per_tok": 2, "num_experts": 16, "expert_layer_period": 2, "expert_layer_offset": 1,
              "attn_layer_period": 8, "attn_layer_offset": 4, "mamba_d_state": 16, "mamba_d_conv": 4,
              "mamba_expand": 2, "mamba_dt_rank": "auto"},
    fixed=_JAMBA_FIXED,
    lm_fields=_jamba_lm_fields,
    hf_fields=_jamba_hf_fields,
    tensors=_jamba_tensors,
    embedding="model.embed_tokens.weight",
    variants=("per_expert", "fused"),
)


# --- Qwen3-Next ------------------------------------------------------------------------------

_QWEN3_NEXT_FIXED = {"hidden_act": "silu", "attention_bias": False}
# Qwen3NextConfig.layer_types entries <-> effarch pattern letters.
QWEN3_NEXT_LAYERS = {"linear_attention": "D", "full_attention": "A"}
# Qwen3NextConfig's default partial_rotary_factor and full_attention_interval.
QWEN3_NEXT_ROTARY_FRACTION = 0.25
QWEN3_NEXT_ATTENTION_INTERVAL = 4


def _qwen3_next_lm_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    n, heads, head_dim = hf["num_hidden_layers"], hf["num_attention_heads"], hf["head_dim"]
    kd, vd = hf["linear_key_head_dim"], hf["linear_value_head_dim"]
    if vd % kd:
        raise ValueError(f"linear_value_head_dim={vd} is not a multiple of linear_key_head_dim={kd}; effarch's "
                         "gated_deltanet has value width expand_v * head_dim")
    layer_types = hf.get("layer_types") or [
        "full_attention" if (i + 1) % hf.get("full_attention_interval", QWEN3_NEXT_ATTENTION_INTERVAL) == 0
        else "linear_attention" for i in range(n)]
    unknown = sorted(set(layer_types) - set(QWEN3_NEXT_LAYERS))
    if unknown or len(layer_types) != n:
        raise ValueError(f"layer_types={list(layer_types)}; expected num_hidden_layers={n} entries of "
                         f"{sorted(QWEN3_NEXT_LAYERS)}")
    if hf["mlp_only_layers"]:
        raise ValueError(f"mlp_only_layers={list(hf['mlp_only_layers'])}; effarch places its MoE layers by "
                         "decoder_sparse_step only (i % moe_every == moe_offset)")
    theta, factor = rope(hf, QWEN3_NEXT_ROTARY_FRACTION, head_dim)
    eps = float(hf["rms_norm_eps"])
    fields = dict(
        pattern=compact_pattern("".join(QWEN3_NEXT_LAYERS[t] for t in layer_types)),
        mixers={"D": ("gated_deltanet", dict(head_dim=kd, num_heads=hf["linear_num_key_heads"],
                                             num_v_heads=hf["linear_num_value_heads"], expand_v=vd // kd,
                                             conv_size=hf["linear_conv_kernel_dim"], norm_eps=eps)),
                "A": ("attention", dict(num_heads=heads, num_kv_heads=hf["num_key_value_heads"], head_dim=head_dim,
                                        rotary_base=theta, rotary_fraction=factor, qk_norm=True, qk_norm_eps=eps,
                                        qk_norm_zero_centered=True, output_gate=True))},
        mlp="swiglu", d_ff=hf["intermediate_size"], norm_eps=eps, norm_zero_centered=True,
    )
    step = hf["decoder_sparse_step"]
    if hf["num_experts"] > 0 and step <= n:  # layer i is MoE when (i + 1) % step == 0
        fields.update(mlp="moe", moe_every=step, moe_offset=step - 1,
                      moe=dict(num_experts=hf["num_experts"], top_k=hf["num_experts_per_tok"], capacity_factor=None,
                               d_ff=hf["moe_intermediate_size"], normalize_gates=bool(hf["norm_topk_prob"]),
                               shared_d_ff=hf["shared_expert_intermediate_size"],
                               aux_loss_weight=hf["router_aux_loss_coef"]))
    return fields


def _qwen3_next_hf_fields(config) -> dict[str, Any]:
    arch = QWEN3_NEXT.name
    _check_moe_hybrid(config, arch, norm_zero_centered=True)
    fields = dict(intermediate_size=config.mlp_width, rms_norm_eps=config.norm_eps, num_experts=0,
                  decoder_sparse_step=1, mlp_only_layers=[],
                  layer_types=[{"gated_deltanet": "linear_attention", "attention": "full_attention"}[name]
                               for name in mixer_names(config)])
    if config.mlp == "moe":
        moe = config.moe
        if moe.capacity_factor is not None:
            raise ValueError(f"moe.capacity_factor={moe.capacity_factor}, but {arch}'s MoE never drops a token "
                             "(use moe.capacity_factor=None)")
        if moe.shared_d_ff is None:
            raise ValueError(f"moe.shared_d_ff=None, but {arch}'s MoE layers have a shared expert "
                             "(shared_expert_intermediate_size)")
        if config.moe_offset != config.moe_every - 1:
            raise ValueError(f"moe_every={config.moe_every} with moe_offset={config.moe_offset}, but {arch}'s MoE "
                             "layers are those with (i + 1) % decoder_sparse_step == 0 (moe_offset = moe_every - 1)")
        fields.update(num_experts=moe.num_experts, num_experts_per_tok=moe.top_k, decoder_sparse_step=config.moe_every,
                      moe_intermediate_size=moe.d_ff or config.mlp_width, norm_topk_prob=moe.normalize_gates,
                      shared_expert_intermediate_size=moe.shared_d_ff, router_aux_loss_coef=moe.aux_loss_weight)
    deltanet = mixer_config(config, "gated_deltanet")
    if deltanet.norm_eps != config.norm_eps:
        raise ValueError(f"the gated_deltanet output norm has norm_eps={deltanet.norm_eps} and the block norms "
                         f"norm_eps={config.norm_eps}; Qwen3NextConfig has one rms_norm_eps for both")
    fields.update(linear_key_head_dim=deltanet.head_dim, linear_value_head_dim=deltanet.value_dim,
                  linear_num_key_heads=deltanet.heads, linear_num_value_heads=deltanet.value_heads,
                  linear_conv_kernel_dim=deltanet.conv_size)
    attention = mixer_config(config, "attention")
    if attention is not None:
        check_mixer(attention, "attention", arch, qk_norm=True, qk_norm_zero_centered=True,
                    qk_norm_eps=config.norm_eps, output_gate=True, window=None, softcap=None, use_bias=False,
                    out_bias=False)
        fields.update(num_attention_heads=attention.num_heads, num_key_value_heads=attention.kv_heads,
                      head_dim=attention.dim_per_head, rope_parameters=check_rotary(attention, arch))
    return fields


def _qwen3_next_tensors(config, variant) -> list[Tensor]:
    out = [tensor("model.embed_tokens.weight", "embed/embedding"), tensor("model.norm.weight", "final_norm/scale")]
    for i, (spec, name) in enumerate(zip(config.layer_specs, mixer_names(config))):
        layer, ours = f"model.layers.{i}.", f"layer_{i}/"
        out += [tensor(f"{layer}input_layernorm.weight", f"{ours}mixer_norm/scale"),
                tensor(f"{layer}post_attention_layernorm.weight", f"{ours}mlp_norm/scale")]
        mixer = f"{ours}mixer/"
        cfg = spec.mixer
        if name == "gated_deltanet":
            hk, kd, vd, r = cfg.heads, cfg.head_dim, cfg.value_dim, cfg.value_heads // cfg.heads
            out += under(f"{layer}linear_attn.", mixer, [
                # Rows per key head: q [K], k [K], v [r V], z [r V] (the output gate, effarch's g_proj).
                Tensor(("in_proj_qkvz.weight",), tuple(path(f"{p}_proj/kernel") for p in "qkvg"),
                       head_groups(hk, [kd, kd, r * vd, r * vd])),
                # Rows per key head: b [r], a [r].
                Tensor(("in_proj_ba.weight",), (path("b_proj/kernel"), path("a_proj/kernel")), head_groups(hk, [r, r])),
                Tensor(("conv1d.weight",), tuple(path(f"conv_{p}/kernel") for p in "qkv"),
                       concatenated_convs([hk * kd, hk * kd, hk * r * vd])),
                tensor("A_log", "A_log"),
                tensor("dt_bias", "dt_bias"),
                tensor("norm.weight", "o_norm/scale"),
                tensor("out_proj.weight", "o_proj/kernel", "linear"),
            ])
        else:
            out += under(f"{layer}self_attn.", mixer, [
                # Rows per head: the query [K], then its output gate [K].
                Tensor(("q_proj.weight",), (path("q_proj/kernel"), path("g_proj/kernel")),
                       head_groups(cfg.num_heads, [cfg.dim_per_head, cfg.dim_per_head])),
                *(tensor(f"{p}_proj.weight", f"{p}_proj/kernel", "linear") for p in "kvo"),
                tensor("q_norm.weight", "q_norm/scale"),
                tensor("k_norm.weight", "k_norm/scale"),
            ])
        ff, mlp = f"{layer}mlp.", f"{ours}mlp/"
        if spec.mlp != "moe":
            out += under(ff, mlp, gated_mlp(JAMBA_MLP, bias=False))
            continue
        out += [tensor(f"{ff}gate.weight", f"{mlp}router", "linear"),  # [E, D] <-> [D, E]
                tensor(f"{ff}shared_expert_gate.weight", f"{mlp}shared_gate/kernel", "linear"),  # [1, D] <-> [D, 1]
                *under(f"{ff}shared_expert.", f"{mlp}shared/", gated_mlp(JAMBA_MLP, bias=False))]
        out += experts(config.moe.num_experts, f"{ff}experts.", mlp, variant)
    return out


QWEN3_NEXT = Architecture(
    name="Qwen3NextForCausalLM",
    model_type="qwen3_next",
    padding_idx=True,
    mixers=("gated_deltanet", "attention"),
    defaults={**_QWEN3_NEXT_FIXED, "pad_token_id": None, "vocab_size": 151936, "hidden_size": 2048,
              "intermediate_size": 5632, "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 2,
              "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False, "head_dim": 256, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
              "linear_value_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
              "decoder_sparse_step": 1, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
              "num_experts_per_tok": 10, "num_experts": 512, "norm_topk_prob": True, "router_aux_loss_coef": 0.001,
              "mlp_only_layers": []},
    fixed=_QWEN3_NEXT_FIXED,
    lm_fields=_qwen3_next_lm_fields,
    hf_fields=_qwen3_next_hf_fields,
    tensors=_qwen3_next_tensors,
    embedding="model.embed_tokens.weight",
    variants=("per_expert", "fused"),
    # The multi-token-prediction head of the released checkpoints (transformers ignores it too).
    ignored=("mtp.",),
)

# Every layout, by the class name ``config.json`` gives in ``architectures``.
ARCHITECTURES = {arch.name: arch for arch in (MAMBA, MAMBA2, RECURRENT_GEMMA, JAMBA, QWEN3_NEXT)}
