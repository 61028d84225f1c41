"""Tiny transformers checkpoints with random weights, shared by the convert tests.

Only import this module after ``pytest.importorskip("torch")`` and
``pytest.importorskip("transformers")``.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
import transformers

# The tests run on a 2-core machine beside XLA.
torch.set_num_threads(1)

# Noise added to every parameter, so that ones and zeros of the initialisation
# (norm scales, D) become generic values and a swapped tensor shows.
PERTURBATION_STD = 0.1
VOCAB = 61
B, T = 2, 13
# Awkward sizes: a dt rank that is not D/16, a 3-tap convolution, T not a
# multiple of the Mamba-2 chunk, two groups of B/C.
CASES = {
    "mamba-tied": ("MambaConfig", dict(hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=3,
                                       time_step_rank=3, tie_word_embeddings=True)),
    "mamba-untied": ("MambaConfig", dict(hidden_size=32, state_size=4, num_hidden_layers=2, expand=2,
                                         conv_kernel=4, tie_word_embeddings=False)),
    "mamba2-tied": ("Mamba2Config", dict(hidden_size=32, num_heads=4, head_dim=16, state_size=8, n_groups=2,
                                         expand=2, conv_kernel=4, chunk_size=8, num_hidden_layers=2,
                                         tie_word_embeddings=True)),
    "mamba2-untied": ("Mamba2Config", dict(hidden_size=32, num_heads=8, head_dim=8, state_size=8, n_groups=1,
                                           expand=2, conv_kernel=4, chunk_size=8, num_hidden_layers=2,
                                           layer_norm_epsilon=1e-6, tie_word_embeddings=False)),
    # An RG-LRU wider than D, multi-query local attention narrower than T, 4 layers of the
    # (recurrent, recurrent, attention) cycle (not a multiple of it), a soft cap the logits reach.
    "rgemma-tied": ("RecurrentGemmaConfig", dict(hidden_size=32, lru_width=48, num_attention_heads=4,
                                                 num_key_value_heads=1, attention_window_size=4, conv1d_width=3,
                                                 intermediate_size=88, num_hidden_layers=4, logits_soft_cap=3.0,
                                                 tie_word_embeddings=True)),
    "rgemma-untied": ("RecurrentGemmaConfig", dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                                                   attention_window_size=6, attention_bias=True, conv1d_width=4,
                                                   intermediate_size=64, num_hidden_layers=3, rms_norm_eps=1e-5,
                                                   block_types=["recurrent", "attention"],
                                                   rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                                    "partial_rotary_factor": 0.5},
                                                   tie_word_embeddings=False)),
    # Mamba (with its dt/B/C norms) and attention alternating, MoE on the Mamba layers (top 2 of 4).
    "jamba-moe": ("JambaConfig", dict(hidden_size=32, intermediate_size=40, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2,
                                      attn_layer_offset=1, num_experts=4, num_experts_per_tok=2,
                                      expert_layer_period=2, expert_layer_offset=0, mamba_d_state=4,
                                      mamba_d_conv=3, mamba_dt_rank=3, rms_norm_eps=1e-5,
                                      tie_word_embeddings=False)),
    # One attention layer first (head_dim 8, not D / H = 16), one MoE layer (top 1 of 3) last, tied.
    "jamba-tied": ("JambaConfig", dict(hidden_size=32, intermediate_size=24, num_hidden_layers=3, head_dim=8,
                                       num_attention_heads=2, num_key_value_heads=1, attn_layer_period=3,
                                       attn_layer_offset=0, num_experts=3, num_experts_per_tok=1,
                                       expert_layer_period=3, expert_layer_offset=2, mamba_d_state=8,
                                       mamba_d_conv=4, mamba_expand=1, tie_word_embeddings=True)),
    # Gated DeltaNet with twice the value heads, gated attention (head_dim 8, a quarter rotated)
    # every fourth layer, MoE (top 2 of 4, renormalised, a shared expert) every other layer.
    "qwen3next-moe": ("Qwen3NextConfig", dict(hidden_size=32, intermediate_size=40, num_hidden_layers=4,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                              linear_num_key_heads=2, linear_num_value_heads=4,
                                              linear_key_head_dim=8, linear_value_head_dim=8,
                                              linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=12, shared_expert_intermediate_size=20,
                                              decoder_sparse_step=2, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    # Every layer MoE (top 1 of 3, not renormalised), values twice the keys' width, two attention layers, tied.
    "qwen3next-tied": ("Qwen3NextConfig", dict(hidden_size=32, intermediate_size=24, num_hidden_layers=4,
                                               num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                               layer_types=["linear_attention", "full_attention"] * 2,
                                               linear_num_key_heads=2, linear_num_value_heads=2,
                                               linear_key_head_dim=4, linear_value_head_dim=8,
                                               linear_conv_kernel_dim=3, num_experts=3, num_experts_per_tok=1,
                                               norm_topk_prob=False, moe_intermediate_size=16,
                                               shared_expert_intermediate_size=8, tie_word_embeddings=True)),
}


def hf_model(case: str, seed: int = 0) -> transformers.PreTrainedModel:
    """The case's causal LM with every parameter perturbed, in eval mode."""
    config_class, fields = CASES[case]
    config = getattr(transformers, config_class)(vocab_size=VOCAB, **fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.add_(PERTURBATION_STD * torch.randn(param.shape, generator=generator))
    # Greedy generation runs its full length (a random model may emit token 0, the default eos).
    model.generation_config.eos_token_id = None
    return model.eval()


def save(model: transformers.PreTrainedModel, folder: pathlib.Path, **kwargs) -> pathlib.Path:
    """``save_pretrained`` (safetensors) into ``folder``."""
    model.save_pretrained(folder, **kwargs)
    return folder


def tokens(seed: int = 0, length: int = T) -> np.ndarray:
    """``[B, length]`` int32 token ids."""
    return np.random.default_rng(seed).integers(0, VOCAB, (B, length), dtype=np.int32)


def hf_logits(model: transformers.PreTrainedModel, ids: np.ndarray) -> np.ndarray:
    """``[B, T, vocab]`` float32 logits of a transformers model."""
    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()


def hf_greedy(model: transformers.PreTrainedModel, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
    """``[B, T + new_tokens]``: transformers' greedy ``generate``."""
    ids = torch.from_numpy(prompt.astype(np.int64))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False)
    return out.numpy()
