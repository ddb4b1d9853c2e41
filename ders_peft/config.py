"""`DeRSConfig`: the configuration of DeRS upcycling, a `peft.PeftConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from .registration import PEFT_TYPE_DERS

DELTA_TYPES = ("lowrank", "sparse", "full")


def _bad(field_name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"DeRSConfig.{field_name}={value!r} is invalid: {allowed}.")


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
        num_experts: number of routed experts N (>= 1).
        top_k: experts chosen per token (1 <= top_k <= num_experts).
        delta_type: ``"lowrank"`` (Delta_i = B_i A_i, DeRS-LM), ``"sparse"`` (fixed random indices with trainable
            values, DeRS-SM) or ``"full"`` (N full expert copies: vanilla upcycling, the baseline).
        rank: rank r of each low-rank delta (``delta_type="lowrank"``).
        sparse_rate: fraction of entries NOT kept in each sparse delta, as in the paper (0.9999 keeps 0.01%).
        seed: seed of the router initialisation, the low-rank A matrices and the sparse indices.
        shared_expert: extended DeRS: an always-on universal FFN (the shared base plus its own delta) whose output is
            added to the routed experts' output.
        train_base: train the shared base FFN copy (the paper's default). If False the base stays the frozen dense FFN.
        normalize_top_k: renormalise the kept top-k router weights to sum to one (Mixtral, DeepSpeed top-2). If False
            the raw softmax probabilities are used (the paper's TopK(softmax)).
        router_aux_loss_coef: weight of the Switch/Mixtral load-balancing loss (0 disables it).
        router_z_loss_coef: weight of the router z-loss (0 disables it).
        router_init_std: standard deviation of the router's normal initialisation.
        delta_scale: multiplier on every delta's output. Under Adam it acts as a learning-rate multiplier for the
            deltas (as LoRA's alpha / r does); 1.0 is the paper's parametrisation.
        layers_to_transform: indices of the blocks to upcycle (e.g. every other block); ``None`` for all.
        layers_pattern: name of the ModuleList holding the blocks, used with ``layers_to_transform``.
        modules_to_save: other modules to train fully and save with the adapter.
    """

    target_modules: list[str] | str | None = field(default=None, metadata={"help": "FFN blocks to upcycle."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules not to upcycle."})
    num_experts: int = field(default=4, metadata={"help": "Number of routed experts."})
    top_k: int = field(default=2, metadata={"help": "Experts per token."})
    delta_type: Literal["lowrank", "sparse", "full"] = field(default="lowrank", metadata={"help": "Delta kind."})
    rank: int = field(default=4, metadata={"help": "Rank of low-rank deltas."})
    sparse_rate: float = field(default=0.9999, metadata={"help": "Fraction of delta entries not kept."})
    seed: int = field(default=0, metadata={"help": "Seed for router init, low-rank A and sparse indices."})
    shared_expert: bool = field(default=False, metadata={"help": "Add an always-on universal FFN."})
    train_base: bool = field(default=True, metadata={"help": "Train the shared base FFN copy."})
    normalize_top_k: bool = field(default=True, metadata={"help": "Renormalise the kept router weights."})
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "Load-balancing loss weight."})
    router_z_loss_coef: float = field(default=0.0, metadata={"help": "Router z-loss weight."})
    router_init_std: float = field(default=0.02, metadata={"help": "Std of the router initialisation."})
    delta_scale: float = field(default=1.0, metadata={"help": "Multiplier on the deltas' output."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Blocks to upcycle."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the block list."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained fully and saved."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE_DERS
        if isinstance(self.target_modules, list | tuple):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list | tuple):
            self.exclude_modules = set(self.exclude_modules)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the allowed values for any invalid setting."""
        if not isinstance(self.num_experts, int) or isinstance(self.num_experts, bool) or self.num_experts < 1:
            raise _bad("num_experts", self.num_experts, "must be an integer >= 1")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not 1 <= self.top_k <= self.num_experts:
            raise _bad("top_k", self.top_k, f"must be an integer in [1, num_experts={self.num_experts}]")
        if self.delta_type not in DELTA_TYPES:
            raise _bad("delta_type", self.delta_type, f"allowed values are {DELTA_TYPES}")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise _bad("rank", self.rank, "must be an integer >= 1 (and at most the smaller side of each matrix)")
        if not isinstance(self.sparse_rate, int | float) or not 0.0 <= self.sparse_rate < 1.0:
            raise _bad("sparse_rate", self.sparse_rate, "must be a float in [0, 1) (the fraction of entries NOT kept)")
        if self.router_aux_loss_coef < 0:
            raise _bad("router_aux_loss_coef", self.router_aux_loss_coef, "must be >= 0")
        if self.router_z_loss_coef < 0:
            raise _bad("router_z_loss_coef", self.router_z_loss_coef, "must be >= 0")
        if not self.router_init_std > 0:
            raise _bad("router_init_std", self.router_init_std, "must be > 0")
        if not self.delta_scale > 0:
            raise _bad("delta_scale", self.delta_scale, "must be > 0")
        if self.layers_pattern and self.layers_to_transform is None:
            raise _bad("layers_pattern", self.layers_pattern, "is only used together with layers_to_transform")
        if self.delta_type == "full" and not self.train_base:
            raise _bad(
                "train_base", self.train_base, "must be True with delta_type='full' (vanilla experts are full copies)"
            )

    @property
    def num_deltas(self) -> int:
        """Deltas per weight matrix: one per routed expert, plus one for the universal FFN."""
        return self.num_experts + int(self.shared_expert)
