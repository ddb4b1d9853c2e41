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
(:func:`check_adapter_checkpoint`) instead of loading half of it. Local adapter directories are checked before peft
reads them (:func:`check_adapter_dir`: a corrupt or non-object ``adapter_config.json`` or one without ``peft_type``,
for any PEFT method; a missing or truncated DeRS weight file), each error naming the file.
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
    _install_loading_checks()
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
    from .atomic import atomic_write_text

    atomic_write_text(readme_path, str(card))


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

    Catches tensors of the wrong shape (the checkpoint was made with other DeRS settings or another base model), DeRS
    layers the checkpoint has no weights for and DeRS tensors for layers the model does not have (another block count
    or layer selection: peft would otherwise only warn, or drop them silently), and sparse indices outside their
    matrix.
    """
    expected = expected_adapter_shapes(model, adapter_name)
    wrong = [
        f"{key}: checkpoint {tuple(value.shape)}, model {expected[key]}"
        for key, value in state_dict.items()
        if key in expected and tuple(value.shape) != expected[key]
    ]
    missing = [key for key in expected if key not in state_dict]
    containers = tuple(f".{c}." for c in ("ders_router", "ders_base", "ders_delta", "ders_bias"))
    unexpected = [key for key in state_dict if key not in expected and any(c in key for c in containers)]
    if wrong or missing or unexpected:
        settings = ", ".join(
            f"{f}={getattr(config, f, None)!r}"
            for f in ("num_experts", "delta_type", "rank", "sparse_rate", "shared_expert", "train_base")
        )
        problems = [
            *(f"shape mismatch: {w}" for w in wrong[:5]),
            *(f"missing from the checkpoint: {m}" for m in missing[:5]),
            *(f"no such DeRS layer in the model: {u}" for u in unexpected[:5]),
        ]
        more = len(wrong) + len(missing) + len(unexpected) - len(problems)
        raise ValueError(
            f"The DeRS checkpoint of adapter {adapter_name!r} does not fit this model ({len(wrong)} tensors of the "
            f"wrong shape, {len(missing)} missing, {len(unexpected)} for layers the model does not have):\n  "
            + "\n  ".join(problems)
            + (f"\n  ... and {more} more" if more > 0 else "")
            + f"\nThe adapter was built with {settings}; load it on the same base architecture and size it was "
            "saved from (hidden and intermediate sizes, number of blocks), and do not edit these settings, "
            "target_modules or layers_to_transform in adapter_config.json."
        )
    _check_sparse_indices(model, state_dict, adapter_name)


def _check_sparse_indices(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str) -> None:
    from .layer import DeRSLayer

    for name, layer in model.named_modules():
        if not isinstance(layer, DeRSLayer) or adapter_name not in layer.ders_delta:
            continue
        for sub, delta in layer.ders_delta[adapter_name].named_modules():
            key = f"{name}.ders_delta.{adapter_name}.{sub}.indices"
            if "indices" not in delta._buffers or key not in state_dict:
                continue
            idx, numel = state_dict[key], delta.out_features * delta.in_features
            if idx.is_floating_point() or idx.is_complex():
                raise ValueError(f"The DeRS checkpoint is corrupt: {key} holds {idx.dtype} values, not indices.")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                raise ValueError(
                    f"The DeRS checkpoint is corrupt: {key} has an index out of range (min {int(idx.min())}, max "
                    f"{int(idx.max())}); indices of a {delta.out_features}x{delta.in_features} matrix must be in "
                    f"[0, {numel - 1}]."
                )


# ---------------------------------------------------------------------------------------------------- file checks
CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class AdapterFileError(ValueError):
    """A local adapter directory whose files are missing or corrupt (the message names the file)."""


def check_safetensors(path: str) -> None:
    """``AdapterFileError`` naming ``path`` if it is not a complete safetensors file (truncated, random bytes)."""
    import json

    size = os.path.getsize(path)

    def bad(why: str) -> AdapterFileError:
        return AdapterFileError(f"{path!r} is corrupt or truncated: {why}. Save or copy the file again.")

    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise bad(f"it has {size} bytes, fewer than a safetensors header")
        length = int.from_bytes(head, "little")
        if not 2 <= length <= size - 8:
            raise bad(f"its header claims {length} bytes but the file has {size}")
        try:
            header = json.loads(fh.read(length))
        except (UnicodeDecodeError, ValueError) as err:
            raise bad(f"its header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    data = size - 8 - length
    if max(ends, default=0) != data:
        raise bad(f"its tensors need {max(ends, default=0)} bytes of data but {data} are there")


def check_adapter_dir(model_id, subfolder: str | None = None) -> None:
    """Check a local adapter directory before peft reads it: its config must be a JSON object with a ``peft_type``
    and, for a DeRS adapter, its weight file must exist and be a complete safetensors file. Hub ids pass through."""
    path = os.path.join(str(model_id), subfolder) if subfolder else str(model_id)
    if not _local_dir(path):
        return
    config_file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_file):
        raise AdapterFileError(
            f"{path!r} has no {CONFIG_FILE}: it is not a saved adapter directory (model.save_pretrained(dir) writes "
            f"{CONFIG_FILE} and {WEIGHT_FILES[0]})."
        )
    from peft.config import PeftConfigMixin

    peft_type = _peft_type_of(PeftConfigMixin.from_json_file(config_file), config_file)
    if peft_type != PEFT_TYPE_DERS.value:
        return
    weights = [os.path.join(path, name) for name in WEIGHT_FILES if os.path.isfile(os.path.join(path, name))]
    if not weights:
        raise AdapterFileError(
            f"{os.path.join(path, WEIGHT_FILES[0])!r} is missing: {path!r} has the adapter's config but not its "
            "weights; copy adapter_model.safetensors from where the adapter was saved (nothing is fetched from the "
            "Hub for a local directory)."
        )
    if weights[0].endswith(".safetensors"):
        check_safetensors(weights[0])


def _local_dir(path: str) -> bool:
    """A directory here that cannot be meant as a Hub repo id (a path with ``.`` or ``/``, or with adapter files)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not os.path.isdir(path):
        return False
    if any(os.path.isfile(os.path.join(path, name)) for name in (CONFIG_FILE, *WEIGHT_FILES)):
        return True
    try:
        validate_repo_id(path)
    except HFValidationError:
        return True
    return path.startswith((".", os.sep))


