"""AdamW with linear warmup and cosine decay, global-norm clipping and a decay mask."""

from __future__ import annotations

import jax
import optax

from effarch.train.config import TrainConfig


def learning_rate(config: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to ``config.lr``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.lr,
        warmup_steps=config.warmup_steps,
        decay_steps=config.steps,
        end_value=config.lr * config.min_lr_ratio,
    )


# Parameters of a recurrence, a state-space model or a norm: never weight-decayed, whatever
# their rank, as the reference trainers do (mamba_ssm's _no_weight_decay on A_log, D and
# dt_bias; S4's A and dt; RWKV's time_* / mixing vectors; per-head norm scales).
NO_DECAY = frozenset({
    "scale",  # norm scales, per-head ones [H, K] included
    "A_log", "D", "dt_bias",  # Mamba, Mamba-2, Gated DeltaNet ([E*D, N] in Mamba-1)
    "log_dt", "log_neg_a_real", "a_imag",  # S4D
    "decay_param",  # RG-LRU's Lambda
    "time_decay", "time_faaaa", "maa", "maa_x",  # RWKV-6
    "w0", "a0", "k_a", "k_k", "r_k", "x_mix",  # RWKV-7
    "fgate_bias", "igate_bias", "skip",  # mLSTM
    "filter_bias",  # Hyena's implicit filter
    "hgrn2_lower_bounds",  # HGRN-2's learned per-layer forget-gate bounds (the LM's)
})


def decay_mask(params):
    """True for parameters that get weight decay: matrices, embeddings, conv filters, experts.

    A parameter is decayed when it has rank >= 2 and its name is not in
    :data:`NO_DECAY` (recurrence, SSM and norm parameters, e.g. Mamba's
    ``A_log [E*D, N]``). Biases and per-channel vectors are rank 1 and never decayed.
    """
    def decayed(path, p):
        keys = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
        return p.ndim >= 2 and (keys[-1] if keys else None) not in NO_DECAY

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Clip to ``grad_clip`` (if > 0), then AdamW on the :func:`learning_rate` schedule."""
    adamw = optax.adamw(
        learning_rate(config), b1=config.b1, b2=config.b2, eps=config.eps,
        weight_decay=config.weight_decay, mask=decay_mask,
    )
    if config.grad_clip == 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
