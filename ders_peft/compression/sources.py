"""Read a trained MoE into one form: per FFN block the router and every expert's weights, plus the dense model.

Two kinds of input:

- a DeRS model with ``delta_type="full"`` (vanilla upcycling): the dense model is the one inside it (the FFN blocks'
  ``base_layer``), the experts are the ``FullDelta`` weights;
- a transformers MoE (Mixtral, Qwen2-MoE, Qwen3-MoE; fused 3-D expert tensors read from the model's own expert
  modules) together with the dense model it was upcycled from.

Non-expert weights (attention, norms, embeddings, head) are compared with the dense model's: those that differ are
returned so the compressed adapter carries them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import ffn
from ..export.targets import SHARED_GATE_ZERO
from ..layer import DeRSLayer

NO_DENSE_MESSAGE = (
    "DeRS compression needs the dense model the MoE was upcycled from (dense_model=<model or local directory>): its "
    "FFN is the shared base W_base of W_e = W_base + Delta_e. A MoE trained from scratch (or without its dense "
    "ancestor) has no such base: use D2-MoE compression instead, CompressionConfig(method='d2moe') with "
    "calibration=<texts or token batches> (a base merged from the experts and low-rank deltas)."
)

# transformers MoE model_type -> (routing renormalises the top-k weights: True, False or the config attribute)
MOE_TYPES: dict[str, bool | str] = {"mixtral": True, "qwen2_moe": "norm_topk_prob", "qwen3_moe": "norm_topk_prob"}


@dataclass
class ExpertBlock:
    """One MoE block in the dense model's FFN layout (``(out, in)`` weights in fp32; read only)."""

    name: str  # module name of the FFN block in the dense model, e.g. "model.layers.0.mlp"
    router: torch.Tensor  # (N, hidden)
    experts: dict[str, torch.Tensor]  # projection -> (N, out, in)
    biases: dict[str, torch.Tensor]  # projection -> (N, out), biased projections only
    universal: dict[str, torch.Tensor] | None = None  # projection -> (out, in) of the universal FFN / shared expert
    universal_biases: dict[str, torch.Tensor] = field(default_factory=dict)  # projection -> (out,)
    shared_gate: torch.Tensor | None = None  # (1, hidden): sigmoid gate of the universal FFN (Qwen2-MoE)


@dataclass
class MoESource:
    """A trained MoE read for compression."""

    kind: str  # "ders_full" or the transformers model_type
    dense: nn.Module  # a private dense model the compressed adapter is attached to
    blocks: list[ExpertBlock]
    num_experts: int
    top_k: int
    normalize_top_k: bool
    carried: dict[str, torch.Tensor]  # dense-model state key -> the MoE's differing non-expert tensor
    settings: dict  # DeRS settings to keep (router loss weights, task type)


def read_source(model: nn.Module, dense_model: nn.Module | str | None = None) -> MoESource:
    """Read ``model`` (a DeRS ``full`` model, or a transformers MoE with ``dense_model``) for compression."""
    from ..export import _unwrap

    root = _unwrap(model)
    if any(isinstance(m, DeRSLayer) for m in root.modules()):
        return _read_ders(model, root, dense_model)
    model_type = getattr(getattr(root, "config", None), "model_type", None)
    if model_type not in MOE_TYPES:
        raise ValueError(
            f"compress(): the model ({type(root).__name__}, model_type={model_type!r}) is neither a DeRS model nor a "
            f"supported transformers MoE; supported: a DeRS delta_type='full' model or model_type in "
            f"{sorted(MOE_TYPES)}."
        )
    if dense_model is None:
        raise ValueError(f"compress(): a {model_type} model was given without dense_model. {NO_DENSE_MESSAGE}")
    return _read_moe(root, model_type, _load_dense(dense_model, root))


