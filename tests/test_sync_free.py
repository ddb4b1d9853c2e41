"""No host synchronisation on the training hot path: a counting mode sees every op that makes the host wait for the
device (``.item()``, ``.tolist()``, ``bool(t)``, ``.cpu()``, ``_local_scalar_dense``) or whose output shape depends on
tensor values (``nonzero``, ``masked_select``, ``unique``, boolean indexing...), during training forward + backward.

On CPU nothing waits, but the same calls are made: counting them here is what makes a CUDA run asynchronous.

Stated exception: the paths grouped by expert (sparse, quantized, wide or biased low-rank deltas; whole experts)
slice the slots of each expert by Python bounds, so they read the per-expert slot counts back once per layer call
(``RoutingPlan.sorted_slots``), shared by forward and backward; nothing else syncs. The low-rank fast path (DeRS-LM)
and everything around the experts (router, router losses and their injection, attention-mask capture) never do.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from ders_testing import ders_layers, randomize_adapter, tiny_model
from peft import get_peft_model
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import ders_peft
from ders_peft import functional, grouped_path

_HOST_METHODS = {"tolist", "item", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}
_ATEN_SYNCS = {
    "_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "unique", "_unique", "_unique2",
    "unique_consecutive", "unique_dim", "bincount", "histc", "masked_scatter", "argwhere",
}  # fmt: skip


def _where() -> str:
    """The innermost ``ders_peft`` frame of the current stack (``''`` if the call does not come from the package)."""
    frames = [f for f in traceback.extract_stack() if "/ders_peft/" in f.filename]
    return f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno} {frames[-1].name}" if frames else ""


class SyncCounter:
    """Context manager recording ``(op, where)`` for every synchronising or data-dependent-shape call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        counter = self

        class _Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = getattr(func, "__name__", "")
                to_host = name == "to" and any(_is_cpu(a) for a in (*args[1:], kwargs.get("device")))
                if name in _HOST_METHODS or to_host:
                    counter.calls.append((name, _where()))
                return func(*args, **kwargs)

        class _Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                bool_index = name in ("index", "index_put", "index_put_") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in _flat(args[1])
                )
                if name in _ATEN_SYNCS or bool_index or (name == "repeat_interleave" and "Tensor" in str(func)):
                    counter.calls.append((f"aten.{name}", _where()))
                return func(*args, **(kwargs or {}))

        self._modes = (_Functions(), _Ops())

    def __enter__(self) -> SyncCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def ours(self) -> list[tuple[str, str]]:
        """The calls made from ``ders_peft`` code."""
        return [c for c in self.calls if c[1]]


def _is_cpu(a) -> bool:
    return (isinstance(a, str) and a.startswith("cpu")) or (isinstance(a, torch.device) and a.type == "cpu")


def _flat(indices):
    return indices if isinstance(indices, list | tuple) else [indices]


def _layer(delta_type: str, family: str = "llama", **kw):
    settings = {"num_experts": 4, "top_k": 2, "rank": 2, "sparse_rate": 0.9, "router_z_loss_coef": 0.01, **kw}
    model = get_peft_model(tiny_model(family), ders_peft.DeRSConfig(delta_type=delta_type, **settings))
    randomize_adapter(model, std=0.1)
    model.train()
    return model, ders_layers(model)[0]


# (delta_type, (GATHER_DENSITY, DENSE_DENSITY), config kwargs, host syncs per layer call)
CASES = {
    "lowrank-fast": ("lowrank", None, {}, 0),
    "lowrank-fast-shared": ("lowrank", None, {"shared_expert": True}, 0),
    "lowrank-grouped": ("lowrank", None, {"num_experts": 40}, 1),  # 40 x 2 stacked columns > 64: grouped
    "sparse-gather": ("sparse", (1.0, 1.0), {}, 1),
    "sparse-csr": ("sparse", (0.0, 1.0), {}, 1),
    "sparse-dense": ("sparse", (0.0, 0.0), {}, 1),
    "full": ("full", None, {}, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layer_training_step_syncs(case, device, monkeypatch):
    """One DeRS layer, forward + backward with both router losses injected: every synchronising call is counted,
    and there are exactly the stated number per layer call (0 on the low-rank fast path, else the slot counts)."""
    delta_type, density, kw, expected = CASES[case]
    if density is not None:
        monkeypatch.setattr(grouped_path, "GATHER_DENSITY", density[0])
        monkeypatch.setattr(grouped_path, "DENSE_DENSITY", density[1])
    model, layer = _layer(delta_type, **kw)
    model.to(device)
    paths = []
    real_fast, real_grouped = functional.lowrank_routed_ffn, functional.grouped_routed_ffn
    monkeypatch.setattr(functional, "lowrank_routed_ffn", lambda *a: paths.append("fast") or real_fast(*a))
    monkeypatch.setattr(functional, "grouped_routed_ffn", lambda *a: paths.append("grouped") or real_grouped(*a))
    x = torch.randn(2, 19, 32).to(device).requires_grad_()
    model.base_model.runtime.attention_mask = torch.ones(2, 19, dtype=torch.long, device=device)
    layer(x).sum().backward()  # warm-up: CSR layouts and index positions are built once per index buffer
    x.grad = None
    with SyncCounter() as counter:
        y = layer(x)
        (y.square().sum()).backward()
    assert x.grad is not None and layer.ders_router["default"].weight.grad is not None
    want_path = {"lowrank-fast": "fast", "lowrank-fast-shared": "fast", "full": None}.get(case, "grouped")
    assert paths[-1:] == ([want_path] if want_path else []), paths
    assert len(counter.calls) == expected, counter.calls
    assert all(where.endswith("sorted_slots") for _, where in counter.calls), counter.calls


@pytest.mark.parametrize("delta_type,per_layer", [("lowrank", 0), ("sparse", 1)])
@pytest.mark.parametrize("layers", [2, 3])
def test_model_training_step_syncs_scale_with_layer_calls(delta_type, per_layer, layers):
    """A whole padded model's training step (mask capture, router losses, injection, loss, backward): the calls made
    from ``ders_peft`` are ``per_layer`` times the number of DeRS layers, all of them the slot counts."""
    cfg = ders_peft.DeRSConfig(
        num_experts=4, top_k=2, delta_type=delta_type, rank=2, sparse_rate=0.9, router_z_loss_coef=0.01
    )
    model = get_peft_model(tiny_model("llama", layers=layers), cfg)
    randomize_adapter(model, std=0.1)
    model.train()
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()  # warm-up (cached index layouts)
    with SyncCounter() as counter:
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    ours = counter.ours()
    assert len(ours) == per_layer * layers, ours
    assert all(where.endswith("sorted_slots") for _, where in ours), ours


def test_counter_sees_every_kind_of_sync():
    """The counter is not blind: each kind of synchronising call it looks for is recorded."""
    t = torch.arange(6.0)
    with SyncCounter() as counter:
        t.sum().item()
        t.tolist()
        bool(t.sum() > 0)
        t.cpu()
        t.to("cpu")
        t.nonzero()
        t[t > 2]
        torch.unique(t)
        torch.bincount(t.long())
        t.repeat_interleave(t.long())
    names = [name for name, _ in counter.calls]
    for want in ("item", "tolist", "__bool__", "cpu", "to", "aten.nonzero", "aten.index", "aten.bincount"):
        assert want in names, (want, names)
    assert any(n.startswith("aten._unique") or n == "aten.unique_dim" for n in names), names
    assert "aten.repeat_interleave" in names, names
