"""`compress`: a trained MoE becomes a DeRS adapter over its dense model, with sparsified or quantized deltas.

Steps: read the MoE (:mod:`.sources`), build a DeRS config that expresses its routing exactly (experts, top-k,
renormalisation, universal FFN and its gate), inject it into the dense model, then per FFN block copy the router and
write each compressed ``Delta_e = W_e - W_base`` (``W_base``: the dense FFN) into the new layer's deltas
(:mod:`.sparsify`, :mod:`.quantize`). Non-expert weights that differ from the dense model's are carried by the
adapter as ``modules_to_save``.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import ffn
from ..config import DeRSConfig
from ..deltas import Delta, UniversalFullDelta
from ..layer import DeRSLayer
from .config import CompressionConfig
from .quantize import quantize_into
from .sources import ExpertBlock, MoESource, read_source
from .sparsify import sparsify_into


def compress(
    model: nn.Module,
    config: CompressionConfig | None = None,
    *,
    dense_model: nn.Module | str | None = None,
    calibration=None,
    tokenizer=None,
    progress: bool = True,
):
    """Compress a trained MoE.

    DeRS compression (``method`` ``"dare"``, ``"magnitude"``, ``"quantize"``): ``model`` is a DeRS model with
    ``delta_type="full"`` (its dense model is the one inside it), or a transformers Mixtral / Qwen2-MoE / Qwen3-MoE
    with ``dense_model`` (a model or a local directory); the result is a DeRS adapter (``PeftModel``) over a copy of
    the dense model: sparse (``sparse_rate=drop_rate``) or quantized deltas; it trains further, saves, merges and
    exports like any DeRS adapter.

    D2-MoE (``method="d2moe"``): any transformers MoE (no dense model), with ``calibration`` data (texts with
    ``tokenizer``, token-id sequences or batches); the result is the same model class with compressed experts
    (:func:`ders_peft.compression.d2moe.d2moe_compress`).

    The input is never modified. ``progress`` shows progress bars.
    """
    from peft import get_peft_model

    config = config or CompressionConfig()
    if not isinstance(config, CompressionConfig):
        raise TypeError(f"compress(): config must be a CompressionConfig, got {type(config).__name__}")
    config.validate()
    if config.method == "d2moe":
        from .d2moe import d2moe_compress

        if dense_model is not None:
            raise ValueError("compress(method='d2moe') merges its own base from the experts: do not pass dense_model.")
        return d2moe_compress(model, config, calibration, tokenizer=tokenizer, progress=progress)
    if calibration is not None:
        raise ValueError(f"compress(method={config.method!r}) uses no calibration data; calibration is for 'd2moe'.")
    source = read_source(model, dense_model)
    ders_config = _ders_config(source, config)
    dense = source.dense
    dense.requires_grad_(False)
    peft_model = get_peft_model(dense, ders_config)
    layers = {name.removeprefix("base_model.model."): m for name, m in peft_model.named_modules()}
    bar = tqdm(source.blocks, desc=f"compress ({config.method})", unit="block", disable=not progress)
    for block in bar:
        layer = layers.get(block.name)
        if not isinstance(layer, DeRSLayer):
            raise RuntimeError(f"compress(): no DeRS layer was created at {block.name!r}")
        _fill_layer(layer, block, config)
    _fill_carried(peft_model, source)
    peft_model.eval()
    return peft_model


def _ders_config(source: MoESource, config: CompressionConfig) -> DeRSConfig:
    shared = source.settings.get("shared_expert", False)
    carried = sorted({key.rpartition(".")[0] for key in source.carried})
    description = {**config.describe(), "source": source.kind}
    return DeRSConfig(
        target_modules=sorted(b.name for b in source.blocks),
        num_experts=source.num_experts,
        top_k=source.top_k,
        normalize_top_k=source.normalize_top_k,
        delta_type="quantized" if config.method == "quantize" else "sparse",
        sparse_rate=config.drop_rate,
        bits=config.bits,
        group_size=config.group_size,
        seed=config.seed,
        shared_expert=shared,
        shared_expert_gate=source.settings.get("shared_expert_gate", False),
        universal_delta_type="full" if shared and config.compress_shared is False else None,
        train_base=False,
        router_aux_loss_coef=source.settings.get("router_aux_loss_coef", 0.01),
        router_z_loss_coef=source.settings.get("router_z_loss_coef", 0.0),
        modules_to_save=carried or None,
        task_type=source.settings.get("task_type"),
        compression=description,
    )


def _generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1))


@torch.no_grad()
def _fill_layer(layer: DeRSLayer, block: ExpertBlock, config: CompressionConfig) -> None:
    adapter = layer._single_active()
    router = layer.ders_router[adapter].weight
    n = block.router.shape[0]
    router[:n].copy_(block.router)
    if block.shared_gate is not None:
        router[n:].copy_(block.shared_gate)
    deltas = layer.ders_delta[adapter]
    for proj, experts in block.experts.items():
        base = ffn.proj_weight(getattr(layer.base_layer, proj)).detach().float()
        delta = experts - base
        universal = None
        if block.universal is not None:
            universal = block.universal[proj] - base
        target = deltas[proj]
        if isinstance(target, UniversalFullDelta):
            target.universal.weight.copy_(universal)
            target, universal = target.routed, None
        full = delta if universal is None else torch.cat([delta, universal.unsqueeze(0)])
        write_delta(target, full, config, _generator(config.seed, f"{block.name}.{proj}"))
    if adapter in layer.ders_bias:
        for proj, holder in layer.ders_bias[adapter].items():
            bias = block.biases[proj]
            if block.universal is not None:
                bias = torch.cat([bias, block.universal_biases[proj].unsqueeze(0)])
            holder.weight.copy_(bias)


COMPRESSORS = {"dare": sparsify_into, "magnitude": sparsify_into, "quantize": quantize_into}
"""``method`` -> compressor ``(target delta module, delta (E, out, in) fp32, config, generator)``: one module each."""


def write_delta(target: Delta, delta: torch.Tensor, config: CompressionConfig, generator: torch.Generator) -> None:
    """Compress ``delta`` ``(E, out, in)`` (fp32) by ``config.method`` into the DeRS delta module ``target``."""
    COMPRESSORS[config.method](target, delta, config, generator)


@torch.no_grad()
def _fill_carried(peft_model: nn.Module, source: MoESource) -> None:
    """Write the MoE's differing non-expert tensors into the adapter's ``modules_to_save`` copies."""
    if not source.carried:
        return
    from peft.utils.other import ModulesToSaveWrapper

    adapter = peft_model.active_adapter
    root = peft_model.base_model.model
    for key, value in source.carried.items():
        module_name, _, tensor_name = key.rpartition(".")
        wrapper = root.get_submodule(module_name)
        if not isinstance(wrapper, ModulesToSaveWrapper):
            raise RuntimeError(f"compress(): {module_name!r} was not wrapped as a module to save")
        own = wrapper.modules_to_save[adapter]
        getattr(own, tensor_name).copy_(value)
