"""HGRN-2 (Qin et al., 2024, "HGRN2: Gated Linear RNNs with State Expansion").

HGRN's element-wise forget gate ``f_t`` expanded to an outer product: per head,
with ``E = expand_ratio`` forget channels (paper sec. 3, eq. 4)::

    f_t = beta + (1 - beta) sigmoid(W_f x_t)       (beta: the layer's lower bound)
    S_t = diag(f_t) S_{t-1} + (1 - f_t) i_t^T,     o_t = S_t^T swish(W_q x_t) / sqrt(E)

so the input gate is tied to the forget gate (``k = 1 - f``), the state is
``[E, D/H]`` per head and ``log_decay = log f`` varies per key channel. The
output is ``W_O RMSNorm(o)``. HGRN stacks layers with a lower bound ``beta``
that grows with depth. With ``lower_bound="learned"`` (the HGRN-2 model, and
the default of letter ``H`` in ``LMConfig``) the bound is a vector per layer
that the LM learns: a parameter ``[n_layers, D]``, a softmax over the layers,
a cumulative sum minus the first layer's share (so layer 0 has no bound and
deeper layers remember longer), passed to each layer as ``lower_bound=``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from effarch.layers.norms import RMSNorm
from effarch.mixers import _recurrence as rec
from effarch.mixers.base import Mixer, MixerConfig, check_decode_inputs, register

# ``lower_bound`` value: the bound is a vector the LM learns per layer.
LEARNED = "learned"
# The paper's state expansion E (HGRN2 sec. 4; flash-linear-attention's default).
PAPER_EXPAND_RATIO = 128


@dataclasses.dataclass(frozen=True, kw_only=True)
class HGRN2Config(MixerConfig):
    """HGRN-2 options.

    Attributes:
      expand_ratio: forget channels E per head (state expansion; paper: 128);
        there are ``H = D / E`` heads, each with a ``[E, D/H]`` state. None:
        the largest divisor of ``d_model`` up to ``PAPER_EXPAND_RATIO`` (128
        wherever it divides), so the default builds at every width.
      lower_bound: ``beta`` in ``[0, 1)``, the smallest forget-gate value of
        this layer (0 for the first layer, larger deeper in the stack); or
        ``"learned"``: a ``[D]`` vector the caller passes (the LM's learned
        per-layer bounds, module docstring).
      chunk_size: chunk length of the chunked form of the op.
    """

    IMPLEMENTATIONS: ClassVar[tuple[str, ...]] = rec.LINEAR_ATTENTION_IMPLEMENTATIONS
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"expand_ratio": 8, "lower_bound": 0.5, "chunk_size": 8},
        "paper": {"expand_ratio": PAPER_EXPAND_RATIO},
    }

    expand_ratio: int | None = None
    lower_bound: float | str = 0.0
    chunk_size: int = 64

    def __post_init__(self):
        super().__post_init__()
        if self.expand_ratio is not None and (self.expand_ratio < 1 or self.d_model % self.expand_ratio):
            raise ValueError(f"hgrn2: expand_ratio={self.expand_ratio} must divide d_model={self.d_model} "
                             "(or None: the largest divisor up to 128).")
        if self.lower_bound != LEARNED and not (
                isinstance(self.lower_bound, (int, float)) and 0.0 <= self.lower_bound < 1.0):
            raise ValueError(f"hgrn2: lower_bound={self.lower_bound!r}; expected a float in [0, 1) or "
                             f"{LEARNED!r} (per-layer bounds learned by the LM).")
        if self.chunk_size < 1:
            raise ValueError(f"hgrn2: chunk_size={self.chunk_size}; expected >= 1.")

    @property
    def expansion(self) -> int:
        """E, the forget channels per head (``expand_ratio`` resolved)."""
        if self.expand_ratio is not None:
            return self.expand_ratio
        return max(e for e in range(1, min(self.d_model, PAPER_EXPAND_RATIO) + 1) if self.d_model % e == 0)

    @property
    def num_heads(self) -> int:
        return self.d_model // self.expansion


def forget_gate(logits: jax.Array, lower_bound: float | jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(log f, 1 - f)`` with ``f = beta + (1 - beta) sigmoid(logits)``, float32.

    ``beta`` is a float or an array broadcasting against ``logits`` (a
    learned ``[D]`` bound). For ``beta = 0`` the log is ``logsigmoid`` and
    ``1 - f = sigmoid(-logits)``, both exact where ``f`` rounds to 1; an array
    uses ``log f = logaddexp(logsigmoid(z), log beta + logsigmoid(-z))``,
    which is the same where ``beta`` is 0.
    """
    logits = logits.astype(jnp.float32)
    if isinstance(lower_bound, (int, float)) and lower_bound == 0.0:
        return jax.nn.log_sigmoid(logits), jax.nn.sigmoid(-logits)
    if isinstance(lower_bound, (int, float)):
        f = lower_bound + (1.0 - lower_bound) * jax.nn.sigmoid(logits)
        return jnp.log(f), (1.0 - lower_bound) * jax.nn.sigmoid(-logits)
    beta = jnp.maximum(lower_bound.astype(jnp.float32), 0.0)
    log_f = jnp.logaddexp(jax.nn.log_sigmoid(logits), jnp.log(beta) + jax.nn.log_sigmoid(-logits))
    return log_f, (1.0 - beta) * jax.nn.sigmoid(-logits)


