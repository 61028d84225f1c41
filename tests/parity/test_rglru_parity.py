"""The Griffin recurrent block against transformers' RecurrentGemmaRecurrentBlock."""

import jax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import _port  # noqa: E402
from transformers.models.recurrent_gemma.modeling_recurrent_gemma import RecurrentGemmaRecurrentBlock  # noqa: E402

from effarch import mixers  # noqa: E402

B, T, D = 2, 13, 16
HEADS = 4


def port_rglru(block):
    """RecurrentGemmaRecurrentBlock's weights as effarch ``rglru`` parameters."""
    lru = block.rg_lru
    return {"params": {
        "gate_proj": _port.dense(block.linear_y.weight, block.linear_y.bias),
        "in_proj": _port.dense(block.linear_x.weight, block.linear_x.bias),
        "conv": _port.conv(block.conv_1d.weight, block.conv_1d.bias),
        "recurrence_gate": {"kernel": _port.array(lru.recurrent_gate_weight),
                            "bias": _port.array(lru.recurrent_gate_bias)},
        "input_gate": {"kernel": _port.array(lru.input_gate_weight), "bias": _port.array(lru.input_gate_bias)},
        "decay_param": _port.array(lru.recurrent_param),
        "out_proj": _port.dense(block.linear_out.weight, block.linear_out.bias),
    }}


def _reference(block):
    """``x -> (full, step)``: the block is stateful, its cache lives on the module."""

    def run(x):
        positions = torch.arange(T)[None].expand(B, T)
        full, _ = block(x, positions, None, use_cache=False)
        block(x[:, :-1], positions[:, :-1], None, use_cache=True)
        step, _ = block(x[:, -1:], positions[:, -1:], None, use_cache=True)
        return full, step

    return run


@pytest.mark.parametrize("lru_width", [D, 24], ids=["W16", "W24"])
def test_rglru_matches_transformers_recurrent_block(lru_width):
    config = transformers.RecurrentGemmaConfig(hidden_size=D, lru_width=lru_width, num_attention_heads=HEADS,
                                               conv1d_width=4, num_hidden_layers=1, vocab_size=32)
    torch.manual_seed(0)
    block = RecurrentGemmaRecurrentBlock(config, layer_idx=0)
    # The RG-LRU's parameters are left uninitialised by its constructor: the release's initialisation first.
    transformers.RecurrentGemmaModel(config)._init_weights(block.rg_lru)
    _port.randomize_(block, seed=1)
    mixer = mixers.build("rglru", d_model=D, lru_width=lru_width, num_heads=HEADS, conv_kernel=4)
    x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
    _port.check_parity(mixer, port_rglru(block), x, _reference(block), f"rglru W{lru_width}")
