"""The language model: embeddings, a pattern of pre-norm mixer + MLP blocks, logits.

    x = embed(tokens) * embed_scale                    # [B,T,D]
    for each layer:  x = x + mixer(norm(x))            # attention, Mamba-2, ... by pattern
                     x = x + mlp(norm(x))              # SwiGLU, GeGLU or MoE (or none), per layer
    logits = softcap(final_norm(x) @ embed^T)          # [B,T,vocab] float32 (tied)

With ``config.early_exit`` the model also has exit heads after chosen layers
(each its own RMSNorm, then the same output head); ``exits=True`` returns every
exit's logits and ``exit_at`` freezes each token's stream after a given exit
(effarch.models.early_exit decodes with exits chosen by confidence).

Usage::

    cfg = LMConfig.preset("tiny")
    lm = LM(config=cfg)
    params = lm.init(key, tokens)
    logits, aux, _ = lm.apply(params, tokens)                       # training
    cache = lm.init_cache(batch_size, max_len)
    logits, aux, cache = lm.apply(params, prompt, cache=cache)      # prefill
    logits, aux, cache = lm.apply(params, next_token, cache=cache)  # decode

``aux`` always holds ``"aux_loss"`` (the weighted sum of auxiliary losses to add
to the LM loss) and, when relevant, ``"moe_aux_loss"``,
``"moe_dropped_fraction"`` (means over MoE layers) and ``"mod_fraction"``
(mean fraction of tokens the MoD layers process).

With ``scan_layers`` the layers run as ``n_layers / P`` scanned copies of a
group of P layers (``LMConfig.period``); :func:`stack_layer_params` and
:func:`unstack_layer_params` convert parameters between the two layouts.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effarch import mixers
from effarch.layers.mlp import GatedMLP
from effarch.layers.mod import MoDRouter, mixture_of_depths, selected_count
from effarch.layers.moe import MoE
from effarch.layers.norms import RMSNorm
from effarch.mixers.hgrn2 import LEARNED, learned_lower_bounds
from effarch.models.config import DENSE_MLP_ACTIVATIONS, LayerSpec, LMConfig

# Logical axis names of the model's own parameters (docs/models.md).
EMBED_AXES = ("vocab", "embed")
UNEMBED_AXES = ("embed", "vocab")
# Name of the stacked axis of scanned parameters.
LAYERS_AXIS = "layers"
# The aux key under which a value-residual block hands on RWKV-7's ``v_first`` (popped by the LM).
V_FIRST = "v_first"
# The LM's parameter of HGRN-2's learned per-layer lower bounds, ``[n_layers, D]``.
LOWER_BOUNDS_PARAM = "hgrn2_lower_bounds"
# GPT-2's embedding initialisation scale.
EMBED_INIT_STD = 0.02

# Per-layer auxiliary metrics, summed over layers then averaged over the layers
# that report them.
MOE_METRICS = ("moe_aux_loss", "moe_dropped_fraction")
MOD_METRICS = ("mod_fraction",)


def takes_value_residual(spec: LayerSpec) -> bool:
    """Whether a layer is RWKV-7 taking part in the value residual across layers (``value_residual=True``)."""
    return getattr(spec.mixer, "value_residual", False) is True


def learns_lower_bound(spec: LayerSpec) -> bool:
    """Whether a layer is HGRN-2 with the LM's learned lower bound (``lower_bound="learned"``)."""
    return getattr(spec.mixer, "lower_bound", None) == LEARNED


def layer_lower_bounds(cfg: LMConfig, params) -> list[jax.Array | None]:
    """Each layer's learned HGRN-2 bound ``[D]`` from the LM's (unboxed, unscanned) params, or None."""
    if LOWER_BOUNDS_PARAM not in params:
        return [None] * cfg.n_layers
    bounds = learned_lower_bounds(params[LOWER_BOUNDS_PARAM])
    return [bounds[i] if learns_lower_bound(spec) else None for i, spec in enumerate(cfg.layer_specs)]


def block_norm(cfg: LMConfig, name: str | None = None) -> RMSNorm:
    """The RMSNorm every block, exit head and the final norm use."""
    return RMSNorm(eps=cfg.norm_eps, zero_centered=cfg.norm_zero_centered, dtype=cfg.dtype,
                   param_dtype=cfg.param_dtype, name=name)


