"""``LMConfig``: the language-model backbone as one validated, hashable dataclass.

A model is ``n_layers`` pre-norm residual blocks, each a sequence mixer and an
MLP. Which mixer a layer uses is given by a *pattern* of letters, e.g.
``"MMMA"`` (three Mamba-2 layers, then attention), tiled to ``n_layers``; or by
``attention_ratio``, the fraction of layers that are attention, spread evenly.
``mixers`` maps each letter to a registered mixer name and its options.
See docs/models.md for every field and the presets.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import jax.numpy as jnp
from flax.core import FrozenDict

from effarch import mixers as mixers_lib
from effarch.layers.linear import PROJECTIONS
from effarch.layers.mlp import default_width
from effarch.layers.moe import MoEConfig
from effarch.mixers.base import MixerConfig

MLP_KINDS = ("swiglu", "geglu", "moe", "none")
# The dense MLP kinds and their gate activations (effarch.layers.mlp.ACTIVATIONS).
DENSE_MLP_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu_tanh"}
# The dense kind of the layers of an ``mlp="moe"`` model that ``moe_every`` leaves without experts.
MOE_DENSE_KIND = "swiglu"

# Letter -> (registered mixer name, options). ``LMConfig.mixers`` is merged
# over this, so a config only names the letters it changes.
DEFAULT_MIXERS = {
    "A": ("attention", {}),
    "M": ("mamba2", {}),
    "S": ("mamba", {}),
    "G": ("gla", {}),
    "H": ("hgrn2", {"lower_bound": "learned"}),  # the HGRN-2 model: bounds learned per layer
    "L": ("linear_attention", {}),
    "R": ("retnet", {}),
    "X": ("mlstm", {}),
    "D": ("gated_deltanet", {}),
    "K": ("rwkv6", {}),
    "V": ("rwkv7", {"value_residual": True}),  # RWKV-7's value residual across its layers
    "Q": ("rglru", {}),
}
# Mixers whose initialisation depends on the layer's depth; LMConfig sets their ``layer_ratio``.
DEPTH_INITIALISED = ("rwkv6", "rwkv7")
# The letters ``attention_ratio`` lays out: attention and everything else.
ATTENTION_LETTER = "A"
RECURRENT_LETTER = "M"


class LayerSpec(NamedTuple):
    """What one layer is: its pattern letter, its mixer's config, whether MoD routes it, its MLP kind."""

    letter: str
    mixer: MixerConfig
    mod: bool
    mlp: str


