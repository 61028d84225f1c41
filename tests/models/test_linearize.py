"""effarch.models.linearize: the attention -> recurrent weight mapping, the new-parameter mask, the errors.

The references are written here from the mapping's definition (docs in the
module): each converted layer is its target's recurrence run on the teacher's
own q, k, v projections, with the stated initial decay, gates and norms.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effarch import mixers
from effarch.models import LM, LMConfig
from effarch.models import linearize as lz

D, T, B = 32, 7, 2


def _teacher(num_kv_heads=None, pattern="A", **attention):
    cfg = LMConfig(d_model=D, n_layers=2, pattern=pattern, d_ff=64,
                   mixers={"A": ("attention", {"num_heads": 4, "num_kv_heads": num_kv_heads, **attention})})
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, 256)
    params = jax.tree.map(jnp.asarray, nn.unbox(LM(cfg).init(jax.random.key(0), tokens)["params"]))
    return cfg, params, tokens


def _x(key=3):
    return jax.random.normal(jax.random.key(key), (B, T, D))


def _qkv(att_params, h=4, hkv=4):
    """The teacher's un-rotated q, k, v ``[B,T,H,d]`` (k, v repeated to H heads) for input ``_x()``."""
    x = _x()
    split = lambda y, n: y.reshape(B, T, n, -1)  # noqa: E731
    q = split(x @ att_params["q_proj"]["kernel"], h)
    k = jnp.repeat(split(x @ att_params["k_proj"]["kernel"], hkv), h // hkv, axis=2)
    v = jnp.repeat(split(x @ att_params["v_proj"]["kernel"], hkv), h // hkv, axis=2)
    return x, q, k, v


def _recurrence(q, k, v, decay, beta=None, scale=1.0):
    """Per head ``S_t = a (I - beta k k^T) S + beta k v^T`` (beta None: ``a S + k v^T``), ``o = scale S^T q``."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    out = np.zeros(v.shape)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            s = np.zeros((k.shape[-1], v.shape[-1]))
            for t in range(q.shape[1]):
                kt, vt = k[b, t, h], v[b, t, h]
                if beta is None:
                    s = decay[h] * s + np.outer(kt, vt)
                else:
                    s = decay[h] * (s - beta * np.outer(kt, kt @ s)) + beta * np.outer(kt, vt)
                out[b, t, h] = scale * s.T @ q[b, t, h]
    return out


def _rms(x, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _silu(x):
    return x / (1 + np.exp(-x))


def _converted(target, teacher_cfg, teacher_params, layers=None):
    student_cfg = lz.converted_config(teacher_cfg, target, layers)
    params, new = lz.convert_params(teacher_cfg, teacher_params, student_cfg, jax.random.key(5))
    return student_cfg, params, new


def _mixer_out(student_cfg, params, layer=0):
    mixer = mixers.from_config(student_cfg.layer_specs[layer].mixer)
    return np.asarray(mixer.apply({"params": params[f"layer_{layer}"]["mixer"]}, _x())[0], np.float64)


@pytest.mark.parametrize("num_kv_heads", [None, 2], ids=["mha", "gqa"])
def test_linear_attention_equals_attention_when_all_scores_are_equal(num_kv_heads):
    # q = 0: softmax gives every key of the prefix the same weight, and so does the Hedgehog map at identity
    # (phi(0) is uniform, so phi(0).phi(k) = 2/d for every k): both return the running mean of the values.
    cfg, params, _ = _teacher(num_kv_heads)
    att = params["layer_0"]["mixer"]
    params["layer_0"]["mixer"] = {**att, "q_proj": {"kernel": jnp.zeros_like(att["q_proj"]["kernel"])}}
    student_cfg, student, _ = _converted("linear_attention", cfg, params)
    attention = mixers.from_config(cfg.layer_specs[0].mixer)
    y_att = np.asarray(attention.apply({"params": params["layer_0"]["mixer"]}, _x())[0])
    np.testing.assert_allclose(_mixer_out(student_cfg, student), y_att, rtol=2e-5, atol=2e-6)
    _, _, k, v = _qkv(params["layer_0"]["mixer"], 4, num_kv_heads or 4)
    running_mean = np.cumsum(np.asarray(v), axis=1) / np.arange(1, T + 1)[None, :, None, None]
    expected = running_mean.reshape(B, T, D) @ np.asarray(att["o_proj"]["kernel"])
    np.testing.assert_allclose(y_att, expected, rtol=2e-5, atol=2e-6)


def test_linear_attention_maps_q_k_v_through_hedgehog():
    cfg, params, _ = _teacher()
    student_cfg, student, _ = _converted("linear_attention", cfg, params)
    att = params["layer_0"]["mixer"]
    _, q, k, v = _qkv(att)
    phi = lambda u: np.concatenate([jax.nn.softmax(u, -1), jax.nn.softmax(-u, -1)], -1)  # noqa: E731
    num = _recurrence(phi(q), phi(k), np.concatenate([v, np.ones((*v.shape[:-1], 1))], -1), np.ones(4))
    o = num[..., :-1] / (num[..., -1:] + 1e-6)
    expected = o.reshape(B, T, D) @ np.asarray(att["o_proj"]["kernel"], np.float64)
    np.testing.assert_allclose(_mixer_out(student_cfg, student), expected, rtol=1e-4, atol=1e-5)


def test_gla_is_decayed_linear_attention_of_the_teachers_q_k_v():
    cfg, params, _ = _teacher()
    student_cfg, student, _ = _converted("gla", cfg, params)
    att, mix = params["layer_0"]["mixer"], student["layer_0"]["mixer"]
    x, q, k, v = _qkv(att)
    o = _recurrence(q, k, v, lz.initial_decays(4), scale=(D // 4) ** -0.5)
    o = _rms(o, 1e-6) * np.asarray(mix["head_norm"]["scale"]).reshape(1, 1, 4, -1)
    gate = _silu(np.asarray(x @ mix["g_proj"]["kernel"], np.float64))
    expected = (gate * o.reshape(B, T, D)) @ np.asarray(att["o_proj"]["kernel"], np.float64)
    np.testing.assert_allclose(_mixer_out(student_cfg, student), expected, rtol=2e-4, atol=2e-5)


def test_gated_deltanet_is_the_delta_rule_on_the_teachers_q_k_v():
    cfg, params, _ = _teacher()
    student_cfg, student, _ = _converted("gated_deltanet", cfg, params)
    att, mix = params["layer_0"]["mixer"], student["layer_0"]["mixer"]
    x, q, k, v = _qkv(att)
    l2 = lambda u: u / np.sqrt(np.sum(u * u, -1, keepdims=True) + 1e-6)  # noqa: E731
    # Identity convolutions then SiLU; b_proj = 0 gives beta = 1/2.
    q, k, v = l2(_silu(np.asarray(q, np.float64))), l2(_silu(np.asarray(k, np.float64))), _silu(np.asarray(v, np.float64))
    o = _recurrence(q, k, v, lz.initial_decays(4), beta=0.5, scale=(D // 4) ** -0.5)
    o = _rms(o, 1e-5) * np.asarray(mix["o_norm"]["scale"])
    gate = _silu(np.asarray(x @ mix["g_proj"]["kernel"], np.float64)).reshape(B, T, 4, -1)
    expected = (o * gate).reshape(B, T, D) @ np.asarray(att["o_proj"]["kernel"], np.float64)
    np.testing.assert_allclose(_mixer_out(student_cfg, student), expected, rtol=2e-4, atol=2e-5)


def test_mamba2_is_ssd_with_c_from_q_b_from_k_x_from_v():
    cfg, params, _ = _teacher()
    student_cfg, student, _ = _converted("mamba2", cfg, params)
    att, mix = params["layer_0"]["mixer"], student["layer_0"]["mixer"]
    x, q, k, v = _qkv(att)
    # Identity convolution then SiLU; dt = 1 so v is not rescaled; D = 0.
    q, k, v = (_silu(np.asarray(a, np.float64)) for a in (q, k, v))
    y = _recurrence(q, k, v, lz.initial_decays(4)).reshape(B, T, D)
    z = np.asarray(x @ mix["in_proj"]["kernel"][:, :D], np.float64)
    gated = (y * _silu(z)).reshape(B, T, 4, -1)  # the gated norm's groups are the heads
    normed = _rms(gated, 1e-5).reshape(B, T, D) * np.asarray(mix["norm"]["scale"])
    expected = normed @ np.asarray(att["o_proj"]["kernel"], np.float64)
    np.testing.assert_allclose(_mixer_out(student_cfg, student), expected, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("target", lz.TARGETS)
def test_mask_marks_exactly_the_fresh_parameters(target):
    cfg, params, tokens = _teacher(pattern="AA")
    student_cfg, student, new = _converted(target, cfg, params, layers=(1,))
    assert student_cfg.layer_pattern == "A" + lz.TARGET_LETTERS[target]
    shapes = jax.eval_shape(lambda: LM(student_cfg).init(jax.random.key(0), tokens)["params"])
    assert jax.tree.map(lambda a: a.shape, nn.unbox(shapes)) == \
        jax.tree.map(lambda a: a.shape, student)
    flat_new = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(new)}
    flat_teacher = {jax.tree_util.keystr(p): t for p, t in jax.tree_util.tree_leaves_with_path(params)}
    for path, value in jax.tree_util.tree_leaves_with_path(student):
        name, mask = jax.tree_util.keystr(path), np.asarray(flat_new[jax.tree_util.keystr(path)])
        if "layer_1" in name and "'mixer'" in name:
            continue
        # Everything outside the converted mixer comes from the teacher, unchanged, and is not new.
        assert not mask.any(), name
        np.testing.assert_array_equal(value, flat_teacher[name])
    mixer_new = new["layer_1"]["mixer"]
    copied = {"mamba2": ["out_proj"]}.get(target, ["q_proj", "k_proj", "v_proj", "o_proj"])
    for name in copied:
        assert not np.asarray(mixer_new[name]["kernel"]).any(), name
    fresh = [n for n in mixer_new if n not in copied and n != "in_proj"]
    assert fresh and all(np.asarray(m).all() for n in fresh for m in jax.tree.leaves(mixer_new[n]))
    if target == "mamba2":
        in_mask = np.asarray(mixer_new["in_proj"]["kernel"])  # z | x B C (copied) | dt
        assert in_mask[:, :D].all() and not in_mask[:, D:4 * D].any() and in_mask[:, 4 * D:].all()


def test_transfer_loss_trains_only_new_parameters_and_falls():
    import optax

    cfg, params, tokens = _teacher()
    student_cfg, student, new = _converted("linear_attention", cfg, params)
    captured = lz.capture_mixers(LM(cfg), params, tokens)
    assert sorted(captured) == [0, 1] and captured[0][0].shape == (B, T, D)

    def loss_fn(p):
        return lz.transfer_loss(student_cfg, p, captured)[0]

    opt = optax.adam(1e-2)
    state = opt.init(student)
    p = student
    first = float(loss_fn(p))
    for _ in range(10):
        grads = jax.grad(loss_fn)(p)
        updates, state = opt.update(grads, state)
        p = optax.apply_updates(p, jax.tree.map(lambda u, m: u * m, updates, new))
    assert float(loss_fn(p)) < first
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), p, student)
    assert changed["layer_0"]["mixer"]["q_feature"] and not changed["layer_0"]["mixer"]["q_proj"]["kernel"]
    assert not any(jax.tree.leaves(changed["embed"]))


def test_errors_name_the_value():
    cfg, params, _ = _teacher(pattern="A")
    with pytest.raises(ValueError, match=r"target='rwkv7'.*linear_attention"):
        lz.converted_config(cfg, "rwkv7")
    with pytest.raises(ValueError, match=r"--layers='0,x'.*'all'"):
        lz.parse_layers("0,x", 2)
    with pytest.raises(ValueError, match=r"--layers='5'.*0 \.\. 1"):
        lz.parse_layers("5", 2)
    assert lz.parse_layers("all", 2) is None and lz.parse_layers("1,0", 2) == (0, 1)
    hybrid = LMConfig(d_model=D, n_layers=2, pattern="MA", d_ff=64, mixer_preset="tiny")
    with pytest.raises(ValueError, match=r"layer 0 of pattern 'MA' is not attention; the attention layers are \[1\]"):
        lz.converted_config(hybrid, "gla", (0,))
    gated, _, _ = _teacher(output_gate=True)
    with pytest.raises(ValueError, match=r"output_gate"):
        lz.converted_config(gated, "gla")
    with pytest.raises(ValueError, match=r"scan_layers=True"):
        lz.converted_config(LMConfig(d_model=D, n_layers=2, pattern="A", scan_layers=True), "gla")
