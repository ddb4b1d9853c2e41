"""k-bit symmetric quantization of weight matrices and packing of the integer codes into bytes (plain torch).

A matrix ``w`` ``(..., out, in)`` is stored as unsigned codes (one per entry, ``bits`` wide) and float32 scales, one
per output row (``group_size=None``) or per group of ``group_size`` consecutive entries of a row (the last group of a
row may be shorter). Entry ``w[r, i]`` decodes to ``level * scale``:

- ``bits >= 2``: mid-rise levels ``q`` in ``{-qmax, -qmax + 1, ..., qmax}``, ``qmax = (2**bits - 1) / 2`` (half
  integers: all ``2**bits`` codes are used, e.g. 2 bits: -1.5, -0.5, 0.5, 1.5), code ``q + qmax``. Measured against
  the mid-tread alternative (``2**bits - 1`` integer levels, zero exact: 2 bits is then ternary) on the trained MoEs of
  ``benchmarks/compression.py``, 2-bit deltas cost +0.62 % / +0.84 % / +0.34 % test perplexity instead of +1.95 % /
  +1.89 % / +0.71 % (one scale per row);
- ``bits == 1``: ``q = +1`` for entries ``>= 0`` (code 1), ``-1`` otherwise (code 0), scale ``mean |w|`` of the
  row/group (the least-squares scale for sign quantization).

:func:`pack` writes the codes of each row as one little-endian bitstream (entry i in bits ``i*bits .. i*bits+bits-1``,
bit j of the stream is bit ``j % 8`` of byte ``j // 8``: what ``numpy.packbits(..., bitorder="little")`` gives), so a
row takes ``ceil(in * bits / 8)`` bytes for every ``bits`` in 1..8 and 16. Codes are ``uint8`` up to 8 bits and
``int32`` at 16 bits (16 bits: the paper's "16-bit" setting as integer levels, for an almost lossless reference).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(17))
"""Clipping factors tried per row/group (``bits >= 2``): scale ``c * absmax / qmax`` for c = 1.0, 0.95, ..., 0.2; the
one with the least squared error is kept (ties: the larger c). Going down to 0.2 rather than 0.5 matters at 2 bits
(256 x 704, scale per row: Gaussian 0.50 -> 0.44 relative error, Student-t(3) 0.75 -> 0.63); a finer grid gains
under 1%."""


BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16)


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits={bits!r} is invalid: allowed values are {BITS}")


def code_dtype(bits: int) -> torch.dtype:
    """dtype of unpacked codes: ``uint8`` up to 8 bits, ``int32`` above."""
    return torch.uint8 if bits <= 8 else torch.int32


def qmax(bits: int) -> float:
    """Largest level magnitude: ``(2**bits - 1) / 2`` (1 for ``bits == 1``, whose levels are -1 and +1)."""
    _check_bits(bits)
    return 1.0 if bits == 1 else (2**bits - 1) / 2


def num_groups(in_features: int, group_size: int | None) -> int:
    """Scales per row: 1 for ``group_size=None``, else ``ceil(in_features / group_size)``."""
    return 1 if group_size is None else -(-in_features // group_size)


def packed_bytes(in_features: int, bits: int) -> int:
    """Bytes of one packed row: ``ceil(in_features * bits / 8)``."""
    return -(-in_features * bits // 8)


def _grouped(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``(..., n)`` -> ``(..., groups, g)``, the last group zero-padded."""
    n = x.shape[-1]
    g = n if group_size is None else min(group_size, n)
    groups = -(-n // g)
    if groups * g != n:
        x = F.pad(x, (0, groups * g - n))
    return x.reshape(*x.shape[:-1], groups, g)


def group_sum(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Sum of ``x`` ``(..., in)`` over each row/group: ``(..., groups)`` (e.g. a scale's gradient from ``dW * q``)."""
    return _grouped(x, group_size).sum(-1)


def expand_scales(scales: torch.Tensor, group_size: int | None, in_features: int) -> torch.Tensor:
    """Per-entry scales ``(..., in)`` from ``(..., groups)`` (differentiable)."""
    if group_size is None:
        return scales.expand(*scales.shape[:-1], in_features)
    return scales.repeat_interleave(min(group_size, in_features), dim=-1)[..., :in_features]


def levels(codes: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Signed levels ``q`` of unpacked codes, as ``dtype``."""
    q = codes.to(dtype)
    return q * 2 - 1 if bits == 1 else q - qmax(bits)


def quantize(
    w: torch.Tensor, bits: int, group_size: int | None, clip_search: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (``uint8``; ``int32`` at 16 bits) ``(..., out, in)`` and float32 scales ``(..., out, groups)`` of ``w``
    ``(..., out, in)``.

    ``bits >= 2``: entries take the nearest mid-rise level; each row/group's scale is ``c * absmax / qmax`` with c
    from :data:`CLIP_GRID` minimising its
    squared error (``clip_search=False``: c = 1). All-zero rows/groups get scale 0 (and decode to 0).
    """
    m = qmax(bits)
    n = w.shape[-1]
    x = _grouped(w.detach().float(), group_size)  # (..., out, G, g)
    if bits == 1:
        g = x.shape[-1]
        counts = torch.full((x.shape[-2],), float(g), device=x.device)
        counts[-1] = n - (x.shape[-2] - 1) * g
        scales = x.abs().sum(-1) / counts
        codes = x >= 0
    else:
        absmax = x.abs().amax(-1)
        valid = _grouped(torch.ones(n, device=x.device), group_size)  # the last group's zero padding has no error
        best_err = best_q = scales = None
        for c in CLIP_GRID if clip_search else (1.0,):
            s = absmax * c / m
            q = (x / torch.where(s > 0, s, 1.0).unsqueeze(-1)).floor_().add_(0.5).clamp_(-m, m)  # mid-rise
            err = (q * s.unsqueeze(-1) - x).square_().mul_(valid).sum(-1)
            if best_err is None:
                best_err, best_q, scales = err, q, s
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_q = torch.where(better.unsqueeze(-1), q, best_q)
            scales = torch.where(better, s, scales)
        codes = best_q + m
    codes = codes.to(code_dtype(bits)).flatten(-2)[..., :n]
    return codes, scales


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int | None, in_features: int
) -> torch.Tensor:
    """``(..., out, in)`` matrix (in ``scales``' dtype, float32 as stored) of unpacked codes and their scales."""
    return levels(codes, bits, scales.dtype) * expand_scales(scales, group_size, in_features)


def _layout(bits: int) -> tuple[int, int, torch.dtype]:
    """Entries and bytes per aligned chunk of the bitstream (8 entries of 3 bits = 3 bytes, ...) and an integer type
    holding one chunk."""
    _check_bits(bits)
    common = math.gcd(8, bits)
    entries, nbytes = 8 // common, bits // common
    return entries, nbytes, torch.int32 if 8 * nbytes < 32 else torch.int64


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``(..., in)`` (each below ``2**bits``) into ``uint8`` ``(..., ceil(in * bits / 8))``."""
    entries, nbytes, itype = _layout(bits)
    n = codes.shape[-1]
    c = codes.to(itype)
    pad = -n % entries
    if pad:
        c = F.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], -1, entries)
    shifts = torch.arange(entries, device=c.device, dtype=itype) * bits
    chunk = (c << shifts).sum(-1, dtype=itype)  # disjoint bit fields: the sum is their bitwise or
    out = (chunk.unsqueeze(-1) >> (torch.arange(nbytes, device=c.device, dtype=itype) * 8)) & 255
    return out.flatten(-2)[..., : packed_bytes(n, bits)].to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Codes ``(..., in_features)`` (:func:`code_dtype`) of rows packed by :func:`pack`."""
    entries, nbytes, itype = _layout(bits)
    chunks = -(-in_features // entries)
    b = packed.to(itype)
    pad = chunks * nbytes - b.shape[-1]
    if pad:
        b = F.pad(b, (0, pad))
    b = b.reshape(*b.shape[:-1], chunks, nbytes)
    chunk = (b << (torch.arange(nbytes, device=b.device, dtype=itype) * 8)).sum(-1, dtype=itype)
    shifts = torch.arange(entries, device=b.device, dtype=itype) * bits
    codes = (chunk.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.flatten(-2)[..., :in_features].to(code_dtype(bits))
