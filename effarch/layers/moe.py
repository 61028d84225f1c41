"""Mixture-of-Experts SwiGLU MLP: top-k softmax router, capacity, sort-based dispatch.

Each token picks its ``top_k`` experts by router probability (Shazeer et al.,
2017; GShard, Lepikhin et al., 2020; Switch, Fedus et al., 2021). Every expert
has room for ``capacity = ceil(capacity_factor * N * top_k / E)`` tokens (N
tokens in the call); assignments beyond that are dropped (the token keeps only
its residual path for that choice) and counted. First choices of all tokens
take precedence over second choices (GShard's priority), then token order.
``capacity_factor=None`` drops nothing: every expert has room for all N tokens
(the dropless MoE of Mixtral and Jamba, at the price of an ``[E, N, D]``
buffer). ``normalize_gates`` renormalises the chosen experts' probabilities
to sum to one (Qwen's ``norm_topk_prob``), and ``shared_d_ff`` adds a shared
SwiGLU expert every token passes through, weighted by ``sigmoid(w . x)``
(Qwen2-MoE, Qwen3-Next).

Dispatch sorts the ``N * top_k`` assignments by expert, gives each its rank in
the expert's queue, and gathers the tokens into an ``[E, capacity, D]`` buffer;
all experts then run as one batched matmul (``"ecd,edf->ecf"``), and the outputs
are gathered back and summed weighted by the router probabilities. No Python
loop over experts.

The load-balancing loss is Switch/GShard's ``E * sum_e f_e * P_e`` with ``f_e``
the fraction of assignments routed to expert e and ``P_e`` the mean router
probability of e; it is 1 for perfectly uniform routing.

:func:`moe_reference` is the readable truth: every expert on every token,
masked by the routing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effarch.layers.mlp import GatedMLP

# Logical axis names of the expert and router weights (docs/models.md).
EXPERT_IN_AXES = ("expert", "embed", "mlp")
EXPERT_OUT_AXES = ("expert", "mlp", "embed")
ROUTER_AXES = ("embed", None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Options of the MoE MLP.

    Attributes:
      num_experts: number of experts E.
      top_k: experts per token (1 = Switch, 2 = GShard / Mixtral).
      capacity_factor: slack of each expert's buffer over a perfectly even
        split; ``capacity = ceil(capacity_factor * N * top_k / E)`` tokens.
        None: no token is ever dropped (capacity N).
      aux_loss_weight: weight of the load-balancing loss in the model's
        ``aux_loss``.
      d_ff: hidden width of each expert; None takes the model's ``d_ff``.
      normalize_gates: the chosen experts' weights are their probabilities
        renormalised over the top k (else the probabilities themselves).
      shared_d_ff: width of a shared expert (a SwiGLU on every token, scaled
        by a learned sigmoid gate); None: no shared expert.
    """

    num_experts: int = 8
    top_k: int = 2
    capacity_factor: float | None = 1.25
    aux_loss_weight: float = 0.01
    d_ff: int | None = None
    normalize_gates: bool = False
    shared_d_ff: int | None = None

    def __post_init__(self):
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"MoEConfig: num_experts={self.num_experts!r}; expected an int >= 1.")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"MoEConfig: top_k={self.top_k!r}; expected an int in [1, num_experts={self.num_experts}]."
            )
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"MoEConfig: capacity_factor={self.capacity_factor!r}; expected > 0, or None "
                             "(drop nothing).")
        if not self.aux_loss_weight >= 0:
            raise ValueError(f"MoEConfig: aux_loss_weight={self.aux_loss_weight!r}; expected >= 0.")
        for field in ("d_ff", "shared_d_ff"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"MoEConfig: {field}={value!r}; expected None or an int >= 1.")


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float | None) -> int:
    """Tokens each expert can take: ``ceil(capacity_factor * N * k / E)``, within [1, N].

    An expert never receives more than N assignments (a token's k choices are
    distinct experts), so N is always enough: ``capacity_factor=None`` gives N.
    """
    if capacity_factor is None:
        return num_tokens
    return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


