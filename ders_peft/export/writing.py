"""Writing an export: the logit check, the model card, the tokenizer, the engine-compatibility warnings and the
destination (an empty directory or a previous export, replaced atomically)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import atomic
from .compatibility import engine_compatibility, warn_incompatible
from .plan import ExportPlan, _unwrap, plan_export
from .targets import TARGETS
from .weights import _convert

logger = logging.getLogger(__name__)


def model_card(plan: ExportPlan, base_model: str | None, max_abs_logit_diff: float | None = None) -> str:
    """README.md for an exported checkpoint: base model, method and DeRS settings."""
    cfg = plan.settings
    upcycled = list(plan.layers)
    lines = ["---", "library_name: transformers"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines += ["tags:", "- mixture-of-experts", "- ders", "- upcycling", f"- {plan.architecture}", "---", ""]
    lines += [
        f"# {plan.architecture} export of a DeRS-upcycled model",
        "",
        "Mixture-of-Experts model upcycled from a dense model with DeRS (arXiv 2503.01359) using `ders_peft`, then "
        f"exported as a standard `{TARGETS[plan.architecture].model_class}`: each expert's weights"
        " are the synthesised `W_base + Delta_i`, the router and every non-FFN weight are carried over. "
        "Loading it needs only `transformers` (no `ders_peft`).",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base model | {base_model or 'unknown'} |",
        f"| source architecture | {plan.source_type} |",
        "| method | DeRS (shared base + per-expert deltas) |",
        f"| delta type | {cfg.delta_type} |",
        f"| num_experts (N) | {cfg.num_experts} |",
        f"| top_k | {cfg.top_k} |",
        f"| renormalised top-k weights | {cfg.normalize_top_k} |",
        f"| universal (shared) FFN | {cfg.shared_expert} |",
        f"| upcycled blocks | {upcycled} |",
        f"| dense blocks | {sorted(set(range(plan.target_config.num_hidden_layers)) - set(upcycled))} |",
    ]
    if cfg.delta_type == "lowrank":
        lines.append(f"| rank | {cfg.rank} |")
    if cfg.delta_type == "sparse":
        lines.append(f"| sparse_rate | {cfg.sparse_rate} |")
    lines.append(f"| dtype | {str(plan.dtype).replace('torch.', '')} |")
    if max_abs_logit_diff is not None:
        lines.append(f"| max abs logit difference vs the DeRS model (check at export) | {max_abs_logit_diff:.2e} |")
    notes = []
    if TARGETS[plan.architecture].dense_blocks:
        notes.append("Blocks that were not upcycled are dense `mlp_only_layers`.")
    if plan.architecture == "qwen2_moe" and cfg.shared_expert_gate:
        notes.append("The universal FFN is the shared expert behind its learned `shared_expert_gate`.")
    elif plan.architecture == "qwen2_moe":
        notes.append(
            "The universal FFN is the shared expert behind a `shared_expert_gate` of 1e-20 weights (sigmoid = 0.5 "
            "exactly, and finite where an engine computes silu(x)/x); the routed experts' down projections carry the "
            "other 0.5."
            if cfg.shared_expert
            else "There was no universal FFN: the shared expert is a single zero unit and adds exactly 0."
        )
    if plan.architecture == "granitemoeshared" and cfg.shared_expert:
        notes.append(
            "The universal FFN is the shared MLP; its down projection and the routed experts' carry the 0.5 weights "
            "with which DeRS averages the two."
        )
    if notes:
        lines += ["", "Mapping notes: " + " ".join(notes)]
    return "\n".join(lines) + "\n"


_NOTHING = "Nothing was written."


def _verify(model: nn.Module, target: nn.Module, plan: ExportPlan) -> float:
    """Max |logit difference| between the DeRS model and the export on a few random tokens; ``ExportCheckError`` if an
    exported tensor or a logit is not finite, or (fp32) the difference exceeds ``VERIFY_TOLERANCE``."""
    for name, tensor in target.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ExportCheckError(f"export check failed: the exported tensor {name!r} holds NaN or inf. {_NOTHING}")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, plan.target_config.vocab_size, (2, 8), generator=gen)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = model(input_ids=ids).logits.float()
            got = target(input_ids=ids).logits.float()
    finally:
        model.train(was_training)
    diff = float((want - got).abs().max())
    if not math.isfinite(diff):  # NaN compares False with any tolerance: non-finite is a failure in every dtype
        raise ExportCheckError(f"export check failed: the logits are not finite (max difference {diff}). {_NOTHING}")
    if plan.dtype == torch.float32 and diff > VERIFY_TOLERANCE:
        raise ExportCheckError(f"export check failed: logits differ by {diff:.3e} from the DeRS model. {_NOTHING}")
    return diff


def export_moe(
    model: nn.Module,
    out_dir: str | os.PathLike,
    architecture: str | None = None,
    *,
    tokenizer=None,
    base_model: str | None = None,
    verify: bool = True,
) -> Path:
    """Write the DeRS ``model`` as a standard transformers MoE checkpoint (safetensors) plus a model card.

    ``architecture``: one of ``ARCHITECTURES`` or ``None`` to pick the first exact target for the source. The
    destination is checked first (:func:`check_export_dir`), refused configurations raise ``ValueError`` before
    anything is written, and the checkpoint is written with :func:`ders_peft.atomic.write_dir` (a temporary sibling
    swapped into place, with a manifest of its files), so a failed or interrupted export never leaves a half-written
    or lost checkpoint. With ``verify`` every exported tensor must be finite and the export's logits must match the
    DeRS model's on random tokens (within ``VERIFY_TOLERANCE`` for fp32 models; finite for every dtype). An
    :class:`EngineCompatibilityWarning` names each reason a serving engine will not run the export exactly
    (:func:`engine_compatibility`). The tokenizer's ``tokenizer_class`` is written as ``PreTrainedTokenizerFast``
    where transformers 5 writes ``TokenizersBackend`` (the same class, which older readers and llama.cpp's converter
    reject). The check's result is in the model card and logged (INFO, logger ``ders_peft.export.writing``).
    Returns the output path.
    """
    out, _ = check_export_dir(out_dir)
    try:
        plan = plan_export(model, architecture)
        target = _convert(model, plan)
    except ValueError as err:
        raise ValueError(f"{err} Nothing was written to {str(out)!r}.") from err
    diff = _verify(model, target, plan) if verify else None
    if diff is not None:
        logger.info("export check passed: max |logit difference| vs the DeRS model %.2e", diff)
    warn_incompatible(engine_compatibility(target.config, target.state_dict()))
    if base_model is None:
        root = _unwrap(model)
        base_model = getattr(root.config, "_name_or_path", None) or getattr(root, "name_or_path", None) or None

    def fill(tmp: Path) -> None:
        target.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            _portable_tokenizer_class(tmp)
        (tmp / "README.md").write_text(model_card(plan, base_model, diff), encoding="utf-8")

    # the entries to keep are listed again just before the swap: files added during the export are kept too
    return atomic.write_dir(out, fill, owner=EXPORT_OWNER, keep=lambda: check_export_dir(out)[1])


def _portable_tokenizer_class(directory: Path) -> None:
    """``tokenizer_class: TokenizersBackend`` (what transformers 5 writes for a generic fast tokenizer) ->
    ``PreTrainedTokenizerFast``, its alias that transformers 4 and llama.cpp's convert_hf_to_gguf.py read too."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class ExportCheckError(RuntimeError):
    """``export_moe(verify=True)`` found non-finite weights or logits, or logits that differ from the DeRS model's."""


