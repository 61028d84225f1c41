"""The xLSTM-7B mLSTM layer against transformers' ``xLSTM`` (NX-AI's ``xlstm_large`` mLSTMLayer, native kernels)."""

import jax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("xlstm")

import _port  # noqa: E402

from effarch import mixers  # noqa: E402

B, T, D = 2, 13, 32
HEADS = 4


def port_mlstm7b(layer):
    """transformers' xLSTM layer weights as effarch ``mlstm7b`` parameters."""
    return {"params": {
        "q": _port.dense(layer.q.weight), "k": _port.dense(layer.k.weight), "v": _port.dense(layer.v.weight),
        "ogate": _port.dense(layer.ogate_preact.weight),
        "igate": _port.dense(layer.igate_preact.weight, layer.igate_preact.bias),
        "fgate": _port.dense(layer.fgate_preact.weight, layer.fgate_preact.bias),
        "norm": {"scale": _port.array(layer.multihead_norm.weight).reshape(HEADS, -1)},
        "out_proj": _port.dense(layer.out_proj.weight),
    }}


def _reference(layer):
    """``x -> (full, step)``: the whole sequence, then the last token fed after the rest with the state."""

    def run(x):
        full, _ = layer(x)
        _, state = layer(x[:, :-1])
        step, _ = layer(x[:, -1:], state)
        return full, step

    return run


def test_mlstm7b_matches_transformers_xlstm_layer():
    config = transformers.xLSTMConfig(
        vocab_size=61, hidden_size=D, num_heads=HEADS, num_blocks=1, chunk_size=8, return_last_states=True,
        mode="inference", chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native",
        step_kernel="native")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    layer = _port.randomize_(model.backbone.blocks[0].mlstm_layer, seed=1)
    mixer = mixers.build("mlstm7b", d_model=D, num_heads=HEADS, chunk_size=4)
    assert (mixer.config.qk_dim, mixer.config.v_dim, mixer.config.gate_soft_cap) == (16, 32, config.gate_soft_cap)
    x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
    _port.check_parity(mixer, port_mlstm7b(layer), x, _reference(layer), "mlstm7b")
