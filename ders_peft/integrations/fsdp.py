"""FSDP: what DeRS layers need from the sharding units, and the error when they do not get it.

A DeRS layer reads its routers', delta factors' and base copy's tensors directly, without calling those modules'
``forward`` (where FSDP gathers a unit's parameters), so they must be gathered with a unit around the whole layer:
each decoder layer (TRANSFORMER_BASED_WRAP, FSDP1 with ``use_orig_params=True`` or FSDP2). peft's
``fsdp_auto_wrap_policy``, which transformers' ``Trainer`` sets for a PeftModel under FSDP1, gives every leaf with
a trainable ``.weight`` its own unit instead; the layer then sees shards. docs/distributed.md says what was run.
"""

from __future__ import annotations

from torch import nn

FSDP_UNITS_HINT = (
    "shard whole decoder layers instead: FSDP2 (accelerate `fsdp_version: 2`, TRANSFORMER_BASED_WRAP; "
    "examples/accelerate_fsdp.yaml), or FSDP1 with decoder-layer units and use_orig_params=True (see "
    "docs/distributed.md)"
)


def sharded_units_inside(module: nn.Module) -> list[str]:
    """Names of the FSDP units (FSDP1 wrappers or FSDP2 ``fully_shard`` modules) strictly inside ``module``."""
    return [
        name
        for name, m in module.named_modules()
        if name and (type(m).__name__ == "FullyShardedDataParallel" or type(m).__name__.startswith("FSDP"))
    ]


def explain_sharded_read(layer: nn.Module, err: Exception) -> Exception:
    """The error to raise for ``err``: a ``RuntimeError`` naming the cause and the fix when FSDP units sit inside
    ``layer``, else ``err`` itself."""
    units = sharded_units_inside(layer)
    if not units:
        return err
    shown = ", ".join(units[:3]) + (f" and {len(units) - 3} more" if len(units) > 3 else "")
    return RuntimeError(
        f"DeRS layer {getattr(layer, 'key', '')!r} computed on FSDP-sharded tensors: its submodules {shown} are FSDP "
        "units of their own (peft's fsdp_auto_wrap_policy, which transformers' Trainer sets for a PeftModel under "
        "FSDP1), but the layer reads their weights without calling their forward, where FSDP gathers them; "
        f"{FSDP_UNITS_HINT}. (The original error: {type(err).__name__}: {err})"
    )