VERIFY_TOLERANCE = 1e-4
"""Largest max |logit difference| ``export_moe(verify=True)`` accepts for an fp32 model (the mappings are exact up to
float rounding: the tests see <= 1e-6 on tiny models; rounding grows with depth and width)."""

EXPORT_OWNER = "ders_peft.export_moe"
# what exports made before the manifest wrote (exact names): such a directory is recognised by ``ders_export`` in
# its config.json, and only these entries of it are replaced
_LEGACY_FILES = re.compile(
    r"config\.json|generation_config\.json|README\.md|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index"
    r"\.json|tokenizer\.json|tokenizer_config\.json|tokenizer\.model|special_tokens_map\.json|added_tokens\.json"
    r"|vocab\.json|vocab\.txt|merges\.txt|chat_template\.(jinja|json)"
)


def _legacy_export(out: Path) -> set[str] | None:
    try:
        previous = "ders_export" in json.loads((out / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        previous = False
    return {p.name for p in out.iterdir() if _LEGACY_FILES.fullmatch(p.name)} if previous else None


def check_export_dir(out_dir: str | os.PathLike, what: str = "out_dir") -> tuple[Path, list[str]]:
    """Check an export destination before any work; returns it and the entries of it to carry over.

    ``out_dir`` may be missing, empty, or a previous ``export_moe`` output: then exactly the files its manifest lists
    are replaced and every other file (the user's notes, a tokenizer model of their own) is kept. Anything else (the
    dense base model's folder, an adapter) is refused with a ``ValueError``, as are destinations that cannot be
    swapped into place (:func:`ders_peft.atomic.check_destination`)."""
    out = atomic.check_destination(out_dir, what)
    for action in atomic.recover(out):
        warnings.warn(action, stacklevel=3)
    if not out.exists() or not any(out.iterdir()):
        return out, []
    owned = atomic.owned_entries(out, EXPORT_OWNER, _legacy_export)
    if owned is None:
        raise ValueError(
            f"{what}={str(out)!r} is invalid: it is not empty and holds no previous ders_peft export (no "
            f"{atomic.MANIFEST}); only an empty directory or a previous export_moe output is replaced. Choose a new "
            "or empty directory. Nothing was written."
        )
    return out, sorted(p.name for p in out.iterdir() if p.name not in owned)
