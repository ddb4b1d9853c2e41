"""One table of every quality_shift run (main study + lever runs): test loss vs vanilla per budget, with the seeds.

Reads ``docs/benchmarks_quality_shift*.json`` (written by ``benchmarks/quality_shift.py``) and writes
``docs/benchmarks_quality_shift_levers.md``. Usage: ``python benchmarks/quality_shift_summary.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from ders_peft.atomic import atomic_write_text  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
SOURCES = ("", "_init", "_lrgroups", "_n4r8", "_rest", "_loraplus", "_aux0", "_aux01", "_topk1", "_smsmall")


def label(arm: str, settings: dict) -> str:
    """Arm name plus the invocation-wide levers that differ from the defaults."""
    extra = []
    if settings.get("lr_groups"):
        extra.append("lr x " + ",".join(f"{g}={m:g}" for g, m in settings["lr_groups"]))
    if arm not in ("base", "vanilla", "lora") and settings.get("num_experts") != 8:
        extra.append(f"N={settings['num_experts']}")
    if arm not in ("base", "dense", "vanilla", "lora") and settings.get("top_k", 2) != 2:
        extra.append(f"top-{settings['top_k']}")
    if arm not in ("base", "dense", "lora") and settings.get("aux_coef", 0.01) != 0.01:
        extra.append(f"aux coef {settings['aux_coef']:g}")
    return arm + (f" ({'; '.join(extra)})" if extra else "")


def rows(paths: list[Path]) -> tuple[dict, list[dict]]:
    vanilla: dict[str, float] = {}
    out = []
    for path in paths:
        data = json.loads(path.read_text())
        for steps, arms in data["budgets"].items():
            for arm, entry in arms.items():
                row = {"file": path.name, "steps": steps, "arm": label(arm, data["settings"]), "lr": entry["lr"]}
                row |= {"test": entry["test_loss"], "added": entry["params"]["added"]}
                row["trainable"] = entry["params"]["trainable"]
                out.append(row)
                if arm == "vanilla":
                    vanilla[steps] = entry["test_loss"]["mean"]
    return vanilla, out


def render(vanilla: dict, table: list[dict], provenance: str) -> str:
    lines = [
        "# Quality under a strong domain shift: every arm and lever side by side",
        "",
        f"Written by `python benchmarks/quality_shift_summary.py` ({provenance}) from the JSON files of",
        "`benchmarks/quality_shift.py` named in the last column (each page there has its command, date and commit).",
        "Lever runs reuse the learning rate that validation chose for `lm_r4` (0.003 at both budgets).",
        "",
    ]
    for steps in sorted({r["steps"] for r in table}, key=int):
        van = vanilla.get(steps)
        header = "| arm | lr | test loss per seed | mean | vs vanilla | added | trainable | from |"
        lines += [f"## {steps} steps", "", header]
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in sorted((r for r in table if r["steps"] == steps), key=lambda r: r["test"]["mean"]):
            seeds = ", ".join(f"{v:.4f}" for v in r["test"]["values"])
            rel = f"{(r['test']['mean'] / van - 1) * 100:+.2f}%" if van else "-"
            lines.append(
                f"| {r['arm']} | {r['lr']:g} | {seeds} | {r['test']['mean']:.4f} | {rel} | {r['added']:,} | "
                f"{r['trainable']:,} | {r['file']} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    paths = [DOCS / f"benchmarks_quality_shift{s}.json" for s in SOURCES]
    vanilla, table = rows([p for p in paths if p.is_file()])
    out = DOCS / "benchmarks_quality_shift_levers.md"
    c = _common.git_commit()
    dirty = " + changes" if c["dirty"] else ""
    provenance = f"date {_common.machine_note()['date']}, commit `{c['commit']}`{dirty}"
    atomic_write_text(out, render(vanilla, table, provenance))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