def _peft_type_of(attributes: dict, config_file: str) -> str:
    value = attributes.get("peft_type")
    if not isinstance(value, str) or value not in PeftType.__members__:
        allowed = sorted(PeftType.__members__)
        what = "has no 'peft_type'" if value is None else f"has peft_type={value!r}, which is unknown"
        raise AdapterFileError(
            f"{config_file!r} {what}: it must name the PEFT method, one of {allowed} ('DERS' for a DeRS adapter)."
        )
    return value


def _install_loading_checks() -> None:
    """Wrap peft's config reading (a corrupt or non-object adapter_config.json, or one without ``peft_type``, gets a
    ``ValueError`` naming the file instead of a bare ``JSONDecodeError`` / ``KeyError``) and the adapter loaders of
    peft and transformers (:func:`check_adapter_dir` first). Idempotent; valid adapters of any method load as
    before."""
    import json

    from peft import PeftModel
    from peft.config import PeftConfigMixin

    read = PeftConfigMixin.from_json_file.__func__
    if getattr(read, "_ders_hook", False):
        return

    @functools.wraps(read)
    def from_json_file(cls, path_json_file, **kwargs):
        try:
            loaded = read(cls, path_json_file, **kwargs)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise AdapterFileError(f"{str(path_json_file)!r} is not valid JSON ({err}); save it again.") from err
        if not isinstance(loaded, dict):
            raise AdapterFileError(
                f"{str(path_json_file)!r} holds a JSON {type(loaded).__name__}, not an object of adapter settings; "
                "save the adapter again."
            )
        return loaded

    from_json_file._ders_hook = True
    PeftConfigMixin.from_json_file = classmethod(from_json_file)

    get_type = PeftConfigMixin._get_peft_type.__func__

    @functools.wraps(get_type)
    def _get_peft_type(cls, model_id, **kwargs):
        path = os.path.join(str(model_id), kwargs["subfolder"]) if kwargs.get("subfolder") else str(model_id)
        config_file = os.path.join(path, CONFIG_FILE)
        if os.path.isfile(config_file):
            return _peft_type_of(cls.from_json_file(config_file), config_file)
        check_adapter_dir(path)  # a local directory without adapter_config.json: say so (no Hub look-up)
        return get_type(cls, model_id, **kwargs)

    PeftConfigMixin._get_peft_type = classmethod(_get_peft_type)

    def checked(load, id_name: str):
        @functools.wraps(load)
        def load_adapter(self, *args, **kwargs):
            model_id = kwargs.get(id_name, args[0] if args else None)
            if model_id is not None:
                sub = kwargs.get("subfolder") or (kwargs.get("adapter_kwargs") or {}).get("subfolder")
                check_adapter_dir(model_id, sub)
            return load(self, *args, **kwargs)

        return load_adapter

    PeftModel.load_adapter = checked(PeftModel.load_adapter, "model_id")
    try:
        from transformers.integrations.peft import PeftAdapterMixin
    except ImportError:  # pragma: no cover - transformers without its peft integration
        return
    PeftAdapterMixin.load_adapter = checked(PeftAdapterMixin.load_adapter, "peft_model_id")
