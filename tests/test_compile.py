"""``torch.compile`` of a DeRS model's training step (low-rank fast path, grouped sparse path) gives eager's loss and
gradients, and eager matches the naive reference layer by layer (tests/test_layer_reference.py), so compiled
training computes the reference's numbers.

Backend: inductor (it generates C++ on CPU; gcc is there); ``DERS_COMPILE_BACKEND`` overrides it (e.g.
``aot_eager`` where no C compiler exists). Graph breaks are allowed (``fullgraph`` is not required): the routed
layer's hand-written autograd Functions take Python callables and per-expert Python bounds.
"""

from __future__ import annotations

import os

import pytest
import torch
from ders_testing import ders_layers, randomize_adapter, tiny_model
from peft import get_peft_model
from test_layer_reference import reference_layer_output

import ders_peft

BACKEND = os.environ.get("DERS_COMPILE_BACKEND", "inductor")


def _step(model, ids, mask):
    """Loss and the gradient of every trainable parameter (by name) of one training forward + backward."""
    params = {n.replace("_orig_mod.", ""): p for n, p in model.named_parameters() if p.requires_grad}
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    grads = torch.autograd.grad(loss, list(params.values()))
    return loss.detach(), dict(zip(params, grads, strict=True))


@pytest.mark.parametrize("delta_type", ["lowrank", "sparse"])
def test_compiled_training_step_matches_eager(delta_type, device):
    torch._dynamo.reset()
    cfg = ders_peft.DeRSConfig(
        num_experts=4, top_k=2, delta_type=delta_type, rank=2, sparse_rate=0.9, router_z_loss_coef=0.01
    )
    model = get_peft_model(tiny_model("llama", layers=2), cfg)
    randomize_adapter(model, std=0.1)
    model.to(device).train()
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # padding: the router losses exclude it through the captured mask

    # eager equals the naive reference: every DeRS layer replaced by reference_layer_output gives the same logits
    with torch.no_grad():
        eager_logits = model(input_ids=ids, attention_mask=mask).logits
        hooks = [
            layer.register_forward_hook(lambda mod, args, out: reference_layer_output(mod, args[0]))
            for layer in ders_layers(model)
        ]
        ref_logits = model(input_ids=ids, attention_mask=mask).logits
        for h in hooks:
            h.remove()
    torch.testing.assert_close(eager_logits, ref_logits, atol=1e-5, rtol=1e-5)

    loss_eager, g_eager = _step(model, ids, mask)
    compiled = torch.compile(model, backend=BACKEND)
    for _ in range(2):  # the second call reuses the compiled graphs
        loss_compiled, g_compiled = _step(compiled, ids, mask)
        torch.testing.assert_close(loss_compiled, loss_eager, atol=1e-5, rtol=1e-5)
        assert g_compiled.keys() == g_eager.keys()
        for name, g in g_eager.items():
            assert g.abs().max() > 0 or "lora_b" not in name, name
            torch.testing.assert_close(g_compiled[name], g, atol=1e-5, rtol=1e-4, msg=name)
    router_grads = [g for n, g in g_compiled.items() if "ders_router" in n]
    assert router_grads and all(g.abs().max() > 0 for g in router_grads)  # the router losses reached the routers