def route(router_logits: jax.Array, top_k: int, normalize_gates: bool = False
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Softmax router.

    Args:
      router_logits: ``[N, E]``.
      top_k: experts per token.
      normalize_gates: renormalise the gates over the chosen experts.

    Returns:
      probs ``[N, E]`` float32, gates ``[N, k]`` (the chosen experts'
      probabilities, renormalised to sum to 1 with ``normalize_gates``),
      experts ``[N, k]`` int32, best first.
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    gates, experts = jax.lax.top_k(probs, top_k)
    if normalize_gates:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return probs, gates, experts.astype(jnp.int32)


def load_balancing_loss(probs: jax.Array, experts: jax.Array) -> jax.Array:
    """Switch/GShard auxiliary loss ``E * sum_e f_e P_e``.

    Args:
      probs: ``[N, E]`` router probabilities.
      experts: ``[N, k]`` chosen experts.

    Returns:
      Scalar; 1 when routing is perfectly uniform, E when all goes to one expert.
    """
    num_experts = probs.shape[-1]
    counts = jnp.bincount(experts.reshape(-1), length=num_experts)  # [E]
    fraction = counts / experts.size  # f_e, sums to 1
    mean_prob = jnp.mean(probs, axis=0)  # P_e, sums to 1
    return num_experts * jnp.sum(fraction * mean_prob)


def queue_positions(experts: jax.Array, num_experts: int) -> jax.Array:
    """Rank of each assignment in its expert's queue, by sorting.

    Args:
      experts: ``[A]`` expert of each assignment, in priority order.

    Returns:
      ``[A]`` int32: how many earlier assignments chose the same expert.
    """
    num = experts.shape[0]
    order = jnp.argsort(experts, stable=True)  # assignments grouped by expert
    counts = jnp.bincount(experts, length=num_experts)  # [E]
    starts = jnp.cumsum(counts) - counts  # first sorted index of each expert
    rank_sorted = jnp.arange(num, dtype=jnp.int32) - starts[experts[order]]
    return jnp.zeros(num, jnp.int32).at[order].set(rank_sorted)


def swiglu_experts(buffer: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """Every expert's SwiGLU on its own tokens: ``[E, C, D] -> [E, C, D]``."""
    gate = jnp.einsum("ecd,edf->ecf", buffer, w_gate)
    up = jnp.einsum("ecd,edf->ecf", buffer, w_up)
    return jnp.einsum("ecf,efd->ecd", jax.nn.silu(gate) * up, w_down)


def moe_forward(
    x: jax.Array,
    router: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    top_k: int,
    capacity_factor: float | None,
    normalize_gates: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The MoE MLP on a flat batch of tokens.

    Args:
      x: ``[N, D]`` tokens.
      router: ``[D, E]`` router weights.
      w_gate, w_up: ``[E, D, F]`` expert input weights.
      w_down: ``[E, F, D]`` expert output weights.
      top_k: experts per token.
      capacity_factor: see :class:`MoEConfig`.
      normalize_gates: see :class:`MoEConfig`.

    Returns:
      ``y [N, D]`` and ``{"moe_aux_loss", "moe_dropped_fraction"}`` scalars.
    """
    n, d = x.shape
    e = router.shape[-1]
    cap = expert_capacity(n, e, top_k, capacity_factor)
    probs, gates, experts = route(x.astype(jnp.float32) @ router.astype(jnp.float32), top_k, normalize_gates)

    # Assignments in priority order: all first choices, then all second, ...
    assigned_expert = experts.T.reshape(-1)  # [k*N]
    assigned_token = jnp.tile(jnp.arange(n, dtype=jnp.int32), top_k)  # [k*N]
    position = queue_positions(assigned_expert, e)  # [k*N]
    kept = position < cap
    overflow = e * cap  # one extra slot that dropped assignments point at
    slot = jnp.where(kept, assigned_expert * cap + position, overflow)  # [k*N]

    # Gather: which token fills each slot (empty slots read a zero row).
    slot_token = jnp.full(overflow + 1, n, jnp.int32).at[slot].set(assigned_token)
    x_padded = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])  # [N+1, D]
    buffer = x_padded[slot_token[:overflow]].reshape(e, cap, d)  # [E, C, D]

    out = swiglu_experts(buffer, w_gate, w_up, w_down).reshape(overflow, d)  # [E*C, D]
    out_padded = jnp.concatenate([out, jnp.zeros((1, d), out.dtype)])  # [E*C+1, D]
    weights = gates.T.reshape(-1, 1).astype(out.dtype)  # [k*N, 1]
    y = (out_padded[slot] * weights).reshape(top_k, n, d).sum(axis=0)  # [N, D]

    aux = {
        "moe_aux_loss": load_balancing_loss(probs, experts),
        "moe_dropped_fraction": 1.0 - jnp.mean(kept.astype(jnp.float32)),
    }
    return y, aux


def moe_reference(x, router, w_gate, w_up, w_down, *, top_k: int, normalize_gates: bool = False) -> jax.Array:
    """Reference MoE without capacity: every expert on every token, masked by routing.

    ``x [N, D] -> [N, D]``; equals :func:`moe_forward` when nothing is dropped.
    """
    probs, gates, experts = route(x.astype(jnp.float32) @ router.astype(jnp.float32), top_k, normalize_gates)
    weight = jnp.zeros_like(probs).at[jnp.arange(x.shape[0])[:, None], experts].set(gates)  # [N, E]
    every = jnp.stack(
        [(jax.nn.silu(x @ w_gate[i]) * (x @ w_up[i])) @ w_down[i] for i in range(router.shape[-1])],
        axis=1,
    )  # [N, E, D]
    return jnp.einsum("ne,ned->nd", weight.astype(every.dtype), every)


class MoE(nn.Module):
    """MoE SwiGLU MLP ``[B,T,D] -> ([B,T,D], aux)``; see the module docstring.

    Attributes:
      config: the MoE options.
      d_ff: expert hidden width F (``config.d_ff`` wins when set).
      dtype: compute dtype of the expert matmuls (the router runs in float32).
      param_dtype: parameter dtype.
    """

    config: MoEConfig
    d_ff: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.config
        b, t, d = x.shape
        e, f = cfg.num_experts, cfg.d_ff or self.d_ff

        def param(name, axes, shape, init):
            return self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)

        # Each expert's matrices get the fan-in of a single dense layer.
        expert_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1)
        router = param("router", ROUTER_AXES, (d, e), nn.initializers.lecun_normal())
        w_gate = param("gate", EXPERT_IN_AXES, (e, d, f), expert_init)
        w_up = param("up", EXPERT_IN_AXES, (e, d, f), expert_init)
        w_down = param("down", EXPERT_OUT_AXES, (e, f, d), expert_init)
        y, aux = moe_forward(
            x.reshape(b * t, d).astype(self.dtype),
            router,
            w_gate.astype(self.dtype),
            w_up.astype(self.dtype),
            w_down.astype(self.dtype),
            top_k=cfg.top_k,
            capacity_factor=cfg.capacity_factor,
            normalize_gates=cfg.normalize_gates,
        )
        y = y.reshape(b, t, d)
        if cfg.shared_d_ff is not None:
            x = x.astype(self.dtype)
            shared = GatedMLP(d_ff=cfg.shared_d_ff, dtype=self.dtype, param_dtype=self.param_dtype, name="shared")(x)
            gate = nn.Dense(1, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="shared_gate")(x)
            y = y + jax.nn.sigmoid(gate) * shared  # [B,T,1] * [B,T,D]
        return y, aux
