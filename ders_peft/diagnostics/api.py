"""`inspect_model` / `inspect_path`: all diagnostics of a DeRS model or a transformers MoE, written to a directory."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from ..atomic import check_destination, owned_entries, write_dir
from . import plots
from .experts import expert_sets, model_kind, num_layers, unwrap
from .router_load import router_load
from .similarity import layer_similarity
from .spectrum import layer_spectrum

OWNER = "ders_peft.diagnostics"
FILES = ("diagnostics.json", "summary.txt", "similarity.png", "router_load.png", "spectrum.png")


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="diagnostics", unit="layer", disable=not enabled)


def _summary(result: dict) -> dict[str, dict]:
    out = {}
    for name, sim in result["similarity"].items():
        to_base = sim["projections"]["ffn"]["to_base"]
        spec = result["spectrum"][name]["projections"]
        row = {
            "mean_expert_base_cosine": sum(to_base) / len(to_base),
            "rank99": max(max(p["rank99"]) for p in spec.values()),
        }
        load = (result["router_load"] or {}).get(name)
        if load is not None:
            row["balance"], row["entropy"] = load["balance"], load["entropy"]
        out[name] = row
    return out


def summary_text(result: dict) -> str:
    """The short human summary written to ``summary.txt``."""
    m = result["model"]
    lines = [
        f"{m['kind']} model ({m['model_type']}), {m['num_layers']} MoE layers; base = {m['base']}",
        "layer: mean expert-base cosine (whole FFN) | router balance N*sum(share^2) (1 = even) | "
        "entropy (nats) | max rank for 99% delta energy",
    ]
    for name, row in result["summary"].items():
        bal = f"{row['balance']:.3f}" if "balance" in row else "-"
        ent = f"{row['entropy']:.3f}" if "entropy" in row else "-"
        lines.append(f"{name}: {row['mean_expert_base_cosine']:.4f} | {bal} | {ent} | {row['rank99']}")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_outputs(result: dict, out_dir: str | os.PathLike) -> dict[str, str]:
    """Write ``diagnostics.json`` (NaN as null), ``summary.txt`` and the PNGs into ``out_dir`` atomically (one
    directory swap; files in ``out_dir`` that an earlier inspection did not write are kept). Returns name -> path."""
    out = check_destination(out_dir, "out_dir")
    data = {k: v for k, v in result.items() if k != "files"}

    def fill(tmp: Path) -> None:
        (tmp / "diagnostics.json").write_text(json.dumps(_json_safe(data), indent=1) + "\n", encoding="utf-8")
        (tmp / "summary.txt").write_text(summary_text(result), encoding="utf-8")
        (tmp / "similarity.png").write_bytes(plots.similarity_png(result["similarity"]))
        (tmp / "spectrum.png").write_bytes(plots.spectrum_png(result["spectrum"]))
        if result["router_load"]:
            (tmp / "router_load.png").write_bytes(plots.router_load_png(result["router_load"]))

    def keep() -> list[str]:
        if not out.is_dir():
            return []
        ours = owned_entries(out, OWNER) or set()
        return sorted(e.name for e in out.iterdir() if e.name not in ours)

    write_dir(out, fill, owner=OWNER, keep=keep)
    return {name: str(out / name) for name in FILES if (out / name).is_file()}


def inspect_model(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict:
    """Expert similarity, delta spectrum and (with ``input_ids``, token ids ``(T,)`` or ``(B, T)``) router load of
    every MoE layer of ``model`` (a DeRS peft model, or a supported transformers MoE with base = mean of experts).

    Returns ``{"model", "similarity", "spectrum", "router_load" (None without input), "summary", "notes"}``; with
    ``out_dir`` also writes the files (see :func:`write_outputs`) and adds ``"files"``. ``progress`` draws a tqdm
    bar over the layers on stderr."""
    kind = model_kind(model)
    inner = unwrap(model)
    notes: list[str] = []
    similarity, spectrum = {}, {}
    bar = _progress(num_layers(model), progress)
    base = None
    for experts in expert_sets(model):
        base = experts.base_kind
        head = {"experts": experts.expert_names, "base": base}
        similarity[experts.name] = {**head, "projections": layer_similarity(experts)}
        spectrum[experts.name] = {**head, "projections": layer_spectrum(experts)}
        del experts
        bar.update(1)
    bar.close()
    load = None
    if input_ids is None:
        notes.append("router load skipped: no input tokens were given")
    else:
        load = router_load(model, input_ids)
    result = {
        "model": {
            "kind": kind,
            "model_type": getattr(getattr(inner, "config", None), "model_type", None),
            "num_layers": len(similarity),
            "base": base,
        },
        "similarity": similarity,
        "spectrum": spectrum,
        "router_load": load,
        "notes": notes,
    }
    result["summary"] = _summary(result)
    if out_dir is not None:
        result["files"] = write_outputs(result, out_dir)
    return result


def _read_json(path: Path, name: str) -> dict:
    try:
        data = json.loads((path / name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"path={str(path)!r} is invalid: {name} cannot be read as JSON ({err}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"path={str(path)!r} is invalid: {name} is not a JSON object.")
    return data


def load_for_inspection(path: str, base: str | None = None):
    """``(model, tokenizer or None, description)`` for a DeRS adapter directory (loaded on ``base``, default its
    ``base_model_name_or_path``) or a transformers MoE model directory; ``ValueError`` naming the path otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"path={path!r} is invalid: it is not a directory (a DeRS adapter or a MoE model directory).")

    def tokenizer(*dirs):
        for d in dirs:
            try:
                return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
            except Exception:  # noqa: BLE001 - no tokenizer there: try the next directory
                continue
        return None

    if (p / "adapter_config.json").is_file():
        cfg = _read_json(p, "adapter_config.json")
        if cfg.get("peft_type") != "DERS":
            raise ValueError(f"path={path!r} is invalid: its peft_type is {cfg.get('peft_type')!r}, expected 'DERS'.")
        base = base or cfg.get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise ValueError(
                f"base={base!r} is invalid for the DeRS adapter {path!r}: pass the local directory of its base model "
                "(--base DIR)."
            )
        from peft import PeftModel

        import ders_peft  # noqa: F401 - registers PeftType.DERS

        dense = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True)
        model = PeftModel.from_pretrained(dense, str(p), local_files_only=True).eval()
        return model, tokenizer(p, base), f"DeRS adapter {path} on {base}"
    if (p / "config.json").is_file():
        _read_json(p, "config.json")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True).eval()
        except Exception as err:  # noqa: BLE001 - reported with the path
            raise ValueError(f"path={path!r} is invalid: it cannot be loaded as a transformers model ({err})") from err
        return model, tokenizer(p), f"transformers model {path}"
    raise ValueError(
        f"path={path!r} is invalid: it holds neither adapter_config.json (a DeRS adapter) nor config.json (a "
        "transformers MoE model)."
    )