def learned_lower_bounds(logits: jax.Array) -> jax.Array:
    """HGRN-2's per-layer bounds from the LM's parameter ``[L, D]``: softmax over layers, cumsum, minus layer 0's."""
    shares = jax.nn.softmax(logits.astype(jnp.float32), axis=0)
    # sum_{j=1..i} shares_j, a direct sum: never below 0 (cumsum - shares[0] can round to -1e-9 under
    # jit, whose log in the forget gate is NaN).
    return jnp.concatenate([jnp.zeros_like(shares[:1]), jnp.cumsum(shares[1:], axis=0)], axis=0)


@register("hgrn2", HGRN2Config)
class HGRN2(Mixer):
    """HGRN-2; see the module docstring."""

    config: HGRN2Config

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> rec.RecurrentCache:
        cfg = self.config
        h = cfg.num_heads
        return rec.empty_cache(batch_size, h, cfg.expansion, cfg.d_model // h, dtype=dtype)

    @nn.compact
    def __call__(self, x, cache=None, *, segment_ids=None, lower_bound=None):
        """As every mixer; ``lower_bound``: the ``[D]`` bound when ``config.lower_bound == "learned"``."""
        cfg = self.config
        check_decode_inputs(self.registry_name, x, cache, segment_ids, cfg.d_model)
        if (cfg.lower_bound == LEARNED) != (lower_bound is not None):
            raise ValueError(
                f"hgrn2: lower_bound={cfg.lower_bound!r} in the config and lower_bound="
                f"{None if lower_bound is None else tuple(lower_bound.shape)} in the call; a 'learned' bound "
                "comes from the LM (a [d_model] vector per call), a float bound from the config only."
            )
        if lower_bound is not None and tuple(lower_bound.shape) != (cfg.d_model,):
            raise ValueError(f"hgrn2: lower_bound has shape {tuple(lower_bound.shape)}; expected [{cfg.d_model}].")
        beta = cfg.lower_bound if lower_bound is None else lower_bound
        h = cfg.num_heads
        x = x.astype(cfg.dtype)
        q = jax.nn.silu(self.proj(cfg.d_model, "q_proj")(x))  # [B,T,H*E]
        log_f, one_minus_f = forget_gate(self.proj(cfg.d_model, "f_proj")(x), beta)
        i = self.proj(cfg.d_model, "i_proj")(x)  # [B,T,D]
        o, cache = rec.run_linear_attention(
            rec.split_heads(q, h), rec.split_heads(one_minus_f.astype(cfg.dtype), h), rec.split_heads(i, h),
            rec.split_heads(log_f, h), cache=cache, segment_ids=segment_ids, chunk_size=cfg.chunk_size,
            implementation=cfg.implementation)
        o = RMSNorm(dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="norm")(rec.merge_heads(o))
        return self.proj(cfg.d_model, "o_proj")(o), cache