def _freeze(value: Any) -> Any:
    """Dicts to FrozenDict and lists to tuples, recursively, so configs hash."""
    if isinstance(value, Mapping):
        return FrozenDict({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """The inverse of :func:`_freeze` for JSON: mappings to dicts, tuples to lists."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thaw(v) for v in value]
    return value


def attention_layout(n_layers: int, attention_ratio: float) -> str:
    """``round(ratio * n_layers)`` attention letters spread evenly, the rest recurrent.

    Layer i is attention when ``floor((i + 1) * a / L) > floor(i * a / L)``, so
    attention layers close each group, e.g. ``(8, 0.25) -> "MMMAMMMA"``.
    """
    a = round(attention_ratio * n_layers)
    return "".join(
        ATTENTION_LETTER if (i + 1) * a // n_layers > i * a // n_layers else RECURRENT_LETTER
        for i in range(n_layers)
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMConfig:
    """The language model: sizes, layer pattern, mixers, MLP, MoE/MoD, dtypes.

    Attributes:
      vocab_size: number of token ids (256 for bytes).
      d_model: residual width D.
      n_layers: number of blocks L.
      pattern: layer letters, tiled to ``n_layers`` (its length must divide
        ``n_layers``), e.g. ``"MMMA"``. Exactly one of ``pattern`` and
        ``attention_ratio`` is set.
      attention_ratio: fraction of layers that are attention (letter ``A``),
        spread evenly; the others are letter ``M``.
      mixers: letter -> ``(mixer name, options)``; merged over
        ``DEFAULT_MIXERS`` (A attention, M mamba2, S mamba, G gla, H hgrn2,
        L linear_attention, R retnet, X mlstm, D gated_deltanet, K rwkv6,
        V rwkv7, Q rglru). Only letters the pattern uses are built.
      mixer_preset: a named option set of every mixer's config (e.g. ``"tiny"``),
        under the options above.
      layer_options: layer index -> mixer options overriding that layer only.
      mlp: ``"swiglu"``, ``"geglu"`` (tanh-GELU gate), ``"moe"`` or ``"none"``
        (mixer-only blocks).
      layer_mlp: layer index -> that layer's MLP kind (one of the ``mlp``
        kinds), overriding ``mlp`` and ``moe_every`` there; e.g. ``{3: "none"}``
        for a mixer-only last block.
      d_ff: MLP hidden width; None: ``8/3 * d_model`` rounded up to 32.
      mlp_bias: biases on the dense MLP projections (not on MoE experts).
      moe: MoE options (used when ``mlp == "moe"``); a MoEConfig or a mapping.
      moe_every, moe_offset: with ``mlp == "moe"``, layer ``i`` is an MoE layer
        when ``i % moe_every == moe_offset`` and a dense SwiGLU of width
        ``d_ff`` otherwise (Jamba's ``expert_layer_period`` / ``_offset``);
        the defaults make every layer MoE.
      mod_capacity: Mixture-of-Depths: fraction of tokens per sequence the
        routed layers process; None disables MoD.
      mod_every: with MoD on, layers ``i`` with ``i % mod_every == mod_every - 1``
        are routed (every other layer by default, as in the paper).
      early_exit: layer indices ``i`` in ``[0, n_layers - 1)``, ascending, after
        whose block an exit head reads the residual stream (its own RMSNorm,
        then the shared output head); the last layer is always the final
        exit. Empty: no early exits (effarch.models.early_exit).
      early_exit_weights: training weight of each exit's loss, the early
        exits then the final one (``len(early_exit) + 1`` non-negative
        numbers); None: CALM's weights, proportional to the depth ``i + 1``
        after which each exit sits, normalised to sum to 1.
      tie_embeddings: the output projection is the transposed embedding.
      embed_scale: multiplies the embeddings on the way in (not the tied
        output head); None: 1. Gemma models use ``sqrt(d_model)``.
      logits_softcap: ``c`` soft-caps the logits to ``c * tanh(logits / c)``
        (Gemma 2, RecurrentGemma); None: off.
      pad_token_id: the embedding lookup of this token id gets no gradient
        (torch's ``nn.Embedding(padding_idx=...)``, which RecurrentGemma,
        Jamba and Qwen3-Next use; ``effarch.convert.from_hf`` sets it). The
        forward pass is unchanged, and a tied output head still trains that
        row. None: every lookup trains its row.
      scan_layers: run repeated groups of layers with ``nn.scan`` (one
        compiled group; parameters stacked on a leading "layers" axis).
      remat: rematerialise each block in the backward pass (``nn.remat``).
      norm_eps: RMSNorm epsilon.
      norm_zero_centered: the block and final RMSNorm scales are stored as
        offsets from 1, ``x / rms(x) * (1 + scale)`` (Gemma, Qwen3-Next).
      residual_in_fp32: keep the residual stream in float32 whatever the
        compute dtype (transformers' Mamba models do); False: in ``dtype``.
      dtype: compute dtype of activations.
      param_dtype: dtype parameters are stored in.
      projection: ``"dense"`` or ``"bitlinear"`` for the mixers' and MLPs'
        projections (embeddings and the output head stay dense).
      implementation: passed to every mixer (``"auto"``, ``"chunked"``, ...).
      max_len: longest sequence the model is meant for; the default decode
        cache length.
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # Tests: two layers of everything, a few thousand parameters per mixer.
        "tiny": dict(vocab_size=256, d_model=32, n_layers=2, pattern="MA", d_ff=64,
                     mixer_preset="tiny", max_len=128),
        # Byte-level text on a laptop CPU: falls clearly within minutes.
        "cpu-small": dict(vocab_size=256, d_model=128, n_layers=4, pattern="MMMA", d_ff=384,
                          mixers={"A": ("attention", {"num_heads": 4, "chunk_size": 64}),
                                  "M": ("mamba2", {"d_state": 32, "head_dim": 32, "chunk_size": 64})},
                          max_len=512),
        # ~100M parameters, bf16 compute, scanned layers: one GPU.
        "gpu-base": dict(vocab_size=256, d_model=768, n_layers=12, pattern="MMMA", d_ff=2048,
                         mixers={"A": ("attention", {"num_heads": 12}),
                                 "M": ("mamba2", {"d_state": 128, "head_dim": 64})},
                         dtype=jnp.bfloat16, scan_layers=True, max_len=2048),
    }

    vocab_size: int = 256
    d_model: int
    n_layers: int
    pattern: str | None = None
    attention_ratio: float | None = None
    mixers: Mapping[str, tuple[str, Mapping[str, Any]]] = dataclasses.field(default_factory=dict)
    mixer_preset: str | None = None
    layer_options: Mapping[int, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    layer_mlp: Mapping[int, str] = dataclasses.field(default_factory=dict)
    mlp: str = "swiglu"
    d_ff: int | None = None
    mlp_bias: bool = False
    moe: MoEConfig = MoEConfig()
    moe_every: int = 1
    moe_offset: int = 0
    mod_capacity: float | None = None
    mod_every: int = 2
    early_exit: tuple[int, ...] = ()
    early_exit_weights: tuple[float, ...] | None = None
    tie_embeddings: bool = True
    embed_scale: float | None = None
    logits_softcap: float | None = None
    pad_token_id: int | None = None
    scan_layers: bool = False
    remat: bool = False
    norm_eps: float = 1e-6
    norm_zero_centered: bool = False
    residual_in_fp32: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    projection: str = "dense"
    implementation: str = "auto"
    max_len: int = 2048

    @classmethod
    def preset(cls, name: str, **overrides) -> LMConfig:
        """The named preset (``"tiny"``, ``"cpu-small"``, ``"gpu-base"``) with ``overrides``.

        Overriding ``attention_ratio`` clears the preset's ``pattern`` (and vice versa).
        """
        if name not in cls.PRESETS:
            raise ValueError(f"LMConfig has no preset {name!r}; valid: {', '.join(sorted(cls.PRESETS))}.")
        fields = dict(cls.PRESETS[name])
        if "attention_ratio" in overrides:
            fields.pop("pattern", None)
        if "pattern" in overrides:
            fields.pop("attention_ratio", None)
        return cls(**{**fields, **overrides})

    def __post_init__(self):
        def fail(field, expected):
            raise ValueError(f"LMConfig: {field}={getattr(self, field)!r}; expected {expected}.")

        for field in ("vocab_size", "d_model", "n_layers", "max_len"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                fail(field, "a positive int")
        if (self.pattern is None) == (self.attention_ratio is None):
            raise ValueError(
                f"LMConfig: pattern={self.pattern!r}, attention_ratio={self.attention_ratio!r}; "
                "set exactly one of them (e.g. pattern='MMMA' or attention_ratio=0.25)."
            )
        if self.pattern is not None:
            if not isinstance(self.pattern, str) or not self.pattern:
                fail("pattern", "a non-empty string of layer letters such as 'MMMA'")
            if self.n_layers % len(self.pattern):
                raise ValueError(
                    f"LMConfig: pattern={self.pattern!r} has length {len(self.pattern)}, which does not "
                    f"divide n_layers={self.n_layers}; use a pattern whose length divides n_layers "
                    "(it is tiled) or equals it."
                )
        elif not 0.0 <= self.attention_ratio <= 1.0:
            fail("attention_ratio", "a float in [0, 1]")
        if self.mlp not in MLP_KINDS:
            fail("mlp", f"one of {MLP_KINDS}")
        if self.d_ff is not None and (not isinstance(self.d_ff, int) or self.d_ff < 1):
            fail("d_ff", "None or a positive int")
        if isinstance(self.moe, Mapping):
            object.__setattr__(self, "moe", MoEConfig(**self.moe))
        if not isinstance(self.moe, MoEConfig):
            fail("moe", "a MoEConfig or a mapping of its fields")
        if not isinstance(self.moe_every, int) or self.moe_every < 1:
            fail("moe_every", "a positive int")
        if not isinstance(self.moe_offset, int) or not 0 <= self.moe_offset < self.moe_every:
            fail("moe_offset", f"an int in [0, moe_every={self.moe_every})")
        if self.mlp == "moe" and self.moe_offset >= self.n_layers:
            raise ValueError(
                f"LMConfig: mlp='moe' with moe_offset={self.moe_offset} and n_layers={self.n_layers}: no layer "
                f"i < n_layers has i % moe_every == moe_offset; use mlp='swiglu' for a model without experts."
            )
        if self.pad_token_id is not None and (isinstance(self.pad_token_id, bool) or not isinstance(
                self.pad_token_id, int) or not 0 <= self.pad_token_id < self.vocab_size):
            fail("pad_token_id", f"None or a token id in [0, vocab_size={self.vocab_size})")
        for field in ("embed_scale", "logits_softcap"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                fail(field, "None or a positive float")
        if self.mlp == "moe" and self.projection != "dense":
            raise ValueError(
                f"LMConfig: mlp='moe' with projection={self.projection!r}; MoE experts are dense "
                "batched matmuls, use projection='dense' with MoE."
            )
        if self.mod_capacity is not None and not 0.0 < self.mod_capacity <= 1.0:
            fail("mod_capacity", "None or a fraction in (0, 1]")
        if not isinstance(self.mod_every, int) or self.mod_every < 1:
            fail("mod_every", "a positive int")
        if self.projection not in PROJECTIONS:
            fail("projection", f"one of {PROJECTIONS}")
        self._check_early_exit(fail)
        for field in ("dtype", "param_dtype"):
            if not jnp.issubdtype(jnp.dtype(getattr(self, field)), jnp.floating):
                fail(field, "a floating dtype such as jnp.float32 or jnp.bfloat16")
        for letter, entry in dict(self.mixers).items():
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[1], Mapping)):
                raise ValueError(
                    f"LMConfig: mixers[{letter!r}]={entry!r}; expected (mixer name, options dict), "
                    "e.g. ('mamba2', {'num_heads': 4})."
                )
        for index in self.layer_options:
            if not isinstance(index, int) or not 0 <= index < self.n_layers:
                raise ValueError(
                    f"LMConfig: layer_options has key {index!r}; expected layer indices in "
                    f"[0, n_layers={self.n_layers})."
                )
        object.__setattr__(self, "mixers", _freeze(self.mixers))
        for index, kind in dict(self.layer_mlp).items():
            if not isinstance(index, int) or not 0 <= index < self.n_layers:
                raise ValueError(
                    f"LMConfig: layer_mlp has key {index!r}; expected layer indices in [0, n_layers={self.n_layers})."
                )
            if kind not in MLP_KINDS:
                raise ValueError(f"LMConfig: layer_mlp[{index}]={kind!r}; expected one of {MLP_KINDS}.")
            if kind == "moe" and self.projection != "dense":
                raise ValueError(
                    f"LMConfig: layer_mlp[{index}]='moe' with projection={self.projection!r}; MoE experts are "
                    "dense batched matmuls, use projection='dense' with MoE."
                )
        object.__setattr__(self, "layer_options", _freeze(self.layer_options))
        object.__setattr__(self, "layer_mlp", _freeze(self.layer_mlp))
        specs = self.layer_specs  # builds (and so validates) every layer's mixer config
        residual = [i for i, spec in enumerate(specs) if getattr(spec.mixer, "value_residual", False) is True]
        if residual and (self.scan_layers or self.has_mod):
            raise ValueError(
                f"LMConfig: layers {residual} are RWKV-7 with value_residual=True (the first one's values mix "
                f"into the later ones) and scan_layers={self.scan_layers}, mod_capacity={self.mod_capacity}; "
                "the value residual needs scan_layers=False and no Mixture-of-Depths, or set "
                "mixers={'V': ('rwkv7', {'value_residual': False})}."
            )

    def _check_early_exit(self, fail) -> None:
        exits = self.early_exit
        if isinstance(exits, (list, tuple)):
            exits = tuple(exits)
            object.__setattr__(self, "early_exit", exits)
        if not (isinstance(exits, tuple) and all(isinstance(i, int) and not isinstance(i, bool) for i in exits)
                and list(exits) == sorted(set(exits)) and all(0 <= i < self.n_layers - 1 for i in exits)):
            fail("early_exit", f"ascending distinct layer indices in [0, n_layers - 1 = {self.n_layers - 1}) "
                 "(the last layer is always the final exit), e.g. (1, 3)")
        if exits and self.scan_layers:
            raise ValueError(
                f"LMConfig: early_exit={exits} with scan_layers=True; exit heads sit between single layers, "
                "use scan_layers=False with early exits."
            )
        weights = self.early_exit_weights
        if weights is None:
            return
        if not exits:
            fail("early_exit_weights", "None when early_exit is empty")
        if isinstance(weights, list):
            weights = tuple(weights)
            object.__setattr__(self, "early_exit_weights", weights)
        if not (isinstance(weights, tuple) and len(weights) == len(exits) + 1
                and all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights)
                and sum(weights) > 0):
            fail("early_exit_weights", f"None or {len(exits) + 1} non-negative numbers (one per early exit, "
                 "then the final exit), not all zero")

    @property
    def exit_layers(self) -> tuple[int, ...]:
        """Layers after which the model has an exit, the final layer last: ``early_exit + (n_layers - 1,)``."""
        return (*self.early_exit, self.n_layers - 1)

    @property
    def exit_weights(self) -> tuple[float, ...]:
        """The loss weight of every exit in :attr:`exit_layers`, summing to 1."""
        raw = self.early_exit_weights or tuple(float(i + 1) for i in self.exit_layers)
        return tuple(float(w) / sum(raw) for w in raw)

    def __hash__(self):
        return hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))

    @property
    def layer_pattern(self) -> str:
        """One letter per layer, ``n_layers`` long."""
        if self.pattern is not None:
            return self.pattern * (self.n_layers // len(self.pattern))
        return attention_layout(self.n_layers, self.attention_ratio)

    @property
    def mlp_width(self) -> int:
        """The MLP hidden width: ``d_ff`` or its default."""
        return self.d_ff if self.d_ff is not None else default_width(self.d_model)

    def mixer_entry(self, letter: str) -> tuple[str, Mapping[str, Any]]:
        """``(mixer name, options)`` of a pattern letter."""
        table = {**DEFAULT_MIXERS, **self.mixers}
        if letter not in table:
            raise ValueError(
                f"LMConfig: pattern letter {letter!r} has no mixer; known letters: "
                f"{', '.join(sorted(table))} (add it with mixers={{{letter!r}: (name, options)}})."
            )
        return table[letter]

    @functools.cached_property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        """Every layer's letter, validated mixer config and MoD flag."""
        specs = []
        for i, letter in enumerate(self.layer_pattern):
            name, options = self.mixer_entry(letter)
            shared = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                          implementation=self.implementation, projection=self.projection)
            try:
                preset = mixers_lib.preset_options(name, self.mixer_preset)
                merged = {**shared, **preset, **options, **self.layer_options.get(i, {})}
                if name in DEPTH_INITIALISED and "layer_ratio" not in merged:  # RWKV initialises by depth
                    merged["layer_ratio"] = i / max(self.n_layers - 1, 1)
                    if name == "rwkv7":
                        merged.setdefault("num_layers", self.n_layers)
                mixer = mixers_lib.make_config(name, self.d_model, **merged)
            except ValueError as err:
                raise ValueError(f"LMConfig: layer {i} (letter {letter!r}): {err}") from err
            mod = self.mod_capacity is not None and i % self.mod_every == self.mod_every - 1
            mlp = self.mlp
            if mlp == "moe" and i % self.moe_every != self.moe_offset:
                mlp = MOE_DENSE_KIND
            mlp = self.layer_mlp.get(i, mlp)
            specs.append(LayerSpec(letter, mixer, mod, mlp))
        return tuple(specs)

    @property
    def period(self) -> int:
        """The shortest number of layers P (dividing ``n_layers``) after which the specs repeat.

        ``scan_layers`` scans ``n_layers // P`` copies of a group of P layers.
        """
        specs = self.layer_specs
        for p in range(1, self.n_layers + 1):
            if self.n_layers % p == 0 and all(specs[i] == specs[i % p] for i in range(self.n_layers)):
                return p
        raise AssertionError("unreachable: P = n_layers always repeats")

    @property
    def has_mod(self) -> bool:
        """Whether any layer is routed by Mixture-of-Depths (no cached decoding then)."""
        return any(spec.mod for spec in self.layer_specs)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (dtypes by name); ``LMConfig.from_dict`` inverts it."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("dtype", "param_dtype"):
                value = jnp.dtype(value).name
            elif f.name == "moe":
                value = dataclasses.asdict(value)
            elif f.name in ("layer_options", "layer_mlp"):
                value = {str(k): _thaw(v) for k, v in value.items()}
            else:
                value = _thaw(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LMConfig:
        """Builds a config from :meth:`to_dict` output (e.g. read back from JSON)."""
        data = dict(data)
        for name in ("dtype", "param_dtype"):
            if name in data:
                data[name] = jnp.dtype(data[name])
        for name in ("layer_options", "layer_mlp"):
            if name in data:
                data[name] = {int(k): v for k, v in data[name].items()}
        if "mixers" in data:
            data["mixers"] = {k: tuple(v) for k, v in data["mixers"].items()}
        return cls(**data)
