"""Router initialisation from data: spherical k-means of each DeRS layer's input hidden states.

A random router sends tokens to experts by noise, so early in training the experts see statistically identical
token mixes and have no reason to differ. :func:`init_routers_kmeans` sets expert ``e``'s router row to the
(unit-length) centroid of a k-means cluster of the layer's input tokens, scaled: the router's argmax then IS the
k-means assignment from step one, each expert receiving one cluster of similar tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..layer import DeRSLayer


class _Collected(Exception):
    """Raised by the collecting pre-hook: the layers after it need not run."""


def spherical_kmeans(
    x: torch.Tensor, k: int, iters: int = 20, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """k-means on the unit sphere (cosine similarity) of the rows of ``x`` ``(n, d)``, k-means++ seeding.

    Returns unit centroids ``(k, d)``, the assignment ``(n,)`` (``argmax`` of ``unit(x) @ centroids.T``, the rule a
    router with these rows applies) and the number of Lloyd iterations run (stops early when nothing moves). An
    emptied cluster is re-seeded with the point least similar to its own centroid.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k} for {n} points")
    u = F.normalize(x.float(), dim=1)
    # k-means++: squared Euclidean distance on the sphere is 2 (1 - cos)
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [u[first]]
    best_cos = u @ u[first]
    for _ in range(1, k):
        weights = (1 - best_cos).clamp_min(0)
        if float(weights.sum()) <= 0:
            weights = torch.ones_like(weights)
        pick = int(torch.multinomial(weights, 1, generator=generator))
        centroids.append(u[pick])
        best_cos = torch.maximum(best_cos, u @ u[pick])
    c = torch.stack(centroids)
    assign = (u @ c.t()).argmax(1)
    done = 0
    while done < iters:
        done += 1
        sums = torch.zeros_like(c).index_add_(0, assign, u)
        counts = torch.bincount(assign, minlength=k)
        for j in torch.nonzero(counts == 0).flatten().tolist():  # empty: the worst-served point
            own = (u * c[assign]).sum(1)
            far = int(own.argmin())
            sums[j], counts[j] = u[far], 1
            assign[far] = j
        c = F.normalize(sums, dim=1)
        new = (u @ c.t()).argmax(1)
        if torch.equal(new, assign):
            break
        assign = new
    return c, assign, done


def _logit_spread(x: torch.Tensor, weight: torch.Tensor) -> float:
    """Mean over tokens of the standard deviation of the logits across experts."""
    if weight.shape[0] < 2:
        return 0.0
    return float((x @ weight.t()).std(dim=1, unbiased=False).mean())


def _inputs(batch: Mapping | torch.Tensor) -> tuple[dict, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}, None
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError("init_routers_kmeans: each batch must be a tensor of input ids or a mapping with 'input_ids'")
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    return kwargs, batch.get("attention_mask")


def _masked_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    if mask is None:
        return flat
    if mask.numel() != flat.shape[0]:
        raise ValueError(
            f"init_routers_kmeans: attention_mask of shape {tuple(mask.shape)} does not match the layer input of "
            f"shape {tuple(x.shape)}"
        )
    return flat[mask.reshape(-1).to(flat.device).bool()]