def inspect_path(
    path: str,
    base: str | None = None,
    text_file: str | None = None,
    out_dir: str = "diagnostics",
    max_tokens: int = 4096,
    progress: bool = False,
) -> dict:
    """Load ``path`` (DeRS adapter directory on ``base``, or a transformers MoE directory), tokenise the first
    ``max_tokens`` tokens of ``text_file`` with the model's tokenizer for the router load (skipped with a note
    without text), run :func:`inspect_model` and write its files into ``out_dir``. Returns the dict (``files``:
    the written paths). ``progress``: tqdm bars on stderr (the command line's default)."""
    if text_file is not None and not Path(text_file).is_file():
        raise ValueError(f"text_file={text_file!r} is invalid: it is not a readable file.")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens!r} is invalid: must be an integer >= 1.")
    check_destination(out_dir, "out_dir")
    model, tok, description = load_for_inspection(path, base)
    model_kind(model)  # ValueError before any work for a model that is no MoE
    ids, note = None, None
    if text_file is not None:
        if tok is None:
            note = f"router load skipped: no tokenizer found next to {path!r} to tokenise {text_file!r}"
        else:
            text = Path(text_file).read_text(encoding="utf-8", errors="replace")
            ids = torch.tensor(tok(text)["input_ids"][:max_tokens], dtype=torch.long)
            if ids.numel() == 0:
                ids, note = None, f"router load skipped: {text_file!r} gave no tokens"
    result = inspect_model(model, ids, out_dir=None, progress=progress)
    result["model"]["source"] = description
    if note is not None:
        result["notes"] = [n for n in result["notes"] if not n.startswith("router load skipped")] + [note]
    result["files"] = write_outputs(result, out_dir)
    return result
