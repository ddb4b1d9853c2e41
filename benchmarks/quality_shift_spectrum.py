"""How much of what vanilla upcycling learns under the strong shift fits in a rank-r expert delta.

Trains the ``vanilla`` arm of ``benchmarks/quality_shift.py`` (same base, data, batches and chosen learning rate;
1,000 steps by default, seeds 0 and 1), then, for each rank r, replaces every expert by ``mean + SVD_r(W_e - mean)``
(the mean of the block's experts as the shared base: the best rank-r delta of each expert in Frobenius norm) and
measures the test loss again. ``r = 0`` is every expert equal to the mean (no expert differences at all). Also
reported: the share of the experts' squared deviation from the mean that the top r directions hold.

If rank-r truncation of vanilla's experts costs about as much test loss as DeRS-LM r trails vanilla by, the gap is
what a rank-r delta can hold (capacity), not how DeRS trains it.

    python benchmarks/quality_shift_spectrum.py [--steps 1000] [--seeds 0,1] [--ranks 0,1,4,16,64] [--lr 0.003]

Writes ``docs/benchmarks_quality_shift_spectrum.{json,md}`` (the quality-shift cache must hold the base and data:
run ``quality_shift.py`` first).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import multiprocessing
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import quality_shift as qs  # noqa: E402

from ders_peft import local_corpus as lc  # noqa: E402
from ders_peft.deltas import FullDelta  # noqa: E402
from ders_peft.layer import DeRSLayer  # noqa: E402


def truncate_experts_(model: torch.nn.Module, rank: int) -> float:
    """In place: every ``full`` expert matrix -> ``mean + SVD_rank(W_e - mean)``. Returns the share of the experts'
    squared deviation from their mean kept (1.0 where nothing deviates)."""
    kept = total = 0.0
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, DeRSLayer)):
            for delta in layer.ders_delta["default"].values():
                if not isinstance(delta, FullDelta):
                    continue
                w = delta.weight
                mean = w.mean(0, keepdim=True)
                dev = w - mean
                u, s, vh = torch.linalg.svd(dev, full_matrices=False)  # batched over experts
                r = min(rank, s.shape[-1])
                low = (u[..., :r] * s[..., None, :r]) @ vh[..., :r, :]
                kept += float((s[..., :r] ** 2).sum())
                total += float((s**2).sum())
                w.copy_(mean + low)
    return kept / total if total else 1.0


def run_seed(job: dict) -> dict:
    torch.set_num_threads(job["threads"])
    settings = qs.settings_from_dict(job["settings"])
    data = torch.load(job["data_path"])
    base = qs.transformers.LlamaForCausalLM.from_pretrained(job["base_dir"], dtype=torch.float32)
    model = qs.build_model(base, qs.parse_arm("vanilla", settings), settings, job["seed"], job["lora_rank"])
    start = time.perf_counter()
    lc.pretrain(model, data["train"], job["steps"], settings.batch_size, job["lr"], job["seed"], weight_decay=0.0)
    out = {"seed": job["seed"], "train_seconds": time.perf_counter() - start, "test_loss": {}, "kept_energy": {}}
    out["test_loss"]["vanilla"] = lc.evaluate_loss(model, data["test"])
    for r in job["ranks"]:
        trunc = copy.deepcopy(model)
        out["kept_energy"][str(r)] = truncate_experts_(trunc, r)
        out["test_loss"][str(r)] = lc.evaluate_loss(trunc, data["test"])
        print(f"seed {job['seed']} rank {r}: test {out['test_loss'][str(r)]:.4f}", flush=True)
    return out


def markdown(result: dict) -> str:
    ranks = [str(r) for r in result["ranks"]]
    seeds = result["runs"]
    van = statistics.fmean(r["test_loss"]["vanilla"] for r in seeds)
    rows = []
    for r in ranks:
        loss = statistics.fmean(s["test_loss"][r] for s in seeds)
        spread = max(s["test_loss"][r] for s in seeds) - min(s["test_loss"][r] for s in seeds)
        kept = statistics.fmean(s["kept_energy"][r] for s in seeds)
        ders = result["ders_lm_test"].get(r)
        ders_cell = f"{100 * (ders / van - 1):+.2f}%" if ders is not None else "-"
        rows.append(
            [r, f"{kept:.1%}", f"{loss:.4f} (spread {spread:.4f})", f"{100 * (loss / van - 1):+.2f}%", ders_cell]
        )
    header = [
        "rank r",
        "deviation energy kept",
        "test loss, experts truncated",
        "vs vanilla",
        "DeRS-LM r trained, vs vanilla",
    ]
    return "\n".join([
        "# Strong shift: how much of vanilla upcycling's experts fits in a rank-r delta",
        "",
        _common.provenance_line(result),
        "",
        f"Vanilla upcycling trained {result['steps']} steps at lr {result['lr']} (seeds {result['seeds']}; test loss "
        f"{van:.4f}), then every expert replaced by `mean + SVD_r(W_e - mean)`; r = 0 sets every expert to the mean. "
        "Last column: the DeRS-LM arm of that rank trained from the start ([benchmarks_quality_shift.md]"
        "(benchmarks_quality_shift.md), same budget, mean of its seeds).",
        "",
        _common.markdown_table(header, rows),
        "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seeds", type=qs._ints, default=(0, 1))
    p.add_argument("--ranks", type=qs._ints, default=(0, 1, 4, 16, 64))
    p.add_argument("--lr", type=float, default=0.003, help="vanilla's validation-chosen rate in quality_shift.py")
    p.add_argument("--cache", default="~/.cache/ders_peft/base")
    p.add_argument("--out", type=Path, default=_common.DOCS)
    args = p.parse_args(argv)
    settings = qs.Settings()
    cache = Path(args.cache).expanduser()
    base, tokenizer = lc.pretrained_base(cache, **settings.base)
    key = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()[:12]
    data_path = cache / f"quality-shift-data-{Path(base.name_or_path).name}-{key}.pt"
    qs.prepare_data(tokenizer, settings, data_path)
    common = {"settings": asdict(settings), "base_dir": base.name_or_path, "data_path": str(data_path),
              "lora_rank": qs.lora_rank(base, settings), "steps": args.steps, "lr": args.lr, "ranks": list(args.ranks),
              "threads": 1 if len(args.seeds) > 1 else 2}  # fmt: skip
    jobs = [common | {"seed": s} for s in args.seeds]
    with multiprocessing.get_context("spawn").Pool(min(2, len(jobs))) as pool:
        runs = pool.map(run_seed, jobs)
    ders_lm_test = {}
    shift = args.out / "benchmarks_quality_shift.json"
    if shift.is_file():
        for r in args.ranks:
            losses = [x["test_loss"] for x in json.loads(shift.read_text())["runs"]
                      if x["arm"] == f"lm_r{r}" and x["steps"] == args.steps and x["lr"] == args.lr]  # fmt: skip
            if losses:
                ders_lm_test[str(r)] = statistics.fmean(losses)
    result = {"steps": args.steps, "lr": args.lr, "seeds": list(args.seeds), "ranks": list(args.ranks), "runs": runs,
              "ders_lm_test": ders_lm_test, "command": _common.command_line("quality_shift_spectrum.py", argv),
              "machine": _common.machine_note(), "commit": _common.git_commit()}  # fmt: skip
    _common.write_json(args.out / "benchmarks_quality_shift_spectrum.json", result)
    (args.out / "benchmarks_quality_shift_spectrum.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
