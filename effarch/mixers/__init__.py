"""Every mixer behind one interface: ``mixers.build(name, d_model=..., **options)``.

Importing this package registers every mixer family module listed in
``_FAMILIES``.
"""

import importlib

from effarch.mixers.base import (  # noqa: F401
    Mixer,
    MixerConfig,
    build,
    config_class,
    from_config,
    make_config,
    preset_options,
    names,
    register,
)

# One module per family; each registers its mixers on import.
_FAMILIES = (
    "attention",
    "linear_attention",
    "retnet",
    "gla",
    "hgrn2",
    "mamba",
    "mamba2",
    "s4d",
    "hyena",
    "xlstm",
    "rwkv",
    "rglru",
    "deltanet",
)

for _family in _FAMILIES:
    importlib.import_module(f"effarch.mixers.{_family}")
