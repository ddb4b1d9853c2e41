"""Which serving engines run an export exactly, and why not where they do not.

The reasons come from serving real exports (docs/serving.md): vLLM's CPU build served Mixtral, Qwen2-MoE (dense
blocks, universal FFN) and Qwen3-MoE exports with transformers' greedy tokens; llama.cpp's converter and kernels
differ from transformers for the options listed below. An empty list means no known reason, not a guarantee: the
GraniteMoE targets were not served by either engine.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

ENGINES = ("vllm", "llama.cpp")

# tokenizer classes llama.cpp's convert_hf_to_gguf.py (which loads the tokenizer with AutoTokenizer, under a
# transformers that may predate 5.0) is known to reject
_REJECTED_TOKENIZER_CLASSES = {"TokenizersBackend"}


class EngineCompatibilityWarning(UserWarning):
    """``export_moe`` wrote a checkpoint that a serving engine will not run exactly (the message names the reason)."""


def _load(export) -> tuple[dict, Path | None]:
    if isinstance(export, str | os.PathLike):
        path = Path(export)
        try:
            return json.loads((path / "config.json").read_text(encoding="utf-8")), path
        except (OSError, ValueError) as err:
            raise ValueError(f"export={str(path)!r} is invalid: no readable config.json in it ({err}).") from err
    if isinstance(export, dict):
        return export, None
    if hasattr(export, "to_dict"):
        return export.to_dict(), None
    raise TypeError(
        f"export must be an export directory, a transformers config or a config dict, not {type(export).__name__}."
    )


def _shared_gates(path: Path | None, state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The ``shared_expert_gate`` weights of an export (from ``state``, else from the directory's safetensors)."""
    if state is not None:
        return {k: v for k, v in state.items() if k.endswith("shared_expert_gate.weight")}
    if path is None:
        return {}
    from safetensors import safe_open

    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if k.endswith("shared_expert_gate.weight")})
    return out


def _tokenizer_class(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


def _llama_cpp(cfg: dict, path: Path | None, state: dict | None) -> list[str]:
    reasons = []
    model_type = cfg.get("model_type")
    family = {"qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE"}.get(model_type)
    dense = sorted(cfg.get("mlp_only_layers") or [])
    if family and dense:
        reasons.append(
            f"dense blocks {dense} (mlp_only_layers): llama.cpp's {family} has no dense blocks, its "
            f"convert_hf_to_gguf.py cannot map 'model.layers.{dense[0]}.mlp.down_proj.weight' (upcycle every block)"
        )
    top_k, experts = cfg.get("num_experts_per_tok"), cfg.get("num_experts", cfg.get("num_local_experts"))
    selective = top_k is not None and experts is not None and top_k < experts
    if model_type == "qwen2_moe" and cfg.get("norm_topk_prob") and selective:
        reasons.append(
            "norm_topk_prob=True: llama.cpp's Qwen2-MoE never renormalises the top-k router weights (export a model "
            "trained with normalize_top_k=False)"
        )
    if model_type == "qwen3_moe" and not cfg.get("norm_topk_prob", False) and selective:
        reasons.append(
            "norm_topk_prob=False: llama.cpp's Qwen3-MoE always renormalises the top-k router weights (export a model "
            "trained with normalize_top_k=True)"
        )
    if model_type == "qwen2_moe":
        zero = sorted(k for k, v in _shared_gates(path, state).items() if not bool(v.float().ne(0).any()))
        if zero:
            reasons.append(
                f"{len(zero)} all-zero shared_expert_gate weights (e.g. {zero[0]!r}; an fp16 export rounds the 1e-20 "
                "gate to 0): llama.cpp computes sigmoid(x) as silu(x)/x, which is NaN at 0 (export in float32 or "
                "bfloat16)"
            )
    tok = _tokenizer_class(path)
    if tok in _REJECTED_TOKENIZER_CLASSES:
        reasons.append(
            f"tokenizer_config.json has tokenizer_class={tok!r}, which convert_hf_to_gguf.py rejects (set it to "
            "'PreTrainedTokenizerFast')"
        )
    return reasons


def engine_compatibility(export, state: dict[str, torch.Tensor] | None = None) -> dict[str, list[str]]:
    """Why each engine of ``ENGINES`` would not serve ``export`` exactly: ``{engine: [reason, ...]}``.

    ``export``: an export directory (its config.json, safetensors and tokenizer_config.json are read), a transformers
    config, or a config dict; ``state``: the exported tensors, when given (else read from the directory). An empty
    list means no known reason (docs/serving.md lists what was served for real)."""
    cfg, path = _load(export)
    return {"vllm": [], "llama.cpp": _llama_cpp(cfg, path, state)}


def warn_incompatible(reasons: dict[str, list[str]], stacklevel: int = 3) -> None:
    """One :class:`EngineCompatibilityWarning` per reason of :func:`engine_compatibility`."""
    for engine, why in reasons.items():
        for reason in why:
            warnings.warn(
                f"export_moe: this export will not run exactly in {engine}: {reason}.",
                EngineCompatibilityWarning,
                stacklevel=stacklevel,
            )
