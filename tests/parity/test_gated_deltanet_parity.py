"""Gated DeltaNet against transformers' Qwen3NextGatedDeltaNet (its torch fallback; no fla kernels on CPU)."""

import jax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import _port  # noqa: E402
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet  # noqa: E402

from effarch import mixers  # noqa: E402

B, T, D = 2, 13, 16
CHUNK = 4


def port_gated_deltanet(layer):
    """Qwen3NextGatedDeltaNet's weights as effarch ``gated_deltanet`` parameters.

    Its ``in_proj_qkvz`` rows are grouped per key head ``[q (K), k (K), v (r V), z (r V)]``
    with ``r = H_v / H_k`` (``in_proj_ba`` likewise ``[b (r), a (r)]``); its one
    convolution runs over ``[q, k, v]``; effarch keeps one projection and one
    convolution per stream.
    """
    hk, hv, kd, vd = layer.num_k_heads, layer.num_v_heads, layer.head_k_dim, layer.head_v_dim
    r = hv // hk
    qkvz = layer.in_proj_qkvz.weight.reshape(hk, 2 * kd + 2 * r * vd, -1)  # [H_k, rows, D]
    q, k, v, z = (w.reshape(-1, w.shape[-1]) for w in torch.split(qkvz, [kd, kd, r * vd, r * vd], dim=1))
    b, a = (w.reshape(-1, w.shape[-1]) for w in torch.split(layer.in_proj_ba.weight.reshape(hk, 2 * r, -1), r, dim=1))
    conv_q, conv_k, conv_v = torch.split(layer.conv1d.weight, [hk * kd, hk * kd, hv * vd], dim=0)
    return {"params": {
        "q_proj": _port.dense(q), "k_proj": _port.dense(k), "v_proj": _port.dense(v), "g_proj": _port.dense(z),
        "b_proj": _port.dense(b), "a_proj": _port.dense(a),
        "conv_q": _port.conv(conv_q), "conv_k": _port.conv(conv_k), "conv_v": _port.conv(conv_v),
        "A_log": _port.array(layer.A_log), "dt_bias": _port.array(layer.dt_bias),
        "o_norm": {"scale": _port.array(layer.norm.weight)},
        "o_proj": _port.dense(layer.out_proj.weight),
    }}


def _reference(layer, config):
    """``x -> (full, step)``: one full call, then a prefill of T-1 tokens and one cached step."""

    def run(x):
        cache = transformers.DynamicCache(config=config)
        layer(x[:, :-1], cache=cache)
        return layer(x), layer(x[:, -1:], cache=cache)

    return run


@pytest.mark.parametrize("key_heads,value_heads,key_dim,value_dim",
                         [(2, 4, 8, 8), (2, 2, 4, 8)], ids=["Hk2-Hv4", "Hk2-Hv2-V2K"])
def test_gated_deltanet_matches_qwen3_next(key_heads, value_heads, key_dim, value_dim):
    config = transformers.Qwen3NextConfig(
        hidden_size=D, linear_num_key_heads=key_heads, linear_num_value_heads=value_heads,
        linear_key_head_dim=key_dim, linear_value_head_dim=value_dim, linear_conv_kernel_dim=4,
        num_hidden_layers=1, layer_types=["linear_attention"], vocab_size=32)
    torch.manual_seed(0)
    layer = _port.randomize_(Qwen3NextGatedDeltaNet(config, layer_idx=0), seed=1)
    mixer = mixers.build("gated_deltanet", d_model=D, head_dim=key_dim, num_heads=key_heads,
                         num_v_heads=value_heads, expand_v=value_dim // key_dim, norm_eps=config.rms_norm_eps,
                         chunk_size=CHUNK)
    x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
    _port.check_parity(mixer, port_gated_deltanet(layer), x, _reference(layer, config),
                       f"gated_deltanet Hk{key_heads} Hv{value_heads}")
