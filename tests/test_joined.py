"""`ders_peft.joined.joined_product`: ``x @ cat(weights).t()`` without a joined copy of the weights."""

from __future__ import annotations

import pytest
import torch
from conftest import FP32_TOL, assert_close_bf16

from ders_peft.joined import joined_product


def _operands(device, widths=(48, 48), dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 24, generator=gen).to(device, dtype).requires_grad_()
    ws = [torch.randn(w, 24, generator=gen).to(device, dtype).requires_grad_() for w in widths]
    return x, ws


@pytest.mark.parametrize("widths", [(48, 48), (16, 40, 8), (32,)])
def test_joined_product_matches_the_matmul_with_joined_weights(device, widths):
    x, ws = _operands(device, widths)
    got = joined_product(x, ws)
    grad = torch.randn_like(got)
    got.backward(grad)
    got_grads = [x.grad, *(w.grad for w in ws)]
    for t in (x, *ws):
        t.grad = None
    want = x @ torch.cat(ws).t()
    want.backward(grad)
    torch.testing.assert_close(got, want, **FP32_TOL)
    for g, t in zip(got_grads, (x, *ws), strict=True):
        torch.testing.assert_close(g, t.grad, **FP32_TOL)


def test_joined_product_skips_gradients_nobody_needs(device):
    x, ws = _operands(device)
    ws[0].requires_grad_(False)
    x.requires_grad_(False)
    joined_product(x, ws).sum().backward()
    assert ws[0].grad is None and x.grad is None
    torch.testing.assert_close(ws[1].grad, x.sum(0).expand_as(ws[1]), **FP32_TOL)


def test_joined_product_saves_the_weights_not_a_joined_copy():
    x, ws = _operands("cpu")
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        joined_product(x, ws)
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    assert ptrs == {t.untyped_storage().data_ptr() for t in (x, *ws)}


def test_joined_product_under_autocast_and_in_bf16(device):
    x, ws = _operands(device)
    want = x @ torch.cat(ws).t()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = joined_product(x, ws)
    assert got.dtype == torch.bfloat16
    assert_close_bf16(got, want)
    xb, wb = x.detach().bfloat16(), [w.detach().bfloat16() for w in ws]
    assert_close_bf16(joined_product(xb, wb), want)
    with pytest.raises(TypeError, match="float32"):
        joined_product(x, wb)
