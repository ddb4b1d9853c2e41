"""Tiny transformers MoE models of every architecture D2-MoE supports, seeded, with well-spread routers."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    PhimoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from ders_peft.compression.moe_blocks import find_moe_blocks

H, FF, E, K, VOCAB = 32, 16, 4, 2, 100
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=H,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=K,
    max_position_embeddings=64,
)


def _config(arch: str, **extra):
    if arch == "mixtral":
        return MixtralConfig(**COMMON, intermediate_size=FF, num_local_experts=E, **extra)
    if arch == "qwen2_moe":
        kw = {"intermediate_size": 48, "moe_intermediate_size": FF, "shared_expert_intermediate_size": 24}
        return Qwen2MoeConfig(**COMMON, **{**kw, **extra}, num_experts=E, norm_topk_prob=False)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(
            **COMMON, intermediate_size=48, moe_intermediate_size=FF, num_experts=E, norm_topk_prob=True, head_dim=8,
            **extra,
        )  # fmt: skip
    if arch == "olmoe":
        return OlmoeConfig(**COMMON, intermediate_size=FF, num_experts=E, **extra)
    if arch == "phimoe":
        return PhimoeConfig(**COMMON, intermediate_size=FF, num_local_experts=E, **extra)
    if arch == "deepseek_v3":
        return DeepseekV3Config(  # MLA attention: no grouped kv heads
            **{**COMMON, "num_key_value_heads": 4}, intermediate_size=48, moe_intermediate_size=FF, n_routed_experts=E,
            n_group=2, topk_group=1, first_k_dense_replace=0, n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16,
            qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, **extra,
        )  # fmt: skip
    raise KeyError(arch)


ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "deepseek_v3"]
_CACHE: dict[str, torch.nn.Module] = {}


def tiny_model(arch: str) -> torch.nn.Module:
    """A seeded random tiny MoE LM in eval mode with well-spread router logits."""
    if arch not in _CACHE:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(arch)).eval()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for info in find_moe_blocks(model).values():
                info.router.weight.copy_(torch.randn(info.router.weight.shape, generator=gen) * 0.5)
                info.gate_up_param.copy_(torch.randn(info.gate_up_param.shape, generator=gen) * 0.2)
                info.down_param.copy_(torch.randn(info.down_param.shape, generator=gen) * 0.2)
                if info.e_score_correction_bias is not None:
                    info.e_score_correction_bias.copy_(torch.randn(E, generator=gen) * 0.1)
        _CACHE[arch] = model
    return _CACHE[arch]


def _batches(seed: int = 0, n: int = 2, batch: int = 2, seq: int = 7) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[-1, seq - 2 - b :] = 0  # right padding of a different length in each batch
        out.append({"input_ids": ids, "attention_mask": mask})
    return out
