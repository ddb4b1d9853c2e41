"""Weight synthesis: each routed expert as ``W_base + Delta_e`` (fp32, then the model's dtype), the router, the shared
expert, and every non-FFN tensor, loaded into the target transformers model (:func:`convert_to_moe`)."""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from ..layer import DeRSLayer
from ..routing import SHARED_EXPERT_MIX
from .plan import ExportPlan, _unwrap, plan_export
from .targets import SHARED_GATE_ZERO, TARGETS, _refuse


def _plain_state(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Persistent tensors of ``module`` as a plain transformers model would name them, skipping DeRS layers and
    resolving peft ``modules_to_save`` wrappers to their active copy."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    if isinstance(module, DeRSLayer):
        return {}
    if isinstance(module, ModulesToSaveWrapper):
        active = [a for a in module.active_adapters if a in module.modules_to_save]
        chosen = module.original_module if module.disable_adapters or not active else module.modules_to_save[active[0]]
        return _plain_state(chosen, prefix)
    if isinstance(module, AuxiliaryTrainingWrapper | BaseTunerLayer):
        raise _refuse(f"{prefix.rstrip('.') or 'the model'} carries another PEFT module ({type(module).__name__})")
    out = {prefix + n: p for n, p in module.named_parameters(recurse=False)}
    skip = getattr(module, "_non_persistent_buffers_set", set())
    out.update({prefix + n: b for n, b in module.named_buffers(recurse=False) if n not in skip})
    for name, child in module.named_children():
        out.update(_plain_state(child, f"{prefix}{name}."))
    return out


def expert_tensors(layer: DeRSLayer, adapter: str, shared: str) -> dict[str, torch.Tensor]:
    """The fp32 tensors of one MoE block in transformers' in-memory layout.

    ``router`` (N, H); ``gate_up_proj`` (N, 2I, H) with the gate rows first; ``down_proj`` (N, H, I). With a universal
    FFN the DeRS layer averages the routed mixture and the universal expert (0.5 each), so the routed down projections
    carry 0.5, and the universal expert comes back as ``shared_gate_up_proj`` (2I, H) / ``shared_down_proj`` (H, I):
    behind a sigmoid gate of 1e-20 weights (``shared="gated"``, sigmoid = 0.5) unscaled, added with weight 1
    (``shared="ungated"``) with its down projection halved.
    """
    cfg = layer.ders_settings[adapter]
    n = cfg.num_experts
    with torch.no_grad():
        weights = {name: w.float() for name, w in layer.expert_weights(adapter).items()}
        gate, up, down = weights["gate_proj"], weights["up_proj"], weights["down_proj"]
        router = layer.ders_router[adapter].weight.detach().float().clone()
        out = {"router": router[:n]}
        if cfg.shared_expert_gate:  # the learned sigmoid gate of the universal FFN: Qwen2-MoE's shared_expert_gate
            out["shared_gate"] = router[n:]
        out["gate_up_proj"] = torch.cat([gate[:n], up[:n]], dim=1)
        routed_down = down[:n]
        if cfg.shared_expert:
            if shared == "none":
                raise _refuse("the target has no shared expert for the universal FFN")
            mix = 1.0 if cfg.shared_expert_gate else SHARED_EXPERT_MIX
            routed_down = routed_down * mix
            out["shared_gate_up_proj"] = torch.cat([gate[n], up[n]], dim=0)
            out["shared_down_proj"] = down[n] * (mix if shared == "ungated" else 1.0)
        out["down_proj"] = routed_down.contiguous()
    return out


def _moe_block_state(plan: ExportPlan, idx: int) -> dict[str, torch.Tensor]:
    spec = TARGETS[plan.architecture]
    t = expert_tensors(plan.layers[idx], plan.adapter, spec.shared)
    prefix = f"model.layers.{idx}.{spec.block}."
    out = {
        prefix + spec.router: t["router"],
        f"{prefix}experts.gate_up_proj": t["gate_up_proj"],
        f"{prefix}experts.down_proj": t["down_proj"],
    }
    hidden = t["router"].shape[1]
    if spec.shared == "gated":  # Qwen2-MoE: the shared expert always exists; no universal FFN: one zero unit
        # sigmoid(x . 1e-20) = 0.5 exactly, as sigmoid(0), but finite where an engine computes silu(x) / x
        out[f"{prefix}shared_expert_gate.weight"] = t.get("shared_gate", torch.full((1, hidden), SHARED_GATE_ZERO))
        if plan.settings.shared_expert:
            inter = t["shared_down_proj"].shape[1]
            gate_w, up_w = t["shared_gate_up_proj"].split(inter)
            out[f"{prefix}shared_expert.gate_proj.weight"] = gate_w
            out[f"{prefix}shared_expert.up_proj.weight"] = up_w
            out[f"{prefix}shared_expert.down_proj.weight"] = t["shared_down_proj"]
        else:
            out[f"{prefix}shared_expert.gate_proj.weight"] = torch.zeros(1, hidden)
            out[f"{prefix}shared_expert.up_proj.weight"] = torch.zeros(1, hidden)
            out[f"{prefix}shared_expert.down_proj.weight"] = torch.zeros(hidden, 1)
    elif spec.shared == "ungated" and plan.settings.shared_expert:  # GraniteMoeShared: a sibling of the MoE block
        out[f"model.layers.{idx}.shared_mlp.input_linear.weight"] = t["shared_gate_up_proj"]
        out[f"model.layers.{idx}.shared_mlp.output_linear.weight"] = t["shared_down_proj"]
    return out


def _with_layers_unmerged(layers: dict[int, DeRSLayer]):
    """Context manager: temporarily unmerge merged layers (a dense merge overwrites the frozen base weights)."""
    from contextlib import contextmanager

    @contextmanager
    def ctx():
        merged = {i: list(layer.merged_adapters) for i, layer in layers.items() if layer.merged}
        for i in merged:
            layers[i].unmerge()
        try:
            yield
        finally:
            for i, names in merged.items():
                layers[i].merge(adapter_names=names)

    return ctx()


def convert_to_moe(model: nn.Module, architecture: str | None = None) -> nn.Module:
    """Build the standard transformers MoE model equivalent to the DeRS ``model`` (in memory, eval mode).

    ``model`` is a ``PeftModel``/``DeRSModel`` or a transformers model carrying DeRS layers; it is not modified.
    The result needs no ``ders_peft`` to run or to load after ``save_pretrained``.
    """
    return _convert(model, plan_export(model, architecture))


def _convert(model: nn.Module, plan: ExportPlan) -> nn.Module:
    import transformers
    from accelerate import init_empty_weights

    root = _unwrap(model)
    state = {k: v.detach() for k, v in _plain_state(root).items()}
    with _with_layers_unmerged(plan.layers):
        for idx in plan.layers:
            state.update(_moe_block_state(plan, idx))

    cls = getattr(transformers, TARGETS[plan.architecture].model_class)
    with init_empty_weights(include_buffers=False):
        target = cls(plan.target_config)
    expected = target.state_dict()
    missing = [k for k in expected if k not in state]
    for key in missing:
        if re.search(r"self_attn\.[qkv]_proj\.bias$", key) and plan.architecture == "qwen2_moe":
            state[key] = torch.zeros(expected[key].shape)  # Llama/Mistral have no q/k/v biases: zero is exact
        else:
            raise _refuse(f"the target's {key!r} has no source tensor")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise _refuse(f"source tensors {unexpected[:5]} have no place in {plan.architecture}")
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise _refuse(f"{key!r} has shape {tuple(state[key].shape)}, the target expects {tuple(ref.shape)}")
    state = {k: v.to(plan.dtype).clone().contiguous() for k, v in state.items()}
    target.load_state_dict(state, strict=True, assign=True)
    if plan.target_config.tie_word_embeddings:
        target.tie_weights()
    gen_cfg = getattr(root, "generation_config", None)
    if gen_cfg is not None:
        target.generation_config = copy.deepcopy(gen_cfg)
    target.config.ders_export = {"source_model_type": plan.source_type, "num_experts": plan.settings.num_experts}
    return target.eval()
