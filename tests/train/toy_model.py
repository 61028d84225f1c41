"""A tiny flax LM with the effarch LM contract, for testing the training loop on its own.

``logits, aux, cache = ToyLM(...).apply(variables, tokens, segment_ids=...)``:
an embedding and an MLP carrying logical axis names, a token-shift mixer whose
weight has none (like most mixer parameters), a norm scale, tied output.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyConfig:
    vocab_size: int = 256
    d_model: int = 32
    dtype: str = "float32"


class ToyLM(nn.Module):
    config: ToyConfig

    @nn.compact
    def __call__(self, tokens, segment_ids=None, cache=None):
        cfg = self.config
        init = nn.initializers.normal(0.02)
        embed = self.param("embed", nn.with_logical_partitioning(init, ("vocab", "embed")),
                           (cfg.vocab_size, cfg.d_model))
        x = jnp.asarray(embed)[tokens].astype(cfg.dtype)  # [B, T, D]
        prev = jnp.pad(x[:, :-1], ((0, 0), (1, 0), (0, 0)))
        if segment_ids is not None:
            same = jnp.pad(segment_ids[:, 1:] == segment_ids[:, :-1], ((0, 0), (1, 0)))
            prev = jnp.where(same[..., None], prev, 0.0)
        shift = self.param("shift", init, (cfg.d_model, cfg.d_model))
        x = x + prev @ shift.astype(cfg.dtype)
        h = nn.Dense(4 * cfg.d_model, dtype=cfg.dtype,
                     kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")))(x)
        x = x + nn.Dense(cfg.d_model, dtype=cfg.dtype,
                         kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")))(nn.gelu(h))
        x = nn.RMSNorm(dtype=cfg.dtype)(x)
        logits = (x @ jnp.asarray(embed).T.astype(cfg.dtype)).astype(jnp.float32)
        return logits, {"aux_loss": jnp.zeros(()), "toy_scalar": jnp.mean(jnp.abs(x))}, None
