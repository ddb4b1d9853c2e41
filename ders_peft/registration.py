"""Register DeRS with peft: a new ``PeftType.DERS`` member, the tuner/config mapping, the adapter's model card and
the checkpoint check on load.

peft has no plugin hook, so the ``PeftType`` enum is extended in place at import time. Every step is idempotent:
importing ``ders_peft`` twice (or reloading it) leaves one registration.

Loading a DeRS adapter in a process that never ran ``import ders_peft`` cannot be intercepted by this package (none
of its code runs): ``PeftConfig.from_pretrained``, ``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM`` and
transformers' ``load_adapter`` / ``AutoModelForCausalLM.from_pretrained(<adapter dir>)`` all stop with peft's bare
``KeyError: 'DERS'``. What the package does influence: every adapter it saves carries a ``README.md`` model card
whose first section says to ``import ders_peft`` before loading (:func:`add_loading_note`), and a checkpoint whose
DeRS tensors do not fit the model (other settings or another base model) stops with a ``ValueError`` that says so
(:func:`check_adapter_checkpoint`) instead of loading half of it.
"""

from __future__ import annotations

import functools
import os

import torch
from peft.utils import PeftType

NAME = "ders"
PREFIX = "ders_"
CARD_TAG = "ders"
CARD_HEADING = "## Loading this DeRS adapter"


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

    _install_model_card_hook()
    if PEFT_TYPE_DERS in PEFT_TYPE_TO_CONFIG_MAPPING:
        # a re-import (e.g. importlib.reload): point the mappings at the current classes
        PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE_DERS] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE_DERS] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE_DERS] = PREFIX
        return
    register_peft_method(name=NAME, config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)


# ---------------------------------------------------------------------------------------------------- model card
def loading_note(base_model: str | None) -> str:
    """Markdown section telling a reader how to load a DeRS adapter."""
    base = base_model or "<the dense base model>"
    return (
        f"{CARD_HEADING}\n\n"
        "This is a DeRS Mixture-of-Experts adapter (arXiv 2503.01359) made with the `ders_peft` peft plugin. "
        "peft does "
        "not know the `DERS` method by itself: run `import ders_peft` before loading, otherwise peft stops with "
        "`KeyError: 'DERS'`.\n\n"
        "```python\n"
        "import ders_peft  # registers PeftType.DERS with peft\n"
        "from peft import AutoPeftModelForCausalLM\n\n"
        'model = AutoPeftModelForCausalLM.from_pretrained("<this adapter directory>")\n'
        "```\n\n"
        f"Base model: `{base}`.\n"
    )


def add_loading_note(readme_path: str, base_model: str | None) -> None:
    """Add the ``ders`` tag and the loading section to the model card at ``readme_path`` (once)."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(readme_path)
    tags = list(card.data.tags or [])
    if CARD_TAG not in tags:
        card.data.tags = sorted({*tags, CARD_TAG})
    if CARD_HEADING not in card.text:
        lines = card.text.splitlines()
        at = next((i for i, line in enumerate(lines) if line.startswith("# ")), -1) + 1
        card.text = "\n".join([*lines[:at], "", loading_note(base_model), *lines[at:]])
    card.save(readme_path)


def _install_model_card_hook() -> None:
    """Wrap ``PeftModel.create_or_update_model_card`` (called by ``save_pretrained``) and the upload step of
    ``push_to_hub`` so that the README of a model holding a DeRS adapter says how to load it. Idempotent; other PEFT
    methods are untouched."""
    from peft import PeftModel

    current = PeftModel.create_or_update_model_card
    if getattr(current, "_ders_hook", False):
        return

    @functools.wraps(current)
    def create_or_update_model_card(self, output_dir: str) -> None:
        current(self, output_dir)
        configs = [c for c in self.peft_config.values() if c.peft_type == PEFT_TYPE_DERS]
        readme = os.path.join(output_dir, "README.md")
        if configs and os.path.exists(readme):
            base = configs[0].base_model_name_or_path or getattr(self.get_base_model(), "name_or_path", None)
            add_loading_note(readme, base)

    create_or_update_model_card._ders_hook = True
    PeftModel.create_or_update_model_card = create_or_update_model_card

    # ``push_to_hub`` saves into a temporary folder, then overwrites its README with the Hub's card (on a new repo,
    # transformers' template: library_name transformers, no tags) before uploading: update that card again.
    upload = PeftModel._upload_modified_files

    @functools.wraps(upload)
    def _upload_modified_files(self, working_dir, *args, **kwargs):
        if any(c.peft_type == PEFT_TYPE_DERS for c in self.peft_config.values()):
            self.create_or_update_model_card(working_dir)
        return upload(self, working_dir, *args, **kwargs)

    PeftModel._upload_modified_files = _upload_modified_files


# ---------------------------------------------------------------------------------------------------- loading check
def expected_adapter_shapes(model: torch.nn.Module, adapter_name: str) -> dict[str, tuple[int, ...]]:
    """Model state-dict key -> shape of every tensor the DeRS layers hold for ``adapter_name``."""
    from .layer import DeRSLayer

    shapes = {}
    for name, module in model.named_modules():
        if not isinstance(module, DeRSLayer):
            continue
        for container in module.adapter_layer_names:
            holder = getattr(module, container)
            if adapter_name in holder:
                for key, tensor in holder[adapter_name].state_dict().items():
                    shapes[f"{name}.{container}.{adapter_name}.{key}"] = tuple(tensor.shape)
    return shapes


def check_adapter_checkpoint(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str, config
) -> None:
    """Raise ``ValueError`` if a (key-remapped) DeRS checkpoint does not fit the DeRS layers of ``model``.

    Catches tensors of the wrong shape (the checkpoint was made with other DeRS settings or another base model) and
    DeRS layers the checkpoint has no weights for (another block count or layer selection), which peft would
    otherwise only warn about, leaving random routers in place.
    """
    expected = expected_adapter_shapes(model, adapter_name)
    wrong = [
        f"{key}: checkpoint {tuple(value.shape)}, model {expected[key]}"
        for key, value in state_dict.items()
        if key in expected and tuple(value.shape) != expected[key]
    ]
    missing = [key for key in expected if key not in state_dict]
    if not wrong and not missing:
        return
    settings = ", ".join(
        f"{f}={getattr(config, f, None)!r}"
        for f in ("num_experts", "delta_type", "rank", "sparse_rate", "shared_expert", "train_base")
    )
    problems = [
        *(f"shape mismatch: {w}" for w in wrong[:5]),
        *(f"missing from the checkpoint: {m}" for m in missing[:5]),
    ]
    more = len(wrong) + len(missing) - len(problems)
    raise ValueError(
        f"The DeRS checkpoint of adapter {adapter_name!r} does not fit this model ({len(wrong)} tensors of the wrong "
        f"shape, {len(missing)} missing):\n  "
        + "\n  ".join(problems)
        + (f"\n  ... and {more} more" if more > 0 else "")
        + f"\nThe adapter was built with {settings}; load it on the same base architecture and size it was saved "
        "from (hidden and intermediate sizes, number of blocks), and do not edit these settings in "
        "adapter_config.json."
    )