# ---------------------------------------------------------------------------------------------------------- DeRS
def _read_ders(model: nn.Module, root: nn.Module, dense_model) -> MoESource:
    from ..export import _plain_state

    layers = {name: m for name, m in root.named_modules() if isinstance(m, DeRSLayer)}
    adapters = {layer._single_active() for layer in layers.values()}
    if None in adapters or len(adapters) != 1:
        found = sorted(map(str, adapters))
        raise ValueError(f"compress(): the DeRS layers must have one active adapter, found {found}.")
    adapter = adapters.pop()
    cfg = next(iter(layers.values())).ders_settings[adapter]
    if cfg.delta_type != "full":
        raise ValueError(
            f"compress(): the DeRS adapter has delta_type={cfg.delta_type!r}; compression starts from vanilla experts "
            "(delta_type='full'): its deltas are already compact."
        )
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"compress(): DeRS layers {merged[:3]} are merged; call unmerge_adapter() first.")
    blocks = []
    n = cfg.num_experts
    for name, layer in layers.items():
        weights = {p: w.float() for p, w in layer.expert_weights(adapter).items()}
        biases = {p: b.float() for p, b in layer.expert_biases(adapter).items() if b is not None}
        router = layer.ders_router[adapter].weight.detach().float().clone()
        block = ExpertBlock(
            name=name,
            router=router[:n],
            experts={p: w[:n] for p, w in weights.items()},
            biases={p: b[:n] for p, b in biases.items()},
        )
        if cfg.shared_expert:
            block.universal = {p: w[n] for p, w in weights.items()}
            block.universal_biases = {p: b[n] for p, b in biases.items()}
            block.shared_gate = router[n:] if cfg.shared_expert_gate else None
        blocks.append(block)
    if dense_model is not None:
        dense = _load_dense(dense_model, root)
    else:
        dense = _dense_copy(root)
    plain = {k: v.detach() for k, v in _plain_state(root).items()}
    settings = {
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "router_z_loss_coef": cfg.router_z_loss_coef,
        "task_type": cfg.task_type,
        "shared_expert": cfg.shared_expert,
        "shared_expert_gate": cfg.shared_expert_gate,
    }
    return MoESource(
        kind="ders_full",
        dense=dense,
        blocks=blocks,
        num_experts=n,
        top_k=cfg.top_k,
        normalize_top_k=cfg.normalize_top_k,
        carried=_differing(plain, dense, exclude={b.name for b in blocks}),
        settings=settings,
    )


def _dense_copy(root: nn.Module) -> nn.Module:
    """A copy of the dense model inside a DeRS model: every DeRS layer replaced by its ``base_layer``, every
    ``modules_to_save`` wrapper by its original module, the tuner's hooks dropped."""
    from peft.utils.other import ModulesToSaveWrapper

    from ..model import _AttentionMaskCapture

    dense = copy.deepcopy(root)
    dense.__dict__.pop("peft_config", None)  # set on the wrapped model by peft's tuner
    for name, module in list(dense.named_modules()):
        if isinstance(module, DeRSLayer | ModulesToSaveWrapper):
            replacement = module.base_layer if isinstance(module, DeRSLayer) else module.original_module
            parent_name, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent_name) if parent_name else dense, child, replacement)
    for hooks in (dense._forward_pre_hooks,):
        for key in [k for k, h in hooks.items() if isinstance(h, _AttentionMaskCapture)]:
            del hooks[key]
            dense._forward_pre_hooks_with_kwargs.pop(key, None)
    return dense


# ---------------------------------------------------------------------------------------------------------- HF MoE
def _load_dense(dense_model, moe: nn.Module) -> nn.Module:
    if isinstance(dense_model, nn.Module):
        return copy.deepcopy(dense_model)
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    path = Path(dense_model)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"compress(): dense_model={str(dense_model)!r} is invalid: it must be a model or a local directory "
            "containing config.json (the dense model the MoE was upcycled from)."
        )
    dtype = next(moe.parameters()).dtype
    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype).eval()


def _read_moe(moe: nn.Module, model_type: str, dense: nn.Module) -> MoESource:
    cfg = moe.config
    dcfg = dense.config
    for attr in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if getattr(cfg, attr) != getattr(dcfg, attr, None):
            raise ValueError(
                f"compress(): dense_model does not match the MoE: {attr} is {getattr(dcfg, attr, None)} in the dense "
                f"model ({dcfg.model_type}) and {getattr(cfg, attr)} in the {model_type} model. {NO_DENSE_MESSAGE}"
            )
    from .moe_blocks import find_moe_blocks

    norm = MOE_TYPES[model_type]
    normalize = norm if isinstance(norm, bool) else bool(getattr(cfg, norm))
    blocks: list[ExpertBlock] = []
    moe_prefixes = []
    for idx, info in find_moe_blocks(moe).items():  # dense blocks (mlp_only_layers) are compared like any weight
        name = f"model.layers.{idx}.mlp"
        moe_prefixes.append(name + ".")
        blocks.append(_read_moe_block(name, info, dense.get_submodule(name), model_type))
    if not blocks:
        raise ValueError(f"compress(): the {model_type} model has no MoE block.")
    num_experts = blocks[0].router.shape[0]
    plain = {k: v.detach() for k, v in moe.state_dict().items() if not any(k.startswith(p) for p in moe_prefixes)}
    dense_keys = set(dense.state_dict())
    extra = [k for k in plain if k not in dense_keys]
    nonzero = [k for k in extra if plain[k].count_nonzero()]
    if nonzero:
        raise ValueError(
            f"compress(): the {model_type} model has non-expert tensors the dense {dcfg.model_type} model has no "
            f"place for: {nonzero[:4]}; an adapter over the dense model cannot carry them."
        )
    shared = [b.universal is not None for b in blocks]
    gated = [b.shared_gate is not None for b in blocks]
    if len(set(shared)) > 1 or len(set(gated)) > 1:
        raise ValueError("compress(): some MoE blocks have a shared expert and others not; DeRS needs one layout.")
    return MoESource(
        kind=model_type,
        dense=dense,
        blocks=blocks,
        num_experts=num_experts,
        top_k=cfg.num_experts_per_tok,
        normalize_top_k=normalize,
        carried=_differing(
            {k: v for k, v in plain.items() if k in dense_keys}, dense, exclude={b.name for b in blocks}
        ),
        settings={
            "router_aux_loss_coef": float(getattr(cfg, "router_aux_loss_coef", 0.0) or 0.0),
            "shared_expert": shared[0],
            "shared_expert_gate": gated[0],
        },
    )


