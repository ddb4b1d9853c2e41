"""Router load: which experts the tokens go to, how evenly, and how sure the router is.

Per MoE layer, over the (non-padding) tokens seen:

* ``share[e]``: fraction of the top-k assignments that went to expert e (sums to 1; the universal expert of a DeRS
  layer with ``shared_expert`` sees every token and is not counted).
* ``balance = N * sum_e share[e]^2``: 1 when every expert gets the same share, N when one expert takes all.
* ``max_over_mean = N * max_e share[e]``: the busiest expert's load over the mean load (1 = even).
* ``entropy``: mean over tokens of ``-sum_e p_e log p_e`` (nats) of the router's distribution over the N experts
  (softmax of the logits; for sigmoid routers such as DeepSeek-V3 the sigmoid scores normalised to sum 1);
  ``normalized_entropy = entropy / log N`` (1 = uniform, 0 = one expert certain).

DeRS layers: a forward pre-hook on the layer runs its router on the layer input (the generation path does not call
the router module); top-k as :func:`ders_peft.routing.route`. Transformers MoE blocks: a forward hook on the block's
router module reads the logits and the chosen experts it returns. Everything is accumulated on the device (no host
synchronisation per layer call); :meth:`RouterRecorder.stats` reads it back once.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .experts import ders_layers, model_kind, moe_blocks, unwrap


def entropy_of(probs: torch.Tensor) -> torch.Tensor:
    """``-sum p log p`` over the last dimension (0 log 0 = 0)."""
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=-1)


def load_stats(counts: list[float], entropy_sum: float, tokens: float, top_k: int) -> dict:
    """The documented statistics from assignment counts per expert, the summed token entropy and the token count."""
    n = len(counts)
    total = sum(counts)
    share = [c / total for c in counts] if total else [0.0] * n
    entropy = entropy_sum / tokens if tokens else math.nan
    return {
        "tokens": int(tokens),
        "top_k": top_k,
        "share": share,
        "balance": n * sum(s * s for s in share) if total else math.nan,
        "max_over_mean": n * max(share) if total else math.nan,
        "entropy": entropy,
        "normalized_entropy": entropy / math.log(n) if n > 1 else math.nan,
    }


class _Accumulator:
    def __init__(self, num_experts: int, top_k: int) -> None:
        self.num_experts, self.top_k = num_experts, top_k
        self.counts = self.entropy = self.tokens = None

    def add(self, probs: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor | None) -> None:
        """``probs`` (T, N), ``idx`` (T, k) chosen experts, ``mask`` (T,) 1 for real tokens (None: all real)."""
        with torch.no_grad():
            m = torch.ones(idx.shape[0], device=idx.device) if mask is None else mask.reshape(-1).to(idx.device)
            m = m.float()
            counts = torch.zeros(self.num_experts, dtype=torch.float32, device=idx.device)
            counts.scatter_add_(0, idx.reshape(-1).long(), m.repeat_interleave(idx.shape[1]).to(counts.dtype))
            ent = (entropy_of(probs.float()) * m.to(probs.device)).sum()
            tokens = m.sum()
            if self.counts is None:
                self.counts, self.entropy, self.tokens = counts, ent, tokens
            else:
                self.counts, self.entropy, self.tokens = self.counts + counts, self.entropy + ent, self.tokens + tokens

    def result(self) -> dict:
        if self.counts is None:
            return load_stats([0.0] * self.num_experts, 0.0, 0.0, self.top_k)
        return load_stats(self.counts.tolist(), float(self.entropy), float(self.tokens), self.top_k)


class RouterRecorder:
    """Hooks the routers of every MoE layer of ``model`` and accumulates their load (see the module docstring).

    Use as a context manager (or :meth:`attach` / :meth:`remove`); :meth:`stats` returns the per-layer statistics
    and :meth:`reset` starts a new window. ``training_only``: record only forward passes in training mode with
    gradients enabled (for the Trainer callback). The attention mask passed to ``model`` as a keyword excludes
    padding tokens.
    """

    def __init__(self, model: nn.Module, training_only: bool = False) -> None:
        self.model = model
        self.training_only = training_only
        self.kind = model_kind(model)
        self._mask: torch.Tensor | None = None
        self._handles: list = []
        self._acc: dict[str, _Accumulator] = {}

    # ------------------------------------------------------------------ hooks
    def attach(self) -> RouterRecorder:
        if self._handles:
            return self
        self._handles.append(self.model.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
        if self.kind == "ders":
            for name, layer in ders_layers(self.model).items():
                self._handles.append(layer.register_forward_pre_hook(self._ders_hook(name)))
        else:
            for name, info in moe_blocks(self.model).items():
                self._handles.append(info.router.register_forward_hook(self._moe_hook(name, info)))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> RouterRecorder:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _capture_mask(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _token_mask(self, num_tokens: int) -> torch.Tensor | None:
        mask = self._mask
        return mask.reshape(-1) if mask is not None and mask.numel() == num_tokens else None

    def _skip(self, module: nn.Module) -> bool:
        return self.training_only and not (module.training and torch.is_grad_enabled())

    def _ders_hook(self, name: str):
        def hook(layer, args):
            if self._skip(layer) or layer.disable_adapters or not args:
                return
            adapter = layer._single_active()
            if adapter is None:
                return
            cfg = layer.ders_settings[adapter]
            x = args[0]
            with torch.no_grad():
                logits = layer.ders_router[adapter](x.reshape(-1, x.shape[-1]))[:, : cfg.num_experts]
                probs = torch.softmax(logits.float(), dim=-1)
                idx = torch.topk(probs, cfg.top_k, dim=-1).indices
            acc = self._acc.setdefault(name, _Accumulator(cfg.num_experts, cfg.top_k))
            acc.add(probs, idx, self._token_mask(idx.shape[0]))

        return hook

    def _moe_hook(self, name: str, info):
        def hook(router, args, output):
            if self._skip(router):
                return
            with torch.no_grad():
                if isinstance(output, tuple) and len(output) == 3:
                    logits, idx = output[0], output[2]
                else:  # a router returning only its logits: plain softmax top-k
                    logits = output[0] if isinstance(output, tuple) else output
                    idx = torch.topk(logits.float(), info.top_k, dim=-1).indices
                logits = logits.reshape(-1, info.num_experts).float()
                if info.scoring == "sigmoid":
                    scores = torch.sigmoid(logits)
                    probs = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-30)
                else:
                    probs = torch.softmax(logits, dim=-1)
                idx = idx.reshape(logits.shape[0], -1)
            acc = self._acc.setdefault(name, _Accumulator(info.num_experts, idx.shape[1]))
            acc.add(probs, idx, self._token_mask(idx.shape[0]))

        return hook

    # ------------------------------------------------------------------ results
    def stats(self) -> dict[str, dict]:
        """Per layer: ``tokens``, ``top_k``, ``share``, ``balance``, ``max_over_mean``, ``entropy``,
        ``normalized_entropy`` (host values; one read-back per layer)."""
        return {name: acc.result() for name, acc in self._acc.items()}

    def reset(self) -> None:
        self._acc.clear()


def router_load(
    model: nn.Module, input_ids: torch.Tensor, batch_tokens: int = 1024, attention_mask: torch.Tensor | None = None
) -> dict[str, dict]:
    """Run ``model`` (eval, no grad) on ``input_ids`` ``(T,)`` or ``(B, T)`` and return :meth:`RouterRecorder.stats`.

    A 1-D sequence is cut into windows of at most ``batch_tokens`` tokens (and the model's position limit)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2) or input_ids.numel() == 0:
        raise ValueError("input_ids is invalid: pass a non-empty (T,) or (B, T) tensor of token ids.")
    inner = unwrap(model)
    device = next(inner.parameters()).device
    limit = getattr(getattr(inner, "config", None), "max_position_embeddings", None) or batch_tokens
    window = max(1, min(batch_tokens, int(limit)))
    if input_ids.dim() == 1:
        chunks = [(input_ids[i : i + window].unsqueeze(0), None) for i in range(0, input_ids.numel(), window)]
    else:
        chunks = [(input_ids, attention_mask)]
    was_training = model.training
    model.eval()
    try:
        with RouterRecorder(model) as rec, torch.no_grad():
            for ids, mask in chunks:
                kwargs = {} if mask is None else {"attention_mask": mask.to(device)}
                model(input_ids=ids.to(device), **kwargs)
            return rec.stats()
    finally:
        model.train(was_training)
