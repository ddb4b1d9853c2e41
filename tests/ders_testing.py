"""Shared helpers for the tests: tiny models of every supported family, random non-zero deltas, references."""

from __future__ import annotations

import torch
import transformers
from torch import nn

from ders_peft.layer import DeRSLayer

VOCAB = 97

# family -> (config class name, model class name, extra config kwargs)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 2}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 2}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"num_key_value_heads": 2, "head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"num_key_value_heads": 2, "head_dim": 8}),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {"num_key_value_heads": 4}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {"eos_token_id": 2}),
}


def tiny_model(family: str = "llama", hidden: int = 32, inter: int = 48, layers: int = 2, seed: int = 0, **kw):
    """A tiny randomly initialised causal LM of ``family`` (eval mode, fp32)."""
    cfg_name, model_name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=hidden, n_inner=inter, n_layer=layers, n_head=4, n_positions=64, **kw
        )
        cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    else:
        cfg = getattr(transformers, cfg_name)(
            vocab_size=VOCAB,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=64,
            **{**extra, **kw},
        )
    model = getattr(transformers, model_name)(cfg)
    return model.eval()


def randomize_adapter(model: nn.Module, std: float = 0.05, seed: int = 1) -> None:
    """Give every router, delta and per-expert bias random non-zero values (so a wrong mapping cannot pass)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, DeRSLayer):
                continue
            for container in ("ders_router", "ders_delta", "ders_bias", "ders_base"):
                for p in getattr(module, container).parameters():
                    p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * std)


def ders_layers(model: nn.Module) -> list[DeRSLayer]:
    return [m for m in model.modules() if isinstance(m, DeRSLayer)]