def _read_moe_block(name: str, info, dense_block: nn.Module, model_type: str) -> ExpertBlock:
    """One MoE block (:class:`~.moe_blocks.MoEBlockInfo`, read from the model's own expert modules) in fp32."""
    layout = ffn.detect_layout(dense_block)
    if layout is None or layout.name != "swiglu":
        raise ValueError(
            f"compress(): the dense model's {name!r} is not a SwiGLU FFN (gate_proj/up_proj/down_proj); {model_type} "
            "experts are SwiGLU, so they cannot be copies of it."
        )
    down = info.down.float()
    weights = {"gate_proj": info.gate.float(), "up_proj": info.up.float(), "down_proj": down}
    _check_shapes(name, weights, dense_block, "experts")
    block = ExpertBlock(name=name, router=info.router_weight.float().clone(), experts=weights, biases={})
    if info.shared_gate is not None:
        uni = {"gate_proj": info.shared_gate.float(), "up_proj": info.shared_up.float()}
        uni["down_proj"] = info.shared_down.float()
        gate_w = info.shared_expert_gate.float()
        if all(not w.count_nonzero() for w in uni.values()):
            return block  # a zero shared expert (our export of a model without a universal FFN) adds exactly 0
        _check_shapes(name, uni, dense_block, "shared expert", stacked=False)
        # a learned gate, unless every weight is 0 or the export's 1e-20 (in any dtype's rounding): sigmoid = 0.5
        if float(gate_w.abs().max()) > 2 * SHARED_GATE_ZERO:
            block.shared_gate = gate_w.clone()
            block.universal = uni
        else:
            # sigmoid(0) = 0.5 on every token: DeRS's fixed average of the routed mixture and the universal FFN;
            # its routed half is the 0.5 folded into the experts' down projections (undone here)
            block.universal = uni
            block.experts["down_proj"] = down * 2.0
    return block


def _check_shapes(name, weights, dense_block, what, stacked: bool = True) -> None:
    for proj, w in weights.items():
        want = tuple(ffn.proj_weight(getattr(dense_block, proj)).shape)
        got = tuple(w.shape[1:] if stacked else w.shape)
        if got != want:
            raise ValueError(
                f"compress(): the {what} of {name!r} have {proj} of shape {got}, the dense FFN's is {want}: they are "
                f"not copies of the dense FFN (fine-grained or resized experts). {NO_DENSE_MESSAGE}"
            )


# ---------------------------------------------------------------------------------------------------------- non-expert
def _differing(plain: dict[str, torch.Tensor], dense: nn.Module, exclude: set[str]) -> dict[str, torch.Tensor]:
    """The MoE's tensors (dense-model keys) that differ from the dense model's, outside the FFN blocks."""
    dense_state = dense.state_dict()
    out = {}
    for key, value in plain.items():
        if any(key.startswith(b + ".") for b in exclude) or key not in dense_state:
            continue
        ref = dense_state[key]
        if ref.shape != value.shape:
            raise ValueError(
                f"compress(): {key!r} has shape {tuple(value.shape)} in the MoE and {tuple(ref.shape)} in the dense "
                "model: dense_model is not the model the MoE was upcycled from."
            )
        if not torch.equal(ref, value.to(ref.dtype)):
            out[key] = value
    return out
