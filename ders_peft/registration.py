"""Register DeRS with peft: a new ``PeftType.DERS`` member and the tuner/config mapping.

peft has no plugin hook, so the ``PeftType`` enum is extended in place at import time. Every step is idempotent:
importing ``ders_peft`` twice (or reloading it) leaves one registration.
"""

from __future__ import annotations

from peft.utils import PeftType

NAME = "ders"
PREFIX = "ders_"


def _extend_peft_type(name: str) -> PeftType:
    """Add ``name`` to ``peft.utils.PeftType`` (a ``str`` Enum) unless it is already there."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


PEFT_TYPE_DERS = _extend_peft_type(NAME.upper())


def register(config_cls: type, model_cls: type) -> None:
    """Register the DeRS config and tuner with peft (safe to call more than once)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    if PEFT_TYPE_DERS in PEFT_TYPE_TO_CONFIG_MAPPING:
        # a re-import (e.g. importlib.reload): point the mappings at the current classes
        PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE_DERS] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE_DERS] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE_DERS] = PREFIX
        return
    register_peft_method(name=NAME, config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)
