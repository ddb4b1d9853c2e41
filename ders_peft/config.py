"""`DeRSConfig`: the configuration of DeRS upcycling, a `peft.PeftConfig`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig
from peft.utils import TaskType

from .registration import PEFT_TYPE_DERS

DELTA_TYPES = ("lowrank", "sparse", "full", "quantized")
UNIVERSAL_DELTA_TYPES = (None, "full")
QUANT_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16)
DELTA_INITS = ("zero", "small")


def _bad(field_name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"DeRSConfig.{field_name}={value!r} is invalid: {allowed}.")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _check_int(field_name: str, value: object, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise _bad(field_name, value, f"must be an integer >= {minimum}")


def _check_names(field_name: str, value: object) -> None:
    """``None``, a regex string, or a non-empty collection of module names."""
    if value is None or (isinstance(value, str) and value):
        return
    if isinstance(value, list | tuple | set) and value and all(isinstance(v, str) and v for v in value):
        return
    raise _bad(field_name, value, "must be None, a regex string or a non-empty list of module names such as ['mlp']")


SOURCE_KEYS = ("model_type", "num_blocks", "modules", "ffn_shapes")


def _check_source_architecture(value: object) -> None:
    if value is None:
        return
    form = (
        "must be None (filled at injection) or a dict with keys model_type (str), num_blocks (int or None), modules "
        "(list of module names) and ffn_shapes (dict)"
    )
    if not isinstance(value, dict) or set(value) != set(SOURCE_KEYS):
        raise _bad("source_architecture", value, form)
    ok = (
        isinstance(value["model_type"], str | None)
        and (value["num_blocks"] is None or _is_int(value["num_blocks"]))
        and isinstance(value["modules"], list | tuple)
        and all(isinstance(m, str) for m in value["modules"])
        and isinstance(value["ffn_shapes"], dict)
    )
    if not ok:
        raise _bad("source_architecture", value, form)


def count_blocks(model_config: dict) -> int | None:
    """Number of decoder blocks a transformers config (as a dict) declares, if it says."""
    keys = ("num_hidden_layers", "n_layer", "num_layers")
    return next((model_config[k] for k in keys if _is_int(model_config.get(k))), None)


@dataclass
class DeRSConfig(PeftConfig):
    """Turn FFN blocks into routed Mixture-of-Experts whose experts share one base FFN.

    Expert ``i`` of a targeted FFN uses the weights ``W_base + Delta_i`` for every weight matrix of the block
    (DeRS, arXiv 2503.01359). Only the router, the deltas, per-expert biases and (``train_base``) the shared base
    copy are trainable.

    Args:
        target_modules: names (or a regex) of the FFN blocks to upcycle, e.g. ``["mlp"]``. ``None`` picks the
            default for the architecture (see ``ders_peft.ffn.DEFAULT_TARGET_MODULES``). A matched module must be a
            whole FFN block of a supported layout (SwiGLU, fused SwiGLU, two-layer MLP); a lone projection is refused.
        exclude_modules: names (or a regex) of modules never to upcycle.
        num_experts: number of routed experts N (>= 1).
        top_k: experts chosen per token (1 <= top_k <= num_experts).
        delta_type: ``"lowrank"`` (Delta_i = B_i A_i, DeRS-LM), ``"sparse"`` (fixed random indices with trainable
            values, DeRS-SM), ``"full"`` (N full expert copies: vanilla upcycling, the baseline) or ``"quantized"``
            (k-bit codes packed in bytes with per-row or per-group scales; made by ``ders_peft.compress``).
        rank: rank r of each low-rank delta (``delta_type="lowrank"``).
        sparse_rate: fraction of entries NOT kept in each sparse delta, as in the paper (0.9999 keeps 0.01%).
        bits: bits per entry of quantized deltas (1-8 or 16; 1 is sign times a scale).
        group_size: entries of a row sharing one scale in quantized deltas; ``None`` for one scale per output row.
        seed: seed of the router initialisation, the low-rank A matrices and the sparse indices.
        shared_expert: extended DeRS: an always-on universal FFN (the shared base plus its own delta) next to the
            routed experts; its output and the routed mixture are averaged (see ``ders_peft.routing.route``), so the
            freshly upcycled model still computes the dense model.
        shared_expert_gate: give the universal FFN a learned sigmoid gate ``sigmoid(x g)`` (Qwen2-MoE's
            ``shared_expert_gate``) instead of the fixed average: the routed weights are then used unhalved. Made by
            ``ders_peft.compress`` from a Qwen2-MoE; its gate starts at zero (weight 0.5).
        universal_delta_type: ``None`` (the universal FFN's delta is of ``delta_type`` like the experts') or
            ``"full"`` (its delta is kept as a dense matrix: ``compress(..., compress_shared=False)``).
        train_base: train the shared base FFN copy (the paper's default). If False the base stays the frozen dense FFN.
        normalize_top_k: renormalise the kept top-k router weights to sum to one (Mixtral, DeepSpeed top-2). If False
            the raw softmax probabilities are used (the paper's TopK(softmax)).
        router_aux_loss_coef: weight of the Switch/Mixtral load-balancing loss (0 disables it).
        router_z_loss_coef: weight of the router z-loss (0 disables it).
        router_init_std: standard deviation of the router's normal initialisation.
        delta_scale: multiplier on every delta's output. Under Adam it acts as a learning-rate multiplier for the
            deltas (as LoRA's alpha / r does); 1.0 is the paper's parametrisation.
        delta_init: ``"zero"`` (the paper: low-rank B and sparse values start at zero, so the fresh MoE computes the
            dense model) or ``"small"`` (they start as seeded normal draws of std ``delta_init_std``, so the experts
            differ from step one). Only for ``delta_type`` ``"lowrank"`` and ``"sparse"``.
        delta_init_std: standard deviation of the ``"small"`` initialisation of B / the sparse values (0.01: with
            A uniform in +-1/sqrt(in), low-rank delta entries get std 0.01 sqrt(r / (3 in)), 1e-3 at r=4, in=128).
        layers_to_transform: indices of the blocks to upcycle (e.g. ``list(range(0, n, 2))``, every other block as
            MoE-LLaVA does); ``None`` for all. Needs ``target_modules`` as a list of names (not a regex).
        layers_pattern: name of the ModuleList holding the blocks (``"layers"``, GPT-2's ``"h"``), used with
            ``layers_to_transform``; ``None`` lets peft find the first numbered level of the module name.
        modules_to_save: other modules to train fully and save with the adapter.
        compression: set by ``ders_peft.compress``: the method, its settings and the source MoE (informational; the
            tensors' shapes follow from the other fields).
        source_architecture: what the adapter was made on, filled when it is first injected and saved with it:
            ``model_type``, ``num_blocks``, the upcycled ``modules`` and their ``ffn_shapes`` (``[out, in]`` per
            projection). Injecting it into a model that differs (another architecture, block count, FFN size or block
            selection) is refused naming both sides. Leave it ``None`` for a new adapter.
        allow_other_model_type: accept a base model of another ``model_type`` than ``source_architecture`` records,
            when its blocks and FFN shapes match (e.g. a Llama adapter on a Mistral of the same sizes); block counts,
            shapes and the block selection must match all the same.
        task_type: peft task type (``"CAUSAL_LM"``, ...) or ``None``.

    Every invalid value or combination raises ``ValueError`` naming the field and what is allowed; settings that
    depend on the model (rank above a matrix side, block indices, non-FFN targets) are checked by ``get_peft_model``.
    """

    target_modules: list[str] | str | None = field(default=None, metadata={"help": "FFN blocks to upcycle."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules not to upcycle."})
    num_experts: int = field(default=4, metadata={"help": "Number of routed experts."})
    top_k: int = field(default=2, metadata={"help": "Experts per token."})
    delta_type: Literal["lowrank", "sparse", "full"] = field(default="lowrank", metadata={"help": "Delta kind."})
    rank: int = field(default=4, metadata={"help": "Rank of low-rank deltas."})
    sparse_rate: float = field(default=0.9999, metadata={"help": "Fraction of delta entries not kept."})
    bits: int = field(default=4, metadata={"help": "Bits per entry of quantized deltas."})
    group_size: int | None = field(default=None, metadata={"help": "Entries per scale (None: one per row)."})
    seed: int = field(default=0, metadata={"help": "Seed for router init, low-rank A and sparse indices."})
    shared_expert: bool = field(default=False, metadata={"help": "Add an always-on universal FFN."})
    shared_expert_gate: bool = field(default=False, metadata={"help": "Sigmoid gate on the universal FFN."})
    universal_delta_type: Literal["full"] | None = field(
        default=None, metadata={"help": "Delta kind of the universal FFN (None: as delta_type)."}
    )
    train_base: bool = field(default=True, metadata={"help": "Train the shared base FFN copy."})
    normalize_top_k: bool = field(default=True, metadata={"help": "Renormalise the kept router weights."})
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "Load-balancing loss weight."})
    router_z_loss_coef: float = field(default=0.0, metadata={"help": "Router z-loss weight."})
    router_init_std: float = field(default=0.02, metadata={"help": "Std of the router initialisation."})
    delta_scale: float = field(default=1.0, metadata={"help": "Multiplier on the deltas' output."})
    delta_init: Literal["zero", "small"] = field(
        default="zero", metadata={"help": "Init of low-rank B / sparse values."}
    )
    delta_init_std: float = field(default=1e-2, metadata={"help": "Std of delta_init='small'."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Blocks to upcycle."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the block list."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained fully and saved."})
    compression: dict | None = field(
        default=None, metadata={"help": "How ders_peft.compress made this adapter (informational)."}
    )
    source_architecture: dict | None = field(
        default=None, metadata={"help": "The model the adapter was made on (filled at injection)."}
    )
    allow_other_model_type: bool = field(
        default=False, metadata={"help": "Accept a base of another model_type with the same blocks and shapes."}
    )

    def __post_init__(self) -> None:
        if self.task_type is not None and self.task_type not in list(TaskType):
            raise _bad("task_type", self.task_type, f"allowed values are None or one of {[t.value for t in TaskType]}")
        super().__post_init__()
        self.peft_type = PEFT_TYPE_DERS
        if isinstance(self.target_modules, list | tuple):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list | tuple):
            self.exclude_modules = set(self.exclude_modules)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the allowed values for any invalid setting."""
        _check_names("target_modules", self.target_modules)
        _check_names("exclude_modules", self.exclude_modules)
        _check_int("num_experts", self.num_experts, 1)
        if not _is_int(self.top_k) or not 1 <= self.top_k <= self.num_experts:
            raise _bad("top_k", self.top_k, f"must be an integer in [1, num_experts={self.num_experts}]")
        if self.delta_type not in DELTA_TYPES:
            raise _bad("delta_type", self.delta_type, f"allowed values are {DELTA_TYPES}")
        if not _is_int(self.rank) or self.rank <= 0:
            raise _bad("rank", self.rank, "must be an integer >= 1 (and at most the smaller side of each matrix)")
        if not _is_real(self.sparse_rate) or not 0.0 <= self.sparse_rate < 1.0:
            raise _bad("sparse_rate", self.sparse_rate, "must be a float in [0, 1) (the fraction of entries NOT kept)")
        if not _is_int(self.bits) or self.bits not in QUANT_BITS:
            raise _bad("bits", self.bits, f"allowed values are {QUANT_BITS}")
        if self.group_size is not None and (not _is_int(self.group_size) or self.group_size < 1):
            raise _bad("group_size", self.group_size, "must be None (one scale per output row) or an integer >= 1")
        _check_int("seed", self.seed, 0)
        for name in ("shared_expert", "shared_expert_gate", "train_base", "normalize_top_k", "allow_other_model_type"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "must be True or False")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            value = getattr(self, name)
            if not _is_real(value) or not 0 <= value < math.inf:
                raise _bad(name, value, "must be a finite number >= 0 (0 disables the loss)")
        if self.delta_init not in DELTA_INITS:
            raise _bad("delta_init", self.delta_init, f"allowed values are {DELTA_INITS}")
        if self.delta_init != "zero" and self.delta_type not in ("lowrank", "sparse"):
            raise _bad(
                "delta_init",
                self.delta_init,
                f"only applies to delta_type 'lowrank' or 'sparse', not {self.delta_type!r} (leave it 'zero')",
            )
        for name in ("router_init_std", "delta_scale", "delta_init_std"):
            value = getattr(self, name)
            if not _is_real(value) or not 0 < value < math.inf:
                raise _bad(name, value, "must be a finite number > 0")
        if self.universal_delta_type not in UNIVERSAL_DELTA_TYPES:
            allowed = f"allowed values are {UNIVERSAL_DELTA_TYPES}"
            raise _bad("universal_delta_type", self.universal_delta_type, allowed)
        for name in ("shared_expert_gate", "universal_delta_type"):
            if getattr(self, name) not in (False, None) and not self.shared_expert:
                raise _bad(name, getattr(self, name), "needs shared_expert=True (it configures the universal FFN)")
        if self.universal_delta_type == "full" and self.delta_type == "full":
            raise _bad("universal_delta_type", "full", "is already implied by delta_type='full'; leave it None")
        self._validate_layer_selection()
        if self.modules_to_save is not None and (
            isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save)
        ):
            raise _bad("modules_to_save", self.modules_to_save, "must be None or a list of module names")
        if self.compression is not None and not isinstance(self.compression, dict):
            raise _bad("compression", self.compression, "must be None or a dict (set by ders_peft.compress)")
        _check_source_architecture(self.source_architecture)
        if self.delta_type == "full" and not self.train_base:
            raise _bad(
                "train_base", self.train_base, "must be True with delta_type='full' (vanilla experts are full copies)"
            )

    def _validate_layer_selection(self) -> None:
        layers = self.layers_to_transform
        if layers is not None:
            indices = [layers] if _is_int(layers) else layers
            if not isinstance(indices, list | tuple) or not indices or not all(_is_int(i) and i >= 0 for i in indices):
                raise _bad(
                    "layers_to_transform",
                    layers,
                    "must be None (all blocks), an index >= 0 or a non-empty list of them",
                )
            if isinstance(self.target_modules, str):
                raise _bad(
                    "layers_to_transform",
                    layers,
                    "cannot be combined with a regex target_modules (peft ignores it then); pass target_modules as a "
                    "list of names such as ['mlp'] or put the block indices into the regex",
                )
        pattern = self.layers_pattern
        if pattern is not None:
            if not (isinstance(pattern, str) and pattern) and not (
                isinstance(pattern, list | tuple) and pattern and all(isinstance(p, str) and p for p in pattern)
            ):
                raise _bad(
                    "layers_pattern", pattern, "must be None, a name such as 'layers' or 'h', or a list of them"
                )
            if layers is None:
                raise _bad("layers_pattern", pattern, "is only used together with layers_to_transform")

    def check_model(self, model_config: dict) -> None:
        """Checks that need the base model's config (a dict): block indices in ``layers_to_transform`` must exist."""
        num_blocks = count_blocks(model_config)
        if self.layers_to_transform is None or num_blocks is None:
            return
        indices = [self.layers_to_transform] if _is_int(self.layers_to_transform) else self.layers_to_transform
        missing = sorted(i for i in indices if i >= num_blocks)
        if missing:
            raise _bad(
                "layers_to_transform",
                self.layers_to_transform,
                f"the model has {num_blocks} blocks (indices 0..{num_blocks - 1}), so {missing} do not exist",
            )

    @property
    def num_deltas(self) -> int:
        """Deltas per weight matrix: one per routed expert, plus one for the universal FFN."""
        return self.num_experts + int(self.shared_expert)
