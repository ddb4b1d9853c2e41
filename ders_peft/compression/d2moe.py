"""D2-MoE compression of any transformers MoE: a merged base plus whitened low-rank deltas per expert.

Pipeline (one module per step): calibration statistics in one pass (:mod:`.calibration`), a shared base merged per
layer and matrix (:mod:`.merging`), ``Delta_e = W_e - W_base`` factorised by (whitened) truncated SVD
(:mod:`.svd`), optional semi-dynamic pruning of the base down projection, then each block's ``experts`` module is
replaced by :class:`~.d2_experts.D2Experts`. The block's router, shared experts and every other module are kept, so
routing is exactly the architecture's own. The result is the same transformers model class; ``save_pretrained``
writes a ``quantization_config`` with ``quant_method="ders_d2moe"`` that ``from_pretrained`` understands after
``import ders_peft`` (:mod:`.serialization`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import LayerStats, collect_statistics
from .config import CompressionConfig
from .d2_experts import PROJS, D2Experts, D2SharedExpert
from .merging import merge_base
from .moe_blocks import _ARCHS, MoEBlockInfo, find_moe_blocks
from .svd import adaptive_ranks, rank_for_ratio, shared_v_rank, shared_v_svd, truncated_svd, whitened_svd

DEFAULT_CALIBRATION_LENGTH = 256


def calibration_batches(
    calibration, tokenizer=None, *, batch_size: int = 4, max_length: int = DEFAULT_CALIBRATION_LENGTH
) -> list[dict[str, torch.Tensor]]:
    """Calibration data as token batches: a list of str (or a ``datasets.Dataset`` with a ``text`` column; both need
    ``tokenizer``), a dataset with ``input_ids``, a list of token-id lists / tensors, or ready batches (dicts with
    ``input_ids`` and optionally ``attention_mask``)."""
    if calibration is None:
        raise ValueError("compress(method='d2moe') needs calibration data (calibration=texts, token batches, ...).")
    items = list(calibration) if not hasattr(calibration, "column_names") else calibration
    if hasattr(items, "column_names"):  # a datasets.Dataset
        if "input_ids" in items.column_names:
            items = [list(r) for r in items["input_ids"]]
        elif "text" in items.column_names:
            items = list(items["text"])
        else:
            raise ValueError(f"calibration dataset has columns {items.column_names}; it needs 'text' or 'input_ids'.")
    if not items:
        raise ValueError("calibration is empty: give at least one text or token batch.")
    if all(isinstance(i, Mapping) for i in items):
        return [dict(i) for i in items]
    if all(isinstance(i, str) for i in items):
        if tokenizer is None:
            raise ValueError("calibration texts need tokenizer=... to become token ids.")
        items = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in items]
    seqs = [torch.as_tensor(i, dtype=torch.long).reshape(-1)[:max_length] for i in items]
    seqs = [s for s in seqs if s.numel()]
    batches = []
    for start in range(0, len(seqs), batch_size):
        group = seqs[start : start + batch_size]
        width = max(s.numel() for s in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, s in enumerate(group):
            ids[row, : s.numel()], mask[row, : s.numel()] = s, 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _matrices(info: MoEBlockInfo) -> dict[str, torch.Tensor]:
    return {"gate_proj": info.gate.float(), "up_proj": info.up.float(), "down_proj": info.down.float()}


def _fisher(stats: LayerStats, proj: str) -> torch.Tensor | None:
    return {"gate_proj": stats.fisher_gate, "up_proj": stats.fisher_up, "down_proj": stats.fisher_down}[proj]


def _channel_norms(stats: LayerStats) -> torch.Tensor:
    """||X_j|| of each intermediate channel over the calibration tokens (all experts' activations)."""
    if stats.gram_mid is None:
        raise RuntimeError("base pruning needs the intermediate Gram matrices")
    return stats.gram_mid.diagonal(dim1=-2, dim2=-1).sum(0).clamp_min(0).sqrt()


def _ranks(blocks, bases, config: CompressionConfig, kept: dict[int, int]) -> dict[int, dict[str, int]]:
    """Delta rank per layer and projection: ``config.rank`` clamped, or from ``config.ratio`` (optionally spread
    over layers by each layer's delta energy, the paper's adaptive ranks)."""
    out: dict[int, dict[str, int]] = {}
    for idx, info in blocks.items():
        out[idx] = {}
        for proj, w in _matrices(info).items():
            e, rows, cols = w.shape
            if config.rank is not None:  # the largest useful rank: a shared V spans the stacked deltas' rows
                out[idx][proj] = min(config.rank, e * rows if config.share_v else rows, cols)
                continue
            fraction = kept[idx] / info.intermediate_size if proj == "down_proj" else 1.0
            rank_of = shared_v_rank if config.share_v else rank_for_ratio
            out[idx][proj] = rank_of(e, rows, cols, config.ratio, base_fraction=fraction)
    if config.adaptive_ranks and config.rank is None and len(blocks) > 1:
        for proj in PROJS:
            energy = [float((_matrices(blocks[i])[proj] - bases[i][proj]).norm()) for i in blocks]
            mean = round(sum(out[i][proj] for i in blocks) / len(blocks))
            cap = min(_matrices(next(iter(blocks.values())))[proj].shape[1:])
            for i, r in zip(blocks, adaptive_ranks(energy, mean, cap), strict=True):
                out[i][proj] = r
    return out


@torch.no_grad()
def d2moe_compress(
    model: nn.Module,
    config: CompressionConfig,
    calibration=None,
    *,
    tokenizer=None,
    progress: bool = True,
    inplace: bool = False,
    batch_size: int = 4,
    max_length: int = DEFAULT_CALIBRATION_LENGTH,
) -> nn.Module:
    """D2-MoE-compress a transformers MoE causal LM (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, PhiMoE, DeepSeek-V3).

    ``calibration``: texts (with ``tokenizer``), token-id sequences or token batches. Returns a model of the same
    class whose MoE blocks hold :class:`D2Experts` (a copy unless ``inplace``). The compression ratio is the share of
    the MoE's routed-expert parameters removed (shared experts and routers are kept whole and not counted).
    """
    blocks = find_moe_blocks(model)
    few = min(info.num_experts for info in blocks.values())
    if config.trim_experts >= few:
        raise ValueError(
            f"CompressionConfig.trim_experts={config.trim_experts} is invalid: a layer has only {few} experts "
            f"(allowed: 0..{few - 1})."
        )
    if not inplace:
        model = copy.deepcopy(model)
        blocks = find_moe_blocks(model)
    batches = calibration_batches(calibration, tokenizer, batch_size=batch_size, max_length=max_length)
    need_mid = config.svd == "whitened" or config.base_prune > 0
    with torch.enable_grad():
        stats = collect_statistics(
            model, batches, fisher=config.base_merge == "fisher", progress=progress, intermediate_gram=need_mid
        )
    bases = {
        idx: {
            proj: merge_base(w, config.base_merge, frequency=stats[idx].frequency, fisher=_fisher(stats[idx], proj))
            for proj, w in _matrices(info).items()
        }
        for idx, info in blocks.items()
    }
    static = {idx: round(info.intermediate_size * config.base_prune / 2) for idx, info in blocks.items()}
    kept = {idx: blocks[idx].intermediate_size - static[idx] for idx in blocks}
    ranks = _ranks(blocks, bases, config, kept)
    layers_cfg = {}
    for idx, info in tqdm(blocks.items(), desc="d2moe: SVD of the deltas", unit="block", disable=not progress):
        st, base = stats[idx], bases[idx]
        trimmed = set(st.frequency.argsort()[: config.trim_experts].tolist())  # least-used experts: no delta
        per_expert = {p: [0 if e in trimmed else r for e in range(info.num_experts)] for p, r in ranks[idx].items()}
        factors = {}
        for proj, w in _matrices(info).items():
            gram = st.gram_in if proj != "down_proj" else st.gram_mid
            deltas = w - base[proj]
            if config.share_v:
                total = gram.sum(0) if config.svd == "whitened" else None
                u, v = shared_v_svd(deltas, total, ranks[idx][proj])
                factors[proj] = (u.float(), v.float())
                continue
            us, vs = [], []
            for e, rank in enumerate(per_expert[proj]):
                if config.svd == "whitened":
                    u, v = whitened_svd(deltas[e], gram[e], rank)
                else:
                    u, v = truncated_svd(deltas[e], rank)
                us.append(u.float())
                vs.append(v.float())
            factors[proj] = (us, vs)
        keep = None
        if static[idx]:
            score = base["down_proj"].norm(dim=0) * _channel_norms(st).float()
            keep = score.topk(kept[idx]).indices
        dynamic = round(info.intermediate_size * config.base_prune) - static[idx]
        dtype = info.gate_up_param.dtype
        experts = D2Experts(
            info.num_experts, info.hidden_size, info.intermediate_size, per_expert, info.act_fn,
            kept_channels=kept[idx], dynamic_prune=dynamic, share_v=config.share_v, dtype=torch.float32,
            device=info.gate.device,
        ).load_(base, factors, keep)  # fmt: skip
        info.block.experts = experts.to(dtype)
        layers_cfg[str(idx)] = {
            "ranks": per_expert, "kept_channels": kept[idx], "dynamic_prune": dynamic, "share_v": config.share_v
        }
        shared_ranks = _compress_shared(info, experts, base, st, ranks[idx], config, dtype)
        if shared_ranks is not None:
            layers_cfg[str(idx)]["shared"] = {"ranks": shared_ranks}
    _record(model, config, layers_cfg, stats)
    return model.eval()


def _compress_shared(info: MoEBlockInfo, experts: D2Experts, base, st: LayerStats, ranks, config, dtype):
    """Replace the block's shared expert by one more delta over the merged base (when it has the routed experts'
    shape and ``compress_shared`` allows it); returns its ranks, or None when it is kept whole. Its gate and up
    deltas are whitened by the Gram of every calibration token; its down delta uses plain SVD (the calibration pass
    records no shared-expert activations)."""
    if info.shared_gate is None or config.compress_shared is False:
        return None
    shape = (info.intermediate_size, info.hidden_size)
    if tuple(info.shared_gate.shape) != shape:
        if config.compress_shared:
            raise ValueError(
                f"CompressionConfig.compress_shared=True is invalid for layer {info.layer_idx}: its shared expert has "
                f"intermediate size {info.shared_gate.shape[0]}, the routed experts {shape[0]}; only a shared expert "
                "of the experts' shape is a delta over their base (use None or False to keep it whole)."
            )
        return None
    weights = {"gate_proj": info.shared_gate, "up_proj": info.shared_up, "down_proj": info.shared_down}
    out_ranks, factors = {}, {}
    for proj, w in weights.items():
        delta = w.float() - base[proj]
        r = ranks[proj] if isinstance(ranks[proj], int) else max(ranks[proj])
        r = min(r, *delta.shape)
        if config.svd == "whitened" and proj != "down_proj":
            u, v = whitened_svd(delta, st.gram_in.sum(0), r)
        else:
            u, v = truncated_svd(delta, r)
        out_ranks[proj], factors[proj] = r, (u.float(), v.float())
    shared = D2SharedExpert(experts, out_ranks, info.shared_act_fn, dtype=torch.float32, device=info.gate.device)
    setattr(info.block, _ARCHS[info.model_type][2], shared.load_(factors).to(dtype))
    return out_ranks


def _record(model: nn.Module, config: CompressionConfig, layers: dict, stats: dict[int, LayerStats]) -> None:
    from .serialization import D2MoEQuantizationConfig, mark_compressed

    mark_compressed(model)
    starved = {str(i): s.starved for i, s in stats.items() if s.starved}
    model.config.quantization_config = D2MoEQuantizationConfig(
        layers=layers,
        settings={**config.describe(), "calibration_tokens": max(s.num_tokens for s in stats.values())},
        starved_experts=starved,
    )


def stored_expert_params(model: nn.Module) -> dict[str, int]:
    """Routed-expert parameters stored by a D2-MoE model (``compressed``) and by the MoE it came from (``original``,
    from the shapes: experts x 3 x intermediate x hidden per block)."""
    compressed = original = shared = shared_original = 0
    for module in model.modules():
        if isinstance(module, D2Experts):
            compressed += module.stored_params()
            original += module.num_experts * 3 * module.intermediate_size * module.hidden_size
        elif isinstance(module, D2SharedExpert):
            shared += module.stored_params()
            shared_original += 3 * module._experts.intermediate_size * module._experts.hidden_size
    out = {"compressed": compressed, "original": original}
    if shared_original:  # compressed shared experts, counted apart (the ratio is the routed experts')
        out.update(shared_compressed=shared, shared_original=shared_original)
    return out


def decompress(model: nn.Module) -> nn.Module:
    """A standard transformers MoE (same class, no ``quantization_config``) with each expert synthesised as
    ``W_base + U_e V_e`` (static base pruning applied; the dynamic part, chosen per batch, cannot be stored)."""
    from accelerate import init_empty_weights

    from .serialization import source_class

    cls = source_class(model)
    skip = ("quantization_config", "model_type")
    cfg = cls.config_class.from_dict({k: v for k, v in model.config.to_dict().items() if k not in skip})
    cfg.architectures = [cls.__name__]
    with init_empty_weights(include_buffers=False):
        target = cls(cfg)
    compressed = [n for n, m in model.named_modules() if isinstance(m, D2Experts | D2SharedExpert)]
    state = {k: v for k, v in model.state_dict().items() if not any(k.startswith(n + ".") for n in compressed)}
    for name, module in model.named_modules():
        if isinstance(module, D2Experts):
            w = module.expert_weights()
            state[f"{name}.gate_up_proj"] = torch.cat([w["gate_proj"], w["up_proj"]], dim=1)
            state[f"{name}.down_proj"] = w["down_proj"]
        elif isinstance(module, D2SharedExpert):
            for proj, w in module.weights().items():
                state[f"{name}.{proj}.weight"] = w
    dtype = next(model.parameters()).dtype
    target.load_state_dict({k: v.to(dtype).clone() for k, v in state.items()}, strict=True, assign=True)
    if getattr(cfg, "tie_word_embeddings", False):
        target.tie_weights()
    return target.eval()
