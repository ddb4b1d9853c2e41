"""`DeRSLayer`: a dense FFN block turned into a routed MoE of ``W_base + Delta_e`` experts (a peft tuner layer)."""

from __future__ import annotations

import dataclasses
import operator
import zlib
from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from . import decode, decode_fast, ffn
from .config import DeRSConfig
from .deltas import DELTA_CLASSES, Delta, FullDelta, UniversalFullDelta
from .functional import routed_ffn
from .integrations.deepspeed import deepspeed_installed, zero3_input_needs_grad
from .integrations.fsdp import explain_sharded_read
from .routing import Router, RoutingPlan, inject_aux_loss, load_balancing_loss, route, z_loss


@dataclass
class RouterRuntime:
    """State shared by the tuner and its layers: the current attention mask (to exclude padding from the router
    losses), the gradient scale of the router losses (1 / gradient accumulation steps) and running loss statistics."""

    attention_mask: torch.Tensor | None = None
    aux_grad_scale: float = 1.0
    stats: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)

    def record(self, name: str, value: torch.Tensor) -> None:
        """Add ``value`` to the running sum of ``name`` (kept on device: no host sync per layer call)."""
        total, count = self.stats.get(name, (0.0, 0))
        self.stats[name] = (total + value.detach().float(), count + 1)

    def pop_means(self) -> dict[str, float]:
        out = {k: float(total) / count for k, (total, count) in self.stats.items() if count}
        self.stats.clear()
        return out