def residual_stream(cfg: LMConfig, embedded: jax.Array) -> jax.Array:
    """Token embeddings ``[B,T,D]`` -> the residual stream: scaled by ``embed_scale``, in its dtype."""
    if cfg.embed_scale is not None:
        embedded = embedded * jnp.asarray(cfg.embed_scale, embedded.dtype)
    return embedded.astype(jnp.float32 if cfg.residual_in_fp32 else cfg.dtype)


def output_logits(cfg: LMConfig, normed: jax.Array, head: jax.Array) -> jax.Array:
    """A normed stream ``[B,T,D]`` and the output head -> float32 (soft-capped) logits ``[B,T,vocab]``.

    ``head`` is the embedding ``[vocab, D]`` itself when ``tie_embeddings`` (no
    transposed copy is made), else the ``unembed`` parameter ``[D, vocab]``.
    """
    # One [B*T, D] matmul, not an einsum batched over B and T: on XLA:CPU without YNNPACK's reduce
    # fusions (effarch/_xla_workarounds.py) the head's weight gradient contracted over two axes
    # ran 1.5x slower (docs/results/speed.md, "Session 10").
    spec = "nd,vd->nv" if cfg.tie_embeddings else "nd,dv->nv"
    batch, length = normed.shape[:2]
    logits = jnp.einsum(spec, normed.reshape(batch * length, -1), head.astype(cfg.dtype),
                        preferred_element_type=jnp.float32).astype(jnp.float32)
    logits = logits.reshape(batch, length, -1)
    if cfg.logits_softcap is not None:
        logits = cfg.logits_softcap * jnp.tanh(logits / cfg.logits_softcap)
    return logits


