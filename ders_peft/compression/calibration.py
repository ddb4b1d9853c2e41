"""Calibration statistics for D2-MoE: router frequencies, per-expert activation Grams and the empirical Fisher."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .moe_blocks import MoEBlockInfo, expert_intermediate, find_moe_blocks


@dataclass
class LayerStats:
    """Statistics of one MoE block over the calibration tokens (padding excluded).

    E experts, hidden size H, expert intermediate size I:

    * ``frequency`` (E,) int64: routed tokens per expert; sums to ``top_k * num_tokens``.
    * ``gram_in`` (E, H, H) float64: X_e^T X_e over the tokens routed to expert e (input of gate/up).
    * ``gram_mid`` (E, I, I) float64 or None: the same for the expert's act(gate) * up activation (input of down).
    * ``fisher_gate``/``fisher_up`` (E, I, H) and ``fisher_down`` (E, H, I) float32 or None: element-wise
      per-batch empirical Fisher, sum over batches b of (dL_b/dW)^2, L_b the batch's mean LM loss.
    * ``starved``: experts that got fewer than ``min_tokens`` tokens (their Gram is rank deficient or zero and
      their Fisher may be zero; the merging and SVD steps handle this without NaN).
    """

    layer_idx: int
    num_tokens: int
    frequency: torch.Tensor
    gram_in: torch.Tensor
    gram_mid: torch.Tensor | None = None
    fisher_gate: torch.Tensor | None = None
    fisher_up: torch.Tensor | None = None
    fisher_down: torch.Tensor | None = None
    starved: list[int] = field(default_factory=list)
    num_batches: int = 0

    @property
    def router_frequency(self) -> torch.Tensor:
        """Share of the routed slots each expert received, (E,) float64 (zeros when no token was seen)."""
        total = self.frequency.sum()
        return self.frequency.double() / total if total > 0 else torch.zeros_like(self.frequency, dtype=torch.float64)


class _Collector:
    """Forward hooks on one MoE block: reads the router's chosen experts, accumulates frequencies and Grams."""

    def __init__(self, info: MoEBlockInfo, intermediate_gram: bool, device: torch.device | None):
        self.info = info
        e, h, i = info.num_experts, info.hidden_size, info.intermediate_size
        dev = device if device is not None else info.gate.device
        self.frequency = torch.zeros(e, dtype=torch.int64, device=dev)
        self.gram_in = torch.zeros(e, h, h, dtype=torch.float64, device=dev)
        self.gram_mid = torch.zeros(e, i, i, dtype=torch.float64, device=dev) if intermediate_gram else None
        self.num_tokens = 0
        self.token_mask: torch.Tensor | None = None  # (B*S,) bool for the current batch
        self._top_idx: torch.Tensor | None = None
        self.handles = [
            info.router.register_forward_hook(self._router_hook),
            info.block.register_forward_hook(self._block_hook, with_kwargs=True),
        ]

    def _router_hook(self, module, args, output):
        self._top_idx = output[2].detach()

    @torch.no_grad()
    def _block_hook(self, module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        x = hidden.detach().reshape(-1, self.info.hidden_size)
        top_idx, self._top_idx = self._top_idx, None
        if top_idx is None or top_idx.shape[0] != x.shape[0]:
            raise RuntimeError(f"layer {self.info.layer_idx}: router output not seen or misaligned with block input")
        if self.token_mask is not None:
            if self.token_mask.numel() != x.shape[0]:
                raise RuntimeError(f"attention mask has {self.token_mask.numel()} tokens, MoE input {x.shape[0]}")
            x, top_idx = x[self.token_mask], top_idx[self.token_mask]
        self.num_tokens += x.shape[0]
        dev = self.frequency.device
        for e in range(self.info.num_experts):
            tok = (top_idx == e).any(dim=-1).nonzero().squeeze(-1)
            if tok.numel() == 0:
                continue
            x_e = x[tok]
            self.frequency[e] += tok.numel()
            x64 = x_e.to(dev, torch.float64)
            self.gram_in[e] += x64.T @ x64
            if self.gram_mid is not None:
                h64 = expert_intermediate(self.info, x_e, e).to(dev, torch.float64)
                self.gram_mid[e] += h64.T @ h64

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def collect_statistics(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    fisher: bool = True,
    progress: bool = True,
    intermediate_gram: bool = True,
    layers: Iterable[int] | None = None,
    min_tokens: int = 8,
    stats_device: torch.device | str | None = None,
) -> dict[int, LayerStats]:
    """One calibration pass over ``batches`` (dicts with ``input_ids`` (B, S), optional ``attention_mask``).

    Forward hooks on each MoE block record, over the non-padding tokens, the router frequency, the input Gram
    X_e^T X_e per expert and (``intermediate_gram``) the Gram of act(gate) * up per expert, accumulated in float64.
    With ``fisher`` the LM loss (labels = ``labels`` if given, else ``input_ids`` with padding set to -100) is
    back-propagated per batch and the squared gradients of the expert weights are summed: the per-batch empirical
    Fisher. Gradients come from ``torch.autograd.grad``, so the model's ``.grad`` fields and ``requires_grad``
    flags are left as they were; the model runs in eval mode (no router jitter) and its mode is restored.

    ``layers`` restricts the pass to some decoder-layer indices (the I x I Grams of large models are big: E * I^2 *
    8 bytes per layer). ``stats_device`` is where the Grams live (default: the expert weights' device).
    """
    blocks = find_moe_blocks(model)
    if layers is not None:
        wanted = set(layers)
        unknown = wanted - set(blocks)
        if unknown:
            raise ValueError(f"layers {sorted(unknown)} have no MoE block; MoE layers: {sorted(blocks)}")
        blocks = {i: b for i, b in blocks.items() if i in wanted}
    device = _model_device(model)
    collectors = {i: _Collector(b, intermediate_gram, stats_device) for i, b in blocks.items()}
    fisher_sums: dict[int, list[torch.Tensor]] = {}
    params: list[nn.Parameter] = []
    if fisher:
        for i, b in blocks.items():
            params += [b.gate_up_param, b.down_param]
            fisher_sums[i] = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params[-2:]]
    saved_flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    num_batches = 0
    try:
        model.eval()
        if fisher:
            for p in model.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
        total = len(batches) if hasattr(batches, "__len__") else None
        for batch in tqdm(batches, total=total, desc="D2-MoE calibration", disable=not progress):
            input_ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = mask.to(device) if mask is not None else None
            token_mask = mask.reshape(-1).bool() if mask is not None else None
            for c in collectors.values():
                c.token_mask = token_mask
            if fisher:
                labels = batch.get("labels")
                if labels is not None:
                    labels = labels.to(device)
                else:
                    labels = input_ids if mask is None else input_ids.masked_fill(mask == 0, -100)
                loss = model(input_ids=input_ids, attention_mask=mask, labels=labels, use_cache=False).loss
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for n, i in enumerate(blocks):
                    for j in range(2):
                        g = grads[2 * n + j]
                        if g is not None:
                            fisher_sums[i][j] += g.detach().float().square()
            else:
                with torch.no_grad():
                    model(input_ids=input_ids, attention_mask=mask, use_cache=False)
            num_batches += 1
    finally:
        for c in collectors.values():
            c.remove()
        for p, flag in zip(model.parameters(), saved_flags):
            p.requires_grad_(flag)
        model.train(was_training)

    stats: dict[int, LayerStats] = {}
    for i, c in collectors.items():
        info = blocks[i]
        s = LayerStats(i, c.num_tokens, c.frequency, c.gram_in, c.gram_mid, num_batches=num_batches)
        s.starved = [e for e in range(info.num_experts) if int(c.frequency[e]) < min_tokens]
        if fisher:
            gate_up, down = fisher_sums[i]
            if getattr(info.experts, "is_transposed", False):
                gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
            inter = info.intermediate_size
            s.fisher_gate, s.fisher_up, s.fisher_down = gate_up[:, :inter], gate_up[:, inter:], down
        stats[i] = s
    return stats
