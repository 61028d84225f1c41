"""Hugging Face checkpoint layouts in and out (safetensors; no torch needed).

    config, params = effarch.convert.from_hf(path)      # config.json + *.safetensors
    logits, aux, _ = effarch.models.LM(config).apply(params, tokens)
    effarch.convert.to_hf(config, params, out_path)      # transformers reads it back

Layouts (``ARCHITECTURES``): transformers' ``MambaForCausalLM`` (effarch
mixer ``mamba``), ``Mamba2ForCausalLM`` (``mamba2``),
``RecurrentGemmaForCausalLM`` (``rglru`` and local ``attention``) and
``JambaForCausalLM`` (``mamba`` with dt/B/C norms, ``attention``, MoE) and
``Qwen3NextForCausalLM`` (``gated_deltanet``, gated ``attention``, MoE with a
shared expert). See docs/interop.md.
"""

from effarch.convert.architectures import ARCHITECTURES  # noqa: F401
from effarch.convert.hf import from_hf, to_hf  # noqa: F401
