"""The mLSTM block against NX-AI's ``xlstm`` package (``mLSTMLayer``, its pure-torch backends)."""

import jax
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("xlstm")

import _port  # noqa: E402
from xlstm.blocks.mlstm.layer import mLSTMLayer, mLSTMLayerConfig  # noqa: E402

from effarch import mixers  # noqa: E402

B, T, D = 2, 13, 16
HEADS = 4


def headwise(layer):
    """A ``LinearHeadwiseExpand`` (``weight [H, out, in]``) as a ``BlockDiagonalLinear`` (``kernel [H, in, out]``)."""
    return {"kernel": _port.array(layer.weight.transpose(1, 2))}


def port_mlstm(layer):
    """mLSTMLayer's weights as effarch ``mlstm`` parameters."""
    cell = layer.mlstm_cell
    return {"params": {
        "up_proj": _port.dense(layer.proj_up.weight),
        "conv": _port.conv(layer.conv1d.conv.weight, layer.conv1d.conv.bias),
        "q_proj": headwise(layer.q_proj), "k_proj": headwise(layer.k_proj), "v_proj": headwise(layer.v_proj),
        "igate": _port.dense(cell.igate.weight), "igate_bias": _port.array(cell.igate.bias),
        "fgate": _port.dense(cell.fgate.weight), "fgate_bias": _port.array(cell.fgate.bias),
        # The release's norm scales by 1 + weight.
        "norm": {"scale": _port.array(cell.outnorm.weight_proxy).reshape(HEADS, -1)},
        "skip": _port.array(layer.learnable_skip),
        "down_proj": _port.dense(layer.proj_down.weight),
    }}


def _reference(layer):
    """``x -> (full, step)``: the parallel form over the sequence; ``step`` feeds every token to ``mLSTMLayer.step``."""

    def run(x):
        state = {"mlstm_state": None, "conv_state": None}
        for t in range(T):
            step, state = layer.step(x[:, t : t + 1], **state)
        return layer(x), step

    return run


def test_mlstm_matches_xlstm_mlstm_layer():
    config = mLSTMLayerConfig(embedding_dim=D, num_heads=HEADS, proj_factor=2.0, conv1d_kernel_size=4,
                              qkv_proj_blocksize=4, context_length=T)
    torch.manual_seed(0)
    layer = _port.randomize_(mLSTMLayer(config), seed=1)
    mixer = mixers.build("mlstm", d_model=D, preset="paper", chunk_size=4)
    assert mixer.config.inner_dim == config._inner_embedding_dim == 64, "2 * 16 rounded up to a multiple of 64"
    x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
    _port.check_parity(mixer, port_mlstm(layer), x, _reference(layer), "mlstm")
