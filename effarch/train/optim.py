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


def decay_mask(params):
    """True for parameters that get weight decay: rank >= 2 (matrices, embeddings, conv filters).

    Norm scales, biases and per-channel vectors (decay rates, skip gains) are rank 1 or 0.
    """
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Clip to ``grad_clip`` (if > 0), then AdamW on the :func:`learning_rate` schedule."""
    adamw = optax.adamw(
        learning_rate(config), b1=config.b1, b2=config.b2, eps=config.eps,
        weight_decay=config.weight_decay, mask=decay_mask,
    )
    if config.grad_clip == 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
