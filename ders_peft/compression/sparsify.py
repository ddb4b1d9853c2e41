"""Sparsifiers of per-expert deltas ``(E, out, in)`` into the sparse DeRS format: per expert, ``nnz`` kept values and
their flat int32 positions (sorted), ``nnz = max(1, round(out * in * (1 - drop_rate)))`` as in ``SparseDelta``."""

from __future__ import annotations

import torch

from ..deltas import Delta, SparseDelta


def kept_count(numel: int, drop_rate: float) -> int:
    """Entries kept per expert matrix (the same rule as :class:`ders_peft.deltas.SparseDelta`)."""
    return max(1, round(numel * (1.0 - drop_rate)))


def dare(delta: torch.Tensor, drop_rate: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """DARE (drop and rescale): per expert keep ``nnz`` entries chosen uniformly without replacement and multiply
    them by ``numel / nnz``.

    Each entry is kept with probability exactly ``nnz / numel`` (= ``1 - drop_rate`` up to rounding) and rescaled by
    its inverse, so the expectation of the sparsified delta is ``Delta`` (unbiased). A fixed count (instead of an
    independent Bernoulli draw per entry) gives every expert the same storage and the existing sparse format.
    Returns ``(values (E, nnz), indices (E, nnz) int32)``.
    """
    num_experts, numel = delta.shape[0], delta[0].numel()
    nnz = kept_count(numel, drop_rate)
    flat = delta.reshape(num_experts, numel)
    idx = torch.stack([torch.randperm(numel, generator=generator)[:nnz].sort().values for _ in range(num_experts)])
    values = flat.gather(1, idx) * (numel / nnz)
    return values, idx.to(torch.int32)


def magnitude(delta: torch.Tensor, drop_rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``nnz`` entries of largest ``|Delta|`` of each expert's matrix, unscaled (biased: small entries are
    dropped, not compensated). Returns ``(values (E, nnz), indices (E, nnz) int32)``."""
    num_experts, numel = delta.shape[0], delta[0].numel()
    nnz = kept_count(numel, drop_rate)
    flat = delta.reshape(num_experts, numel)
    idx = flat.abs().topk(nnz, dim=1, sorted=False).indices.sort(dim=1).values
    return flat.gather(1, idx), idx.to(torch.int32)


def sparsify_into(target: Delta, delta: torch.Tensor, config, generator: torch.Generator) -> None:
    """Write ``delta`` ``(E, out, in)`` sparsified by ``config.method`` (``"dare"``/``"magnitude"``) into the
    :class:`SparseDelta` ``target`` (values divided by its output scale, so it computes exactly that)."""
    if not isinstance(target, SparseDelta):
        raise TypeError(f"{config.method} writes a SparseDelta, got {type(target).__name__}")
    if config.method == "dare":
        values, indices = dare(delta, config.drop_rate, generator)
    else:
        values, indices = magnitude(delta, config.drop_rate)
    if values.shape != target.weight.shape:
        shapes = f"{tuple(values.shape)} entries, the layer holds {tuple(target.weight.shape)}"
        raise RuntimeError(f"sparsifier kept {shapes}")
    with torch.no_grad():
        target.weight.copy_(values / target.scale)
        target.indices.copy_(indices)
