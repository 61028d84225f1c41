"""Analytic FLOPs per token of an ``LMConfig``, counted mixer by mixer.

What is counted: the FLOPs of every matrix product (``2 m n k`` for an
``[m, k] @ [k, n]`` product, a multiply and an add each), plus the depthwise
short convolutions (``2 W`` per channel and token). That is the usual "model
FLOPs" convention of scaling-law work (Kaplan et al. 2020; Hoffmann et al.
2022). Per token of a sequence of length ``T``, forward:

* **head**: ``2 D V`` (the logits at every position; the embedding lookup is a
  gather and costs nothing).
* **MLP** (SwiGLU): ``6 D F``; MoE: ``top_k`` experts of ``6 D F`` plus the
  router's ``2 D E``.
* **projections** of each mixer: ``2 x`` its weight matrices' entries (e.g.
  attention's q, k, v, o; Mamba-2's in_proj and out_proj).
* **the mixer's core**, which is what differs between families:

  - attention: ``QK^T`` and ``AV``, ``2 T_kv H K`` each, ``T_kv = T`` (or the
    window). Both grow with the context length. The causal mask is *not*
    halved away: the ``"xla"`` form, which ``"auto"`` takes at these lengths,
    computes the full ``T x T`` scores (as Chinchilla's count does).
  - Mamba-2 (SSD, the chunked form with chunk ``C``), per head with state
    ``N x P``: the scores' product with ``X`` ``2 C P``, the chunk's state
    contribution ``2 N P`` and the read of the entering state ``2 N P``, and
    per group (``ngroups`` G, B and C shared by its heads) the intra-chunk
    ``C B^T`` scores ``2 C N``: ``H (2CP + 4NP) + G 2CN``; plus the short
    convolution over ``xBC``.
  - (Gated) DeltaNet (the chunked WY form), per head with key width ``K`` and
    value width ``V``: ``K K^T`` and ``Q K^T`` (``2CK`` each), the unit
    lower-triangular solve for ``[U | W]`` (``2C(K + V)``, forward
    substitution over full rows), the scores times the pseudo-values
    (``2CV``) and three ``K x V`` state products (``6KV``):
    ``2C(3K + 2V) + 6KV``; plus three short convolutions.
  - any other mixer: its projections only (``2 x`` the entries of its weights
    of rank >= 2 other than norm scales, read from its initialised parameters); its core is *not*
    counted, and :func:`flops_breakdown` says so with ``"core_counted": False``.

  Chunked forms count the padded length ``ceil(T / C) C`` and ``C = min(C, T)``.

Not counted: elementwise work (norms, activations, gates, softmax, the decay
masks of the chunked forms, rotary embeddings), the loss, the optimiser.
XLA's ``cost_analysis()`` counts those too, so it reads a little higher than
this count (about 4% for a small Transformer, 10-15% for small Mamba-2 layers,
whose ``[C, C]`` decay masks are elementwise; tests/models/test_flops.py holds
the difference within a stated bound). Mixture-of-Depths routing is ignored
(every layer counted at capacity 1).

Training FLOPs are ``3 x`` forward (the backward pass costs two forwards; no
rematerialisation is counted).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from effarch import mixers
from effarch.mixers.attention import AttentionConfig
from effarch.mixers.deltanet import DeltaNetConfig, GatedDeltaNetConfig
from effarch.mixers.mamba2 import Mamba2Config
from effarch.models.config import LMConfig

# Training = forward + backward (two forwards' worth of products).
TRAINING_MULTIPLIER = 3.0


def _padded(t: int, chunk: int) -> tuple[int, float]:
    """The chunk length used (``min(chunk, t)``) and padded length / ``t``."""
    c = min(chunk, t)
    return c, (-(-t // c) * c) / t


def _attention(cfg: AttentionConfig, t: int) -> dict[str, float]:
    h, hkv, dh, d = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head, cfg.d_model
    proj = 2 * d * (h * dh + 2 * hkv * dh) + 2 * h * dh * d
    t_kv = t if cfg.window is None else min(cfg.window, t)
    return {"projections": proj, "core": 4 * t_kv * h * dh, "conv": 0.0}


def _mamba2(cfg: Mamba2Config, t: int) -> dict[str, float]:
    d, di, n, g, h, p = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.ngroups, cfg.num_heads, cfg.head_dim
    proj = 2 * d * (2 * di + 2 * g * n + h) + 2 * di * d
    c, pad = _padded(t, cfg.chunk_size)
    core = pad * (h * (2 * c * p + 4 * n * p) + g * 2 * c * n)
    return {"projections": proj, "core": core, "conv": pad * 2 * cfg.d_conv * cfg.conv_dim}


def _deltanet(cfg: DeltaNetConfig, t: int) -> dict[str, float]:
    # hk key heads (q, k); hv value heads (v, beta, decay, gate, state), each key head serving hv / hk.
    d, hk, hv, k, v = cfg.d_model, cfg.heads, cfg.value_heads, cfg.head_dim, cfg.value_dim
    weights = d * (2 * hk * k + hv * v) + d * hv + hv * v * d  # q, k, v, beta, o
    if isinstance(cfg, GatedDeltaNetConfig):
        weights += d * hv + d * hv * v  # a (decay), g (output gate)
    c, pad = _padded(t, cfg.chunk_size)
    core = pad * hv * (2 * c * (3 * k + 2 * v) + 6 * k * v)
    return {"projections": 2 * weights, "core": core, "conv": 2 * cfg.conv_size * (2 * hk * k + hv * v)}


def _generic(cfg, t: int) -> dict[str, float]:
    """Any other mixer: 2 x the entries of its weight matrices (rank >= 2, norm scales aside), core not counted."""
    module = mixers.from_config(cfg)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, min(t, 8), cfg.d_model))))
    leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
    # Norm scales may be [H, K] (per-head norms): not weights of a product.
    weights = sum(math.prod(x.shape) for path, x in leaves
                  if len(x.shape) >= 2 and "scale" not in jax.tree_util.keystr(path))
    return {"projections": 2.0 * weights, "core": 0.0, "conv": 0.0, "core_counted": False}


def mixer_flops(mixer_cfg, seq_len: int) -> dict[str, Any]:
    """Forward FLOPs per token of one mixer: ``{"projections", "core", "conv", "core_counted"}``."""
    if isinstance(mixer_cfg, AttentionConfig):
        out = _attention(mixer_cfg, seq_len)
    elif isinstance(mixer_cfg, Mamba2Config):
        out = _mamba2(mixer_cfg, seq_len)
    elif isinstance(mixer_cfg, DeltaNetConfig):
        out = _deltanet(mixer_cfg, seq_len)
    else:
        out = _generic(mixer_cfg, seq_len)
    return {"core_counted": True, **{k: (float(v) if k != "core_counted" else v) for k, v in out.items()}}


def mlp_flops(config: LMConfig, kind: str | None = None) -> float:
    """Forward FLOPs per token of one block's MLP of ``kind`` (a ``LayerSpec.mlp``; default ``config.mlp``).

    Gated MLPs (SwiGLU, GeGLU) are three D x F matrices; an MoE layer runs
    ``top_k`` experts, its router, and a shared expert with its gate if it has one.
    """
    d, kind = config.d_model, kind or config.mlp
    if kind == "none":
        return 0.0
    if kind in ("swiglu", "geglu"):
        return 6.0 * d * config.mlp_width
    if kind != "moe":
        raise ValueError(f"mlp_flops: MLP kind {kind!r}; expected one of none, swiglu, geglu, moe.")
    moe = config.moe
    out = moe.top_k * 6.0 * d * (moe.d_ff or config.mlp_width) + 2.0 * d * moe.num_experts
    if moe.shared_d_ff is not None:
        out += 6.0 * d * moe.shared_d_ff + 2.0 * d
    return out


def flops_breakdown(config: LMConfig, seq_len: int) -> dict[str, Any]:
    """Forward FLOPs per token by part, for sequences of ``seq_len`` tokens.

    Returns:
      ``{"head", "mlp", "mixer_projections", "mixer_core", "conv", "forward",
      "training", "layers": [per-layer mixer dicts], "core_counted": bool}``;
      ``core_counted`` is False when some mixer's core is not counted (see the
      module docstring).
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"flops_breakdown: seq_len={seq_len!r}; expected a positive int.")
    layers = [mixer_flops(spec.mixer, seq_len) for spec in config.layer_specs]
    out = {
        "head": 2.0 * config.d_model * config.vocab_size,
        "mlp": sum(mlp_flops(config, spec.mlp) for spec in config.layer_specs),
        "mixer_projections": sum(x["projections"] for x in layers),
        "mixer_core": sum(x["core"] for x in layers),
        "conv": sum(x["conv"] for x in layers),
    }
    forward = sum(out.values())
    return {**out, "forward": forward, "training": TRAINING_MULTIPLIER * forward, "layers": layers,
            "core_counted": all(x["core_counted"] for x in layers)}


def flops_per_token(config: LMConfig, seq_len: int, *, training: bool = False) -> float:
    """FLOPs per token (forward, or training = 3 x forward) at sequence length ``seq_len``."""
    parts = flops_breakdown(config, seq_len)
    return parts["training"] if training else parts["forward"]


def param_counts(config: LMConfig) -> dict[str, int]:
    """``{"total", "embedding", "non_embedding"}`` parameter counts of ``LM(config)``.

    ``embedding`` is the token embedding (and the output projection when it is
    untied); ``non_embedding`` is everything else (blocks and final norm), the
    N of scaling laws (Kaplan et al. 2020).
    """
    from effarch.models.lm import LM  # pylint: disable=import-outside-toplevel

    shapes = jax.eval_shape(lambda: LM(config=config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    embedding = config.vocab_size * config.d_model * (1 if config.tie_embeddings else 2)
    return {"total": int(total), "embedding": int(embedding), "non_embedding": int(total - embedding)}