class ExpertBias(nn.Module):
    """One bias per expert, ``(E, out)`` as ``.weight`` (kept in a leaf module with ``.weight`` for FSDP)."""

    def __init__(self, num_experts: int, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(bias.detach().unsqueeze(0).repeat(num_experts, 1))


class BaseFFN(nn.Module):
    """Trainable copy of the dense FFN's weight matrices (no biases: those are per expert), one ``nn.Linear`` per
    projection, in ``(out, in)`` orientation."""

    def __init__(self, block: nn.Module, layout: ffn.FFNLayout) -> None:
        super().__init__()
        for name in layout.projs:
            weight = ffn.proj_weight(getattr(block, name))
            lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
            if weight.device.type != "meta":
                with torch.no_grad():
                    lin.weight.copy_(weight)
            self.add_module(name, lin)


# settings a DeRS layer's tensors are built from: editing one afterwards is refused at the next forward
_STRUCTURE = (
    "num_experts", "delta_type", "rank", "sparse_rate", "bits", "group_size", "shared_expert", "shared_expert_gate",
    "universal_delta_type", "train_base", "delta_scale",
)


_structure = operator.attrgetter(*_STRUCTURE)
"""The settings of ``_STRUCTURE`` of a config, as a tuple (one C call: this runs at every layer call)."""


def not_an_ffn_block(key: str, module: nn.Module, reason: str) -> str:
    """The message for a target that is not an FFN block."""
    return (
        f"DeRSConfig.target_modules matched {key or 'a module'!r} of type {type(module).__name__}, which is not an "
        f"FFN block: {reason}. Target whole FFN blocks (e.g. target_modules=['mlp']); supported layouts: "
        f"{ffn.describe_layouts()}."
    )


def _layer_seed(seed: int, key: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1)


class DeRSLayer(nn.Module, BaseTunerLayer):
    """Routed Mixture-of-Experts replacing one FFN block.

    Per adapter it holds a :class:`~ders_peft.routing.Router`, optionally a trainable :class:`BaseFFN` copy, one
    :class:`~ders_peft.deltas.Delta` per weight matrix (E = num_experts [+1 universal] experts each) and per-expert
    biases. The original block stays untouched as ``base_layer`` (used when adapters are disabled).
    """

    adapter_layer_names = ("ders_router", "ders_base", "ders_delta", "ders_bias")
    other_param_names = ("ders_settings",)

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: DeRSConfig, runtime: RouterRuntime, key: str = ""
    ) -> None:
        super().__init__()
        layout, reason = ffn.inspect_block(base_layer)
        if layout is None:
            raise ValueError(not_an_ffn_block(key, base_layer, reason))
        self.base_layer = base_layer
        self.layout = layout
        self.key = key
        self.ders_router = nn.ModuleDict()
        self.ders_base = nn.ModuleDict()
        self.ders_delta = nn.ModuleDict()
        self.ders_bias = nn.ModuleDict()
        self.ders_settings: dict[str, DeRSConfig] = {}
        self._runtime = runtime
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._merged_experts: dict[str, dict[str, FullDelta]] = {}
        self._dense_stash: dict[str, torch.Tensor] = {}
        self._built_with: dict[str, tuple] = {}
        # DeepSpeed ZeRO-3 leaf module (what deepspeed.utils.set_z3_leaf_modules sets): forward reads the children's
        # weights without calling their forward, so ZeRO-3 must gather the whole layer's parameters at its forward
        self._z3_leaf = True
        if deepspeed_installed():  # before DeepSpeed's hooks (see the function); no hook, no cost, without it
            self.register_forward_pre_hook(zero3_input_needs_grad)
        self.update_layer(adapter_name, config)

    # ------------------------------------------------------------------ construction
    def update_layer(self, adapter_name: str, config: DeRSConfig) -> None:
        """Create the router, base copy, deltas and biases of ``adapter_name``."""
        block = self.base_layer
        first = ffn.proj_weight(getattr(block, self.layout.out_proj))
        factory = {"device": first.device, "dtype": first.dtype}
        hidden = first.shape[0]
        gen = torch.Generator().manual_seed(_layer_seed(config.seed, self.key))
        num_deltas = config.num_deltas

        gate_rows = int(config.shared_expert_gate)  # the universal FFN's sigmoid gate: one more row, zero at start
        router = Router(hidden, config.num_experts + gate_rows, config.router_init_std, gen, **factory)
        if gate_rows and router.weight.device.type != "meta":
            with torch.no_grad():
                router.weight[config.num_experts :].zero_()
        self.ders_router[adapter_name] = router
        if config.train_base and config.delta_type != "full":
            self.ders_base[adapter_name] = BaseFFN(block, self.layout)

        deltas, biases = nn.ModuleDict(), nn.ModuleDict()
        for name in self.layout.projs:
            proj = getattr(block, name)
            out_f, in_f = ffn.proj_shape(proj)
            deltas[name] = self._make_delta(config, name, out_f, in_f, ffn.proj_weight(proj), gen, factory)
            if getattr(proj, "bias", None) is not None:
                biases[name] = ExpertBias(num_deltas, proj.bias)
        self.ders_delta[adapter_name] = deltas
        if len(biases):
            self.ders_bias[adapter_name] = biases
        self.ders_settings[adapter_name] = config
        self._built_with[adapter_name] = _structure(config)
        self.set_adapter(self.active_adapters)

    @staticmethod
    def _make_delta(config, name, out_f, in_f, weight, gen, factory) -> Delta:
        if config.universal_delta_type == "full":  # routed deltas of delta_type, the universal FFN's kept dense
            routed_cfg = dataclasses.replace(
                config, shared_expert=False, shared_expert_gate=False, universal_delta_type=None
            )
            routed = DeRSLayer._make_delta(routed_cfg, name, out_f, in_f, weight, gen, factory)
            return UniversalFullDelta(routed, **factory)
        cls = DELTA_CLASSES[config.delta_type]
        num = config.num_deltas
        init = {"init": config.delta_init, "init_std": config.delta_init_std}
        if config.delta_type == "lowrank":
            if config.rank > min(out_f, in_f):
                raise ValueError(
                    f"DeRSConfig.rank={config.rank} is invalid: it must be at most {min(out_f, in_f)}, "
                    f"the smaller side of the {out_f}x{in_f} matrix {name!r}."
                )
            return cls(num, out_f, in_f, rank=config.rank, scale=config.delta_scale, generator=gen, **init, **factory)
        if config.delta_type == "sparse":
            sparse_rate = config.sparse_rate
            return cls(num, out_f, in_f, sparse_rate, scale=config.delta_scale, generator=gen, **init, **factory)
        if config.delta_type == "quantized":
            if config.group_size is not None and config.group_size > in_f:
                raise ValueError(
                    f"DeRSConfig.group_size={config.group_size} is invalid: it must be at most {in_f}, the row length "
                    f"of the {out_f}x{in_f} matrix {name!r} (or None for one scale per row)."
                )
            return cls(
                num, out_f, in_f, bits=config.bits, group_size=config.group_size, scale=config.delta_scale, **factory
            )
        return cls(num, out_f, in_f, init_weight=weight, **factory)

    # ------------------------------------------------------------------ helpers
    def _single_active(self) -> str | None:
        adapters = self.active_adapters
        if len(adapters) == 1:  # the usual case, without building a list (this runs at every generated token)
            return adapters[0] if adapters[0] in self.ders_router else None
        active = [a for a in adapters if a in self.ders_router]
        if len(active) > 1:
            raise ValueError(
                f"DeRS layers run one adapter at a time, but {active} are active: call set_adapter(<one name>)."
            )
        return active[0] if active else None

    def base_weight(self, adapter: str, proj: str) -> torch.Tensor:
        """The shared base weight of ``proj`` (trainable copy if ``train_base``, else the dense block's weight)."""
        if adapter in self.ders_base:
            return getattr(self.ders_base[adapter], proj).weight
        return ffn.proj_weight(getattr(self.base_layer, proj))

    def expert_weights(self, adapter: str) -> dict[str, torch.Tensor]:
        """Every expert's synthesised weight ``W_base + Delta_e`` per projection, ``(E, out, in)`` (detached)."""
        with torch.no_grad():
            out = {}
            for name, delta in self.ders_delta[adapter].items():
                base = None if delta.replaces_base else self.base_weight(adapter, name)
                out[name] = delta.synthesize(base).detach().clone()
            return out

    def expert_biases(self, adapter: str) -> dict[str, torch.Tensor | None]:
        """Per-expert biases ``(E, out)`` per projection (``None`` where the block has no bias)."""
        biases = self.ders_bias[adapter] if adapter in self.ders_bias else {}
        return {n: (biases[n].weight.detach().clone() if n in biases else None) for n in self.layout.projs}

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = decode_fast.run(self, x)  # a generation step the compiled kernel served last time (None: the full path)
        if y is not None:
            return y
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        adapter = self._single_active()
        if adapter is None:
            return self.base_layer(x, *args, **kwargs)
        if self.merged_adapters and adapter in self._dense_stash_adapters():
            return self.base_layer(x, *args, **kwargs)
        config = self.ders_settings[adapter]
        self._check_settings(adapter, config)
        shape = x.shape
        if x.numel() == 0:  # no token: the dense block's empty output (same shape and dtype)
            return self.base_layer(x, *args, **kwargs)
        xf = x.reshape(-1, shape[-1])
        y = decode.layer_forward(self, adapter, xf)  # generation: few tokens, no autograd (None if it does not apply)
        if y is not None:
            return ffn.output_dropout(self.base_layer, self.layout, y.view(*shape[:-1], y.shape[-1]))
        logits = self.ders_router[adapter](xf)
        gate_logit = None
        if config.shared_expert_gate:
            logits, gate_logit = logits[:, : config.num_experts], logits[:, config.num_experts :]
        plan, probs = route(logits, config.top_k, config.normalize_top_k, config.shared_expert, gate_logit)
        # the router losses ride on the routing weights (not on the output, which callers such as Falcon's decoder
        # layer modify in place: an autograd identity's output is a view that may not be modified in place)
        plan = self._add_router_losses(plan, logits, probs, config)

        if adapter in self._merged_experts:
            deltas = self._merged_experts[adapter]
            in_base, out_base = [None] * len(self.layout.in_projs), None
        else:
            deltas = self.ders_delta[adapter]
            in_base = [None if deltas[n].replaces_base else self.base_weight(adapter, n) for n in self.layout.in_projs]
            out_name = self.layout.out_proj
            out_base = None if deltas[out_name].replaces_base else self.base_weight(adapter, out_name)
        biases = self.ders_bias[adapter] if adapter in self.ders_bias else {}
        bias = {n: (biases[n].weight if n in biases else None) for n in self.layout.projs}
        try:
            y = routed_ffn(
                xf,
                plan,
                in_base,
                out_base,
                [deltas[n] for n in self.layout.in_projs],
                deltas[self.layout.out_proj],
                [bias[n] for n in self.layout.in_projs],
                bias[self.layout.out_proj],
                ffn.activation(self.base_layer, self.layout),
                self.layout.gated,
            )
        except RuntimeError as err:  # FSDP units inside the layer: say why and what to do instead
            better = explain_sharded_read(self, err)
            if better is err:
                raise
            raise better from err
        return ffn.output_dropout(self.base_layer, self.layout, y.view(*shape[:-1], y.shape[-1]))

    def _check_settings(self, adapter: str, config: DeRSConfig) -> None:
        """``ValueError`` naming the field if the adapter's settings were edited after its tensors were built in a
        way they cannot follow (``top_k`` may change within ``[1, num_experts]``)."""
        built = self.__dict__.get("_built_with", {}).get(adapter)  # None: a layer pickled by an older version
        now = _structure(config)
        if built is not None and now != built:
            name, was, value = next((f, b, v) for f, b, v in zip(_STRUCTURE, built, now, strict=True) if b != v)
            raise ValueError(
                f"DeRSConfig.{name}={value!r} is invalid: adapter {adapter!r} was built with {name}={was!r}, which "
                "fixes its tensors' shapes; set it back, or add a new adapter with these settings."
            )
        if not (isinstance(config.top_k, int) and 1 <= config.top_k <= config.num_experts):
            raise ValueError(
                f"DeRSConfig.top_k={config.top_k!r} is invalid: must be an integer in [1, num_experts="
                f"{config.num_experts}] (adapter {adapter!r} was edited after it was built)."
            )

    def _add_router_losses(self, plan: RoutingPlan, logits, probs, config: DeRSConfig) -> RoutingPlan:
        if not (self.training and torch.is_grad_enabled()):
            return plan
        if config.router_aux_loss_coef == 0 and config.router_z_loss_coef == 0:
            return plan
        mask = self._runtime.attention_mask
        token_mask = mask.reshape(-1) if mask is not None and mask.numel() == logits.shape[0] else None
        aux = logits.new_zeros((), dtype=torch.float32)
        if config.router_aux_loss_coef:
            lb = load_balancing_loss(probs, plan.expert_idx[:, : config.top_k], config.num_experts, token_mask)
            self._runtime.record("router_aux_loss", lb)
            aux = aux + config.router_aux_loss_coef * lb
        if config.router_z_loss_coef:
            zl = z_loss(logits, token_mask)
            self._runtime.record("router_z_loss", zl)
            aux = aux + config.router_z_loss_coef * zl
        weights = inject_aux_loss(plan.weights, aux, self._runtime.aux_grad_scale)
        return RoutingPlan(plan.expert_idx, weights, plan.num_experts)

    # ------------------------------------------------------------------ merging
    def _is_dense_mergeable(self, adapter: str) -> bool:
        config = self.ders_settings[adapter]
        return config.num_experts == 1 and not config.shared_expert

    def _dense_stash_adapters(self) -> list[str]:
        return [a for a in self.merged_adapters if self._is_dense_mergeable(a)]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Materialise each expert's ``W_base + Delta_e`` for faster inference (one adapter at a time).

        With one routed expert (no universal FFN) the synthesised weights are written into the dense block and the
        originals stashed, so ``unmerge`` restores them bit for bit. Otherwise the factorised parameters are left
        untouched and a detached copy of every expert's weights is used by ``forward`` until ``unmerge``.
        """
        names = adapter_names or [a for a in self.active_adapters if a in self.ders_router]
        names = [a for a in names if a in self.ders_router and a not in self.merged_adapters]
        if not names:
            return  # already merged (or nothing to merge): nothing to do
        if self.merged_adapters or len(names) > 1:
            raise ValueError("DeRS layers can hold one merged adapter at a time; unmerge first.")
        for adapter in names:
            weights = self.expert_weights(adapter)
            if safe_merge and not all(torch.isfinite(w).all() for w in weights.values()):
                raise ValueError(f"NaNs detected in the merged weights of adapter {adapter!r}; not merging.")
            if self._is_dense_mergeable(adapter):
                biases = self.expert_biases(adapter)
                for name in self.layout.projs:
                    proj = getattr(self.base_layer, name)
                    self._dense_stash[name] = proj.weight.detach().clone()
                    ffn.set_proj_weight(proj, weights[name][0].to(proj.weight.dtype))
                    if biases[name] is not None:
                        self._dense_stash[name + ".bias"] = proj.bias.detach().clone()
                        with torch.no_grad():
                            proj.bias.copy_(biases[name][0])
            else:
                self._merged_experts[adapter] = {name: _frozen_full(w) for name, w in weights.items()}
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        for adapter in list(self.merged_adapters):
            if self._is_dense_mergeable(adapter):
                for name in self.layout.projs:
                    proj = getattr(self.base_layer, name)
                    with torch.no_grad():
                        proj.weight.copy_(self._dense_stash.pop(name))
                        if name + ".bias" in self._dense_stash:
                            proj.bias.copy_(self._dense_stash.pop(name + ".bias"))
            else:
                self._merged_experts.pop(adapter, None)
            self.merged_adapters.remove(adapter)

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        """What ``merge_and_unload``/``unload`` put in place of this layer."""
        if not merge:
            if self.merged:
                self.unmerge()
            return self.base_layer
        adapter = (adapter_names or [self._single_active()])[0]
        if adapter is None:
            return self.base_layer
        if not self._is_dense_mergeable(adapter):
            cfg = self.ders_settings[adapter]
            raise ValueError(
                f"merge_and_unload() cannot fold a routed Mixture-of-Experts (num_experts={cfg.num_experts}, "
                f"shared_expert={cfg.shared_expert}) "
                "into one dense FFN: the activation between the projections is not linear, so the result would be "
                "wrong. Use ders_peft.export_moe(model, out_dir) to get a standard transformers MoE checkpoint, or "
                "merge_adapter() to materialise the experts in place."
            )
        if self.merged:
            self.unmerge()
        self.merge(safe_merge=safe_merge, adapter_names=[adapter])
        self._dense_stash.clear()
        self.merged_adapters.clear()
        return self.base_layer


def _frozen_full(weight: torch.Tensor) -> FullDelta:
    delta = FullDelta(weight.shape[0], weight.shape[1], weight.shape[2], device="meta", dtype=weight.dtype)
    delta.weight = nn.Parameter(weight, requires_grad=False)
    return delta
