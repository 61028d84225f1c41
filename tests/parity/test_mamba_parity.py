"""Mamba-1 and Mamba-2 against transformers' MambaMixer and Mamba2Mixer (torch fallback paths)."""

import jax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import _port  # noqa: E402
from transformers.models.mamba.modeling_mamba import MambaMixer  # noqa: E402
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer  # noqa: E402

from effarch import mixers  # noqa: E402

B, T, D = 2, 13, 16


def _cached_reference(layer, config):
    """``x -> (full, step)`` of a transformers mixer: one full call, then a prefill of T-1 and one step."""

    def run(x):
        cache = transformers.DynamicCache(config=config)
        layer(x[:, :-1], cache=cache)
        return layer(x), layer(x[:, -1:], cache=cache)

    return run


def port_mamba(layer):
    """MambaMixer's weights as effarch ``mamba`` parameters."""
    return {"params": {
        "in_proj": _port.dense(layer.in_proj.weight),
        "conv": _port.conv(layer.conv1d.weight, layer.conv1d.bias),
        "x_proj": _port.dense(layer.x_proj.weight),
        "dt_proj": _port.dense(layer.dt_proj.weight),
        "dt_bias": _port.array(layer.dt_proj.bias),
        "A_log": _port.array(layer.A_log),
        "D": _port.array(layer.D),
        "out_proj": _port.dense(layer.out_proj.weight),
    }}


def port_mamba2(layer):
    """Mamba2Mixer's weights as effarch ``mamba2`` parameters (``in_proj`` is ``[z, xBC, dt]`` in both)."""
    return {"params": {
        "in_proj": _port.dense(layer.in_proj.weight),
        "conv": _port.conv(layer.conv1d.weight, layer.conv1d.bias),
        "dt_bias": _port.array(layer.dt_bias),
        "A_log": _port.array(layer.A_log),
        "D": _port.array(layer.D),
        "norm": {"scale": _port.array(layer.norm.weight)},
        "out_proj": _port.dense(layer.out_proj.weight),
    }}


def test_mamba_matches_transformers_mamba_mixer():
    config = transformers.MambaConfig(hidden_size=D, state_size=4, expand=2, conv_kernel=4, num_hidden_layers=1)
    torch.manual_seed(0)
    layer = _port.randomize_(MambaMixer(config, layer_idx=0), seed=1)
    mixer = mixers.build("mamba", d_model=D, d_state=4, expand=2, d_conv=4)
    x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
    _port.check_parity(mixer, port_mamba(layer), x, _cached_reference(layer, config), "mamba")


@pytest.mark.parametrize("ngroups", [1, 2], ids=["G1", "G2"])
def test_mamba2_matches_transformers_mamba2_mixer(ngroups):
    config = transformers.Mamba2Config(hidden_size=D, num_heads=4, head_dim=8, state_size=8, n_groups=ngroups,
                                       expand=2, conv_kernel=4, chunk_size=4, num_hidden_layers=1)
    torch.manual_seed(0)
    layer = _port.randomize_(Mamba2Mixer(config, layer_idx=0), seed=1)
    mixer = mixers.build("mamba2", d_model=D, d_state=8, head_dim=8, ngroups=ngroups, expand=2, d_conv=4,
                         chunk_size=4)
    x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
    _port.check_parity(mixer, port_mamba2(layer), x, _cached_reference(layer, config), f"mamba2 G{ngroups}")