@torch.no_grad()
def _collect(model: nn.Module, layer: DeRSLayer, batches: list, max_tokens: int | None) -> torch.Tensor:
    """The attention-masked input tokens of ``layer`` on ``batches`` (the model stops at the layer)."""
    found: list[torch.Tensor] = []
    state = {"mask": None}

    def hook(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        found.append(_masked_tokens(x, state["mask"]).float().cpu())
        raise _Collected

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            kwargs, state["mask"] = _inputs(batch)
            try:
                model(**kwargs, use_cache=False)
            except _Collected:
                pass
            if max_tokens is not None and sum(t.shape[0] for t in found) >= max_tokens:
                break
    finally:
        handle.remove()
    if not found:
        raise ValueError(f"init_routers_kmeans: the DeRS layer {layer.key!r} never ran on the given batches")
    tokens = torch.cat(found)
    return tokens if max_tokens is None else tokens[:max_tokens]


def init_routers_kmeans(
    model: nn.Module,
    batches: Iterable[Mapping | torch.Tensor],
    iters: int = 20,
    seed: int = 0,
    *,
    logit_std: float = 1.0,
    max_tokens: int | None = 65536,
    adapter_name: str | None = None,
) -> dict[str, dict]:
    """Set every DeRS router of ``model`` to scaled k-means centroids of its layer's input hidden states.

    ``batches``: tensors of input ids or mappings with ``input_ids`` (and ``attention_mask``: padded tokens are left
    out). Layers are done in order, each from the inputs the model computes with the routers before it already set
    (so the sample matches what training sees). Per layer, ``k = num_experts`` spherical k-means (k-means++ seeding,
    ``seed``, at most ``iters`` Lloyd steps; at most ``max_tokens`` tokens); router row ``e`` becomes ``s * c_e``
    with ``c_e`` the unit centroid, so token ``x`` goes to the expert of its most similar centroid.

    The scale ``s`` makes the per-token standard deviation of the logits across experts, averaged over the sample,
    equal ``logit_std`` (default 1): softmax weights of experts then differ by factors of order ``e`` (routing is
    decided by the clusters, not by noise) while the softmax stays far from saturation, so its gradient
    ``p (1 - p)`` and the load-balancing loss can still move tokens between experts. The default random router
    (std 0.02) gives a spread of about ``0.02 |x|``, a few tenths for unit-RMS hidden states of width 128: nearly
    uniform weights. The universal FFN's gate row, if any, is left as it is.

    Returns per layer name: tokens used, Lloyd iterations, cluster sizes, mean cosine to the own centroid, the
    scale, the logit spread before (random router) and after, and the share of tokens the router sends to their
    k-means cluster (1.0 up to ties).
    """
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"init_routers_kmeans: iters={iters!r} is invalid: must be an integer >= 1")
    if not logit_std > 0:
        raise ValueError(f"init_routers_kmeans: logit_std={logit_std!r} is invalid: must be > 0")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, DeRSLayer)]
    if not layers:
        raise ValueError("init_routers_kmeans: the model has no DeRS layer (apply a DeRSConfig first)")
    batches = list(batches)
    if not batches:
        raise ValueError("init_routers_kmeans: no batches given")
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    stats: dict[str, dict] = {}
    try:
        for name, layer in layers:
            adapter = adapter_name or layer._single_active()
            if adapter is None or adapter not in layer.ders_router:
                raise ValueError(f"init_routers_kmeans: layer {name!r} has no active DeRS adapter {adapter!r}")
            router = layer.ders_router[adapter]
            k = layer.ders_settings[adapter].num_experts
            x = _collect(model, layer, batches, max_tokens)
            if x.shape[0] < k:
                raise ValueError(
                    f"init_routers_kmeans: layer {name!r} got {x.shape[0]} unmasked tokens, fewer than its {k} "
                    "experts: give more batches"
                )
            before = _logit_spread(x, router.weight[:k].detach().float().cpu())
            centroids, assign, done = spherical_kmeans(x, k, iters, generator)
            spread = _logit_spread(x, centroids)
            scale = logit_std / spread if spread > 0 else 1.0 / float(x.norm(dim=1).mean())
            with torch.no_grad():
                router.weight[:k].copy_((centroids * scale).to(router.weight))
            after = router.weight[:k].detach().float().cpu()
            routed = (x @ after.t()).argmax(1)
            stats[name] = {
                "tokens": x.shape[0],
                "iterations": done,
                "cluster_sizes": torch.bincount(assign, minlength=k).tolist(),
                "mean_cosine": float((F.normalize(x, dim=1) * centroids[assign]).sum(1).mean()),
                "scale": scale,
                "random_logit_std": before,
                "logit_std": _logit_spread(x, after),
                "agreement": float((routed == assign).float().mean()),
            }
    finally:
        model.train(was_training)
    return stats
