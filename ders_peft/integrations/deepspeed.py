"""DeepSpeed ZeRO-3 support, without importing DeepSpeed unless the model's parameters are partitioned.

Under ZeRO-3 (``deepspeed.zero.Init``, or transformers' ``from_pretrained`` with a ZeRO-3 config) every parameter
holds only its shard (``param.data`` is empty; the full shape is ``param.ds_shape``). Injection reads the dense FFN
block's weights (shapes, the trainable base copy, the ``full`` experts' initial weights, the biases):
:func:`gathered` brings the full weights of one block for that time (``deepspeed.zero.GatheredParameters``, read
only), so peak memory grows by one FFN block, not the model.

In training, a :class:`~ders_peft.layer.DeRSLayer` is a ZeRO-3 *leaf module* (``_z3_leaf``, what
``deepspeed.utils.set_z3_leaf_modules`` sets, as for transformers' MoE blocks): its forward reads its children's
weights (routers, delta factors, base copy, the dense block) directly, without calling their ``forward`` where
ZeRO-3 would gather them, so DeepSpeed gathers all of the layer's parameters when the layer's forward starts.

ZeRO-3 reduces a leaf module's gradients in a full backward hook, which fires once the gradient of the module's input
is computed; when the input needs no gradient (the first upcycled block of a peft model whose attention and
embeddings are frozen) it fires as soon as the output's gradient arrives, before the layer's own parameter gradients
exist, and their later accumulation meets an already-reduced (empty) gradient. :func:`zero3_input_needs_grad` (a
forward pre-hook of every DeRS layer, registered only where DeepSpeed is installed: a hook makes every module call
take torch's slower path) makes such an input require a gradient while the layer's parameters are partitioned and
autograd is on; it changes no value, and costs the input's gradient in that block only.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Iterator

import torch
from torch import nn


def partitioned_params(module: nn.Module) -> list[nn.Parameter]:
    """Parameters of ``module`` that ZeRO-3 has partitioned (they carry ``ds_id``)."""
    return [p for p in module.parameters() if hasattr(p, "ds_id")]


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Inside the block, ``module``'s ZeRO-3 partitioned parameters hold their full values (read only: changes are
    not written back). A no-op (DeepSpeed not imported) when nothing is partitioned."""
    params = partitioned_params(module)
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


@functools.cache
def deepspeed_installed() -> bool:
    """Whether DeepSpeed can be imported here (looked up once, without importing it)."""
    return importlib.util.find_spec("deepspeed") is not None


def zero3_input_needs_grad(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: under ZeRO-3 (``module``'s parameters carry ``ds_id``) in a grad-enabled forward, return
    ``args`` with a first tensor that requires grad (a detached alias of the input: same values, no copy); otherwise
    None (inputs unchanged). See the module docstring for why."""
    if not args or not torch.is_grad_enabled():
        return None
    x = args[0]
    if not isinstance(x, torch.Tensor) or x.requires_grad or not x.is_floating_point():
        return None
    if not hasattr(next(module.parameters(), None), "ds_id"):  # ZeRO-3 partitions every parameter
        return None
    return (x.detach().requires_grad_(), *args[1:])