class Block(nn.Module):
    """One pre-norm residual block: ``x + mixer(norm(x))``, then ``x + mlp(norm(x))``.

    With ``spec.mod`` the whole block runs on the router's top tokens only
    (Mixture-of-Depths, effarch.layers.mod); such a block refuses a cache.

    Attributes:
      config: the model config.
      spec: this layer's letter, mixer config and MoD flag.
    """

    config: LMConfig
    spec: LayerSpec

    def setup(self):
        cfg = self.config
        self.mixer_norm = block_norm(cfg)
        self.mixer = mixers.from_config(self.spec.mixer)
        if self.spec.mlp != "none":
            self.mlp_norm = block_norm(cfg)
        if self.spec.mlp in DENSE_MLP_ACTIVATIONS:
            self.mlp = GatedMLP(d_ff=cfg.mlp_width, activation=DENSE_MLP_ACTIVATIONS[self.spec.mlp],
                                use_bias=cfg.mlp_bias, projection=cfg.projection, dtype=cfg.dtype,
                                param_dtype=cfg.param_dtype)
        elif self.spec.mlp == "moe":
            self.mlp = MoE(config=cfg.moe, d_ff=cfg.mlp_width, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        if self.spec.mod:
            self.router = MoDRouter(param_dtype=cfg.param_dtype)

    def residual(self, x, cache, segment_ids, lower_bound=None, v_first=None):
        """The block itself: ``x [B,T,D] -> (x [B,T,D], cache, aux)``.

        A value-residual layer (RWKV-7) puts the ``v_first`` it hands on in ``aux["v_first"]``.
        """
        h, cache, *passed = self.mix(x, cache, segment_ids, lower_bound, v_first)
        x, aux = self.finish(x, h)
        return x, cache, ({**aux, V_FIRST: passed[0]} if passed else aux)

    def mix(self, x, cache, segment_ids=None, lower_bound=None, v_first=None):
        """The mixer's half: ``x [B,T,D] -> (mixer output h [B,T,D], cache)`` (``, v_first`` for RWKV-7's
        value residual).

        ``lower_bound``: this layer's learned HGRN-2 bound ``[D]`` (:func:`layer_lower_bounds`), else None.
        ``v_first``: the values the stack's first RWKV-7 layer handed on (None in that layer itself).
        """
        extra = {} if lower_bound is None else {"lower_bound": lower_bound}
        if takes_value_residual(self.spec):
            extra["value_residual"] = (v_first,)
        return self.mixer(self.mixer_norm(x), cache, segment_ids=segment_ids, **extra)

    def finish(self, x, h):
        """The rest, from the mixer output ``h``: ``x + h``, then the MLP: ``(x [B,T,D], aux)``."""
        x = x + h.astype(x.dtype)
        aux = {}
        if self.spec.mlp in DENSE_MLP_ACTIVATIONS:
            x = x + self.mlp(self.mlp_norm(x)).astype(x.dtype)
        elif self.spec.mlp == "moe":
            y, aux = self.mlp(self.mlp_norm(x))
            x = x + y.astype(x.dtype)
        return x, aux

    def propagate(self, x, cache, lower_bound=None, v_first=None):
        """Only the mixer's state update from ``x [B,T,D]`` (its output unused): the cache after ``x``.

        Early exit runs this in the layers a token skips (effarch.models.early_exit).
        """
        return self.mix(x, cache, None, lower_bound, v_first)[1]

    def __call__(self, x, cache=None, segment_ids=None, lower_bound=None, v_first=None):
        """``x [B,T,D] -> (x [B,T,D], cache, aux dict of scalars)``."""
        if not self.spec.mod:
            return self.residual(x, cache, segment_ids, lower_bound, v_first)
        if cache is not None:
            raise ValueError(
                f"LM: layer {self.name} is a Mixture-of-Depths layer (mod_capacity="
                f"{self.config.mod_capacity}); its top-k routing is non-causal, so it cannot decode "
                "from a cache. Generate with a model without MoD (mod_capacity=None)."
            )

        def routed(x_sel, seg_sel):
            y, _, aux = self.residual(x_sel, None, seg_sel, lower_bound)
            return y, aux

        x, aux = mixture_of_depths(routed, x, self.router(x), self.config.mod_capacity, segment_ids)
        fraction = selected_count(x.shape[1], self.config.mod_capacity) / x.shape[1]
        return x, None, {**aux, "mod_fraction": jnp.asarray(fraction, jnp.float32)}


def _block_class(cfg: LMConfig):
    return nn.remat(Block) if cfg.remat else Block


def _add_metrics(total: dict, aux: dict) -> dict:
    return {k: total.get(k, 0.0) + aux.get(k, 0.0) for k in {*total, *aux}}


class LayerGroup(nn.Module):
    """``config.period`` consecutive layers: the unit ``scan_layers`` repeats.

    Attributes:
      config: the model config.
    """

    config: LMConfig

    @nn.compact
    def __call__(self, x, caches, segment_ids, lower_bounds):
        """``(x, per-layer caches | None, segment_ids, [P, D] bounds | None) -> (x, (caches | None, summed aux))``."""
        block = _block_class(self.config)
        new_caches, total = [], {}
        for j in range(self.config.period):
            bound = None if lower_bounds is None or not learns_lower_bound(self.config.layer_specs[j]) \
                else lower_bounds[j]
            x, cache, aux = block(self.config, self.config.layer_specs[j], name=f"layer_{j}")(
                x, None if caches is None else caches[j], segment_ids, bound
            )
            new_caches.append(cache)
            total = _add_metrics(total, aux)
        return x, (None if caches is None else tuple(new_caches), total)


class LM(nn.Module):
    """Decoder-only language model; see the module docstring.

    Attributes:
      config: the model config (``LMConfig``).
    """

    config: LMConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None, cache: Any = None,
                 logit_positions: jax.Array | None = None, exits: bool = False,
                 exit_at: jax.Array | None = None):
        """Logits of the next token at every position (or at ``logit_positions``).

        Args:
          tokens: ``[B, T]`` int token ids in ``[0, vocab_size)``.
          segment_ids: optional ``[B, T]`` int ids of packed sequences; no
            information crosses a change of id. Not allowed with a cache.
          cache: None for a full sequence from scratch, or the caches from
            :meth:`init_cache` / a previous call to continue from.
          logit_positions: optional ``int [B, P]`` positions in ``[0, T)``; the
            logits are computed there only (``[B, P, vocab_size]``), which saves
            the ``[B, T, vocab]`` tensor when few positions are scored (e.g.
            the queries of a recall task).
          exits: return the logits of every exit (``config.exit_layers``, the
            final one last) stacked on a leading axis, ``[E, B, T, vocab]``.
          exit_at: optional ``int [B, T]`` exit index (into
            ``config.exit_layers``) of every token: the token's residual stream
            stops changing after that exit's layer, and later layers' mixers
            read the frozen stream to advance their state (CALM's state
            propagation; effarch.models.early_exit). This is the early-exit
            model's definition, computed for a whole sequence at once.

        Returns:
          ``logits [B, T, vocab_size]`` (``[B, P, vocab_size]`` with
          ``logit_positions``; ``[E, ...]`` with ``exits``) float32, ``aux``
          (dict of float32 scalars, always with ``"aux_loss"``), and the
          updated cache (None when ``cache`` is None).
        """
        cfg = self.config
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"LM: tokens has shape {tuple(tokens.shape)} and dtype {tokens.dtype}; expected an "
                "integer array [B,T]."
            )
        if segment_ids is not None and tuple(segment_ids.shape) != tuple(tokens.shape):
            raise ValueError(
                f"LM: segment_ids has shape {tuple(segment_ids.shape)}; expected [B,T] = "
                f"{list(tokens.shape)} like tokens."
            )
        embed = nn.Embed(
            cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="embed",
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(EMBED_INIT_STD), EMBED_AXES),
        )
        embedded = embed(tokens)  # [B, T, D]
        if cfg.pad_token_id is not None:  # torch's padding_idx: the pad token's lookup trains nothing
            embedded = jnp.where((tokens == cfg.pad_token_id)[..., None], jax.lax.stop_gradient(embedded), embedded)
        x = residual_stream(cfg, embedded)
        last_layer = self._check_exit_at(exit_at, tokens.shape)  # [B, T] or None

        bounds = None
        if any(learns_lower_bound(spec) for spec in cfg.layer_specs):
            init = nn.with_logical_partitioning(nn.initializers.zeros, (None, "embed"))
            bounds = learned_lower_bounds(self.param(LOWER_BOUNDS_PARAM, init, (cfg.n_layers, cfg.d_model),
                                                     cfg.param_dtype))  # [L, D]
        exit_states = []  # residual streams at the early exits
        if cfg.scan_layers:
            groups = nn.scan(
                LayerGroup,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, 0),
                length=cfg.n_layers // cfg.period,
                metadata_params={nn.PARTITION_NAME: LAYERS_AXIS},
            )(cfg, name="groups")
            grouped = None if bounds is None else bounds.reshape(cfg.n_layers // cfg.period, cfg.period, -1)
            x, (cache, summed) = groups(x, cache, segment_ids, grouped)
            total = jax.tree.map(lambda s: jnp.sum(s, axis=0), summed)
        else:
            block = _block_class(cfg)
            new_caches, total, v_first = [], {}, None
            for i, spec in enumerate(cfg.layer_specs):
                bound = bounds[i] if learns_lower_bound(spec) else None
                y, layer_cache, aux = block(cfg, spec, name=f"layer_{i}")(
                    x, None if cache is None else cache[i], segment_ids, bound, v_first
                )
                if V_FIRST in aux:
                    aux = dict(aux)
                    v_first = aux.pop(V_FIRST)
                x = y if last_layer is None else jnp.where((i > last_layer)[..., None], x, y)
                if i in cfg.early_exit:
                    exit_states.append(x)
                new_caches.append(layer_cache)
                total = _add_metrics(total, aux)
            cache = None if cache is None else tuple(new_caches)

        if logit_positions is not None:
            if logit_positions.ndim != 2 or logit_positions.shape[0] != tokens.shape[0]:
                raise ValueError(
                    f"LM: logit_positions has shape {tuple(logit_positions.shape)}; expected [B,P] with "
                    f"B={tokens.shape[0]} like tokens."
                )
            positions = logit_positions[..., None].astype(jnp.int32)
            x = jnp.take_along_axis(x, positions, axis=1)  # [B, P, D]
            exit_states = [jnp.take_along_axis(h, positions, axis=1) for h in exit_states]
        # Every exit head is created at init whatever ``exits`` is, so the parameters do not depend on it.
        normed = [block_norm(cfg, f"exit_norm_{k}")(h) for k, h in enumerate(exit_states)]
        normed.append(block_norm(cfg, "final_norm")(x))
        if cfg.tie_embeddings:
            head = embed.embedding  # [vocab, D]
        else:
            init = nn.with_logical_partitioning(nn.initializers.normal(EMBED_INIT_STD), UNEMBED_AXES)
            head = self.param("unembed", init, (cfg.d_model, cfg.vocab_size), cfg.param_dtype)
        if exits:
            logits = jnp.stack([output_logits(cfg, h, head) for h in normed])
        else:
            logits = output_logits(cfg, normed[-1], head)
        return logits, self._aux(total), cache

    @nn.nowrap
    def _check_exit_at(self, exit_at, shape) -> jax.Array | None:
        """The last layer each token runs, ``int [B, T]``, from ``exit_at``; None without it."""
        if exit_at is None:
            return None
        cfg = self.config
        if tuple(exit_at.shape) != tuple(shape) or not jnp.issubdtype(exit_at.dtype, jnp.integer):
            raise ValueError(
                f"LM: exit_at has shape {tuple(exit_at.shape)} and dtype {exit_at.dtype}; expected int [B,T] = "
                f"{list(shape)} exit indices in [0, {len(cfg.exit_layers)}) (into config.exit_layers="
                f"{cfg.exit_layers})."
            )
        if cfg.scan_layers:
            raise ValueError("LM: exit_at needs scan_layers=False (exits sit between single layers).")
        if not isinstance(exit_at, jax.core.Tracer):  # concrete: check the range (inside jit it is clipped)
            low, high = int(jnp.min(exit_at)), int(jnp.max(exit_at))
            if low < 0 or high >= len(cfg.exit_layers):
                raise ValueError(
                    f"LM: exit_at holds values in [{low}, {high}]; expected exit indices in "
                    f"[0, {len(cfg.exit_layers)}) (into config.exit_layers={cfg.exit_layers})."
                )
        return jnp.asarray(cfg.exit_layers, jnp.int32)[jnp.clip(exit_at, 0, len(cfg.exit_layers) - 1)]

    @nn.nowrap
    def _aux(self, total: dict) -> dict[str, jax.Array]:
        """Means of the per-layer metrics and the weighted ``aux_loss``."""
        cfg = self.config
        aux = {}
        n_moe = sum(spec.mlp == "moe" for spec in cfg.layer_specs)
        if n_moe:
            aux.update({k: total[k] / n_moe for k in MOE_METRICS})
        n_mod = sum(spec.mod for spec in cfg.layer_specs)
        if n_mod:
            aux.update({k: total[k] / n_mod for k in MOD_METRICS})
        aux_loss = cfg.moe.aux_loss_weight * aux["moe_aux_loss"] if n_moe else 0.0
        aux["aux_loss"] = jnp.asarray(aux_loss, jnp.float32)
        return aux

    @nn.nowrap
    def init_cache(self, batch_size: int, max_len: int | None = None, dtype: Any = jnp.float32) -> tuple:
        """Empty decode caches of every layer.

        Args:
          batch_size: sequences decoded at once.
          max_len: the longest prompt + generation; default ``config.max_len``.
          dtype: dtype of the caches' activations (recurrent states stay float32
            where the mixer says so).

        Returns:
          A tuple of per-layer caches (``n_layers`` long); with ``scan_layers``,
          ``period`` caches each stacked on a leading ``n_layers / period`` axis.
        """
        cfg = self.config
        if cfg.has_mod:
            raise ValueError(
                f"LM: mod_capacity={cfg.mod_capacity}; Mixture-of-Depths layers cannot decode from a "
                "cache (their top-k routing is non-causal). Use mod_capacity=None for generation."
            )
        max_len = cfg.max_len if max_len is None else max_len
        per_layer = tuple(
            mixers.from_config(spec.mixer).init_cache(batch_size, max_len, dtype) for spec in cfg.layer_specs
        )
        if not cfg.scan_layers:
            return per_layer
        return stack_layers(per_layer, cfg.period)


def stack_layers(per_layer, period: int) -> tuple:
    """``L`` per-layer pytrees -> ``period`` pytrees stacked over the ``L / period`` groups."""
    groups = len(per_layer) // period
    return tuple(
        jax.tree.map(lambda *xs: jnp.stack(xs), *[per_layer[g * period + j] for g in range(groups)])
        for j in range(period)
    )


def unstack_layers(stacked, period: int) -> tuple:
    """The inverse of :func:`stack_layers`: ``L`` per-layer pytrees."""
    groups = jax.tree.leaves(stacked[0])[0].shape[0]
    return tuple(jax.tree.map(lambda x: x[g], stacked[j]) for g in range(groups) for j in range(period))


def stack_layer_params(variables: dict, config: LMConfig) -> dict:
    """Unscanned variables ``{"params": {"layer_0": ...}}`` -> the ``scan_layers`` layout.

    Boxed (logically partitioned) inputs are unboxed; the result is unboxed.
    """
    params = dict(nn.unbox(variables)["params"])
    per_layer = [params.pop(f"layer_{i}") for i in range(config.n_layers)]
    stacked = stack_layers(per_layer, config.period)
    params["groups"] = {f"layer_{j}": stacked[j] for j in range(config.period)}
    return {**variables, "params": params}


def unstack_layer_params(variables: dict, config: LMConfig) -> dict:
    """The inverse of :func:`stack_layer_params`."""
    params = dict(nn.unbox(variables)["params"])
    groups = params.pop("groups")
    per_layer = unstack_layers([groups[f"layer_{j}"] for j in range(config.period)], config.period)
    params.update({f"layer_{i}": p for i, p in enumerate(per_layer)})
    return {**variables, "params": params}
