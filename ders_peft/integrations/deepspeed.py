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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
