"""The one mixer interface, its config base and the registry.

Every mixer is a ``flax.linen`` Module mapping ``x [B,T,D] -> y [B,T,D]``::

    mixer = mixers.build("mamba2", d_model=256, **options)
    params = mixer.init(key, x)
    y, cache = mixer.apply(params, x)                        # full sequence, cache None
    cache = mixer.init_cache(batch_size, max_len, dtype)      # empty state
    y, cache = mixer.apply(params, prompt, cache=cache)       # prefill
    y_t, cache = mixer.apply(params, x_t, cache=cache)        # one or more steps

A prefill followed by token-by-token decoding equals one full-sequence call.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from effarch.layers.linear import PROJECTIONS, projection

_REGISTRY: dict[str, tuple[type["MixerConfig"], type["Mixer"]]] = {}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixerConfig:
    """Options every mixer shares.

    Attributes:
      d_model: width D of the input and output ``[B,T,D]``.
      dtype: compute dtype of activations and matmuls.
      param_dtype: dtype parameters are stored in.
      implementation: how the op computes the recurrence, passed to
        ``effarch.ops`` (``"auto"``, ``"recurrent"``, ``"chunked"``, ...).
      projection: ``"dense"`` or ``"bitlinear"`` (BitNet b1.58) for every projection.
    """

    # Named option sets, e.g. {"tiny": {...}} used by tests and docs; every
    # mixer defines at least "tiny" (a few thousand parameters, fast on CPU).
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"tiny": {}}
    # The op implementations this mixer accepts, the reference first ("auto" is
    # always accepted too); tests check that all of them agree through the mixer.
    IMPLEMENTATIONS: ClassVar[tuple[str, ...]] = ()

    d_model: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    implementation: str = "auto"
    projection: str = "dense"

    def __post_init__(self):
        if not isinstance(self.d_model, int) or self.d_model <= 0:
            raise ValueError(f"d_model={self.d_model!r}; expected a positive int.")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection={self.projection!r}; expected one of {PROJECTIONS}.")


class Mixer(nn.Module):
    """Abstract sequence mixer: ``__call__(x, cache=None, *, segment_ids=None)``.

    Subclasses set ``config`` to their config dataclass, implement ``__call__``
    returning ``(y, cache)`` and ``init_cache``. With ``cache=None`` the call
    processes a whole sequence from an empty state and returns ``None`` as the
    cache; with a cache it continues from it and returns the updated cache.
    """

    config: MixerConfig

    def __call__(self, x: jax.Array, cache: Any = None, *, segment_ids: jax.Array | None = None):
        raise NotImplementedError(f"{type(self).__name__} must define __call__")

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> Any:
        """An empty decode cache for ``batch_size`` sequences of up to ``max_len`` tokens."""
        raise NotImplementedError(f"{type(self).__name__} must define init_cache")

    def proj(self, features: int, name: str, use_bias: bool = False, **kwargs) -> nn.Module:
        """A projection of the configured kind (dense or BitLinear)."""
        cfg = self.config
        return projection(features, kind=cfg.projection, use_bias=use_bias, dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype, name=name, **kwargs)


def check_decode_inputs(name: str, x: jax.Array, cache: Any, segment_ids: Any, d_model: int) -> None:
    """Shared checks of a mixer call: rank, width, no segment_ids while decoding."""
    if x.ndim != 3 or x.shape[-1] != d_model:
        raise ValueError(
            f"{name}: x has shape {tuple(x.shape)}; expected [B,T,D] with D=d_model={d_model}."
        )
    if cache is not None and segment_ids is not None:
        raise ValueError(
            f"{name}: segment_ids are for packed full sequences; decoding from a cache "
            "takes one sequence per batch row (pass segment_ids=None)."
        )


def register(name: str, config_cls: type[MixerConfig]):
    """Class decorator: ``@register("mamba2", Mamba2Config)``."""

    def wrap(cls):
        if name in _REGISTRY:
            raise ValueError(f"mixer {name!r} is registered twice")
        _REGISTRY[name] = (config_cls, cls)
        cls.registry_name = name
        return cls

    return wrap


def names() -> tuple[str, ...]:
    """Registered mixer names, sorted."""
    return tuple(sorted(_REGISTRY))


def config_class(name: str) -> type[MixerConfig]:
    """The config dataclass of mixer ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown mixer {name!r}; valid: {', '.join(names())}.")
    return _REGISTRY[name][0]


def preset_options(name: str, preset: str | None) -> dict[str, Any]:
    """The options of mixer ``name``'s named ``preset`` (``PRESETS``); ``{}`` for None."""
    if preset is None:
        return {}
    presets = config_class(name).PRESETS
    if preset not in presets:
        raise ValueError(f"mixer {name!r} has no preset {preset!r}; valid: {', '.join(sorted(presets))}.")
    return dict(presets[preset])


def make_config(name: str, d_model: int, **options) -> MixerConfig:
    """Builds and validates the config of mixer ``name``; unknown options list the valid ones."""
    cls = config_class(name)
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(
            f"mixer {name!r} has no option(s) {unknown}; valid: {', '.join(sorted(valid - {'d_model'}))}."
        )
    return cls(d_model=d_model, **options)


def build(name: str, d_model: int, *, preset: str | None = None, **options) -> Mixer:
    """The mixer ``name`` as a ``flax.linen`` Module with a validated config.

    Args:
      name: a registered mixer name (``names()`` lists them).
      d_model: width D of ``x [B,T,D]``.
      preset: optional named option set from the config's ``PRESETS``;
        ``options`` override it.
      **options: fields of the mixer's config dataclass.
    """
    config = make_config(name, d_model, **{**preset_options(name, preset), **options})
    return _REGISTRY[name][1](config=config)


def from_config(config: MixerConfig) -> Mixer:
    """The mixer module for an already-built config."""
    for cfg_cls, cls in _REGISTRY.values():
        if type(config) is cfg_cls:
            return cls(config=config)
    raise ValueError(f"no mixer is registered for config type {type(config).__name__}.")

