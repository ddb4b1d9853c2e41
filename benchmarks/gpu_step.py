"""One training step (forward + backward + AdamW) on a GPU, bf16: time and peak memory of dense, LoRA, Mixtral and
DeRS arms at a realistic Llama shape (hidden 2048, intermediate 5632, 4 blocks, batch 8 x 2048 tokens; N=8, top_k=2).

Every arm is built on the device in bf16 (peft keeps LoRA/DeRS-LM/DeRS-SM adapters in fp32, its default; DeRS
``full`` keeps its whole experts in bf16, as Mixtral does), gets ``--warmup`` untimed steps, then ``--reps`` timed
ones (CUDA events around each step; the median is reported). Peak memory is ``torch.cuda.max_memory_allocated``
from an empty device (weights + gradients + AdamW states + activations), reset before each arm is built. Arms run
one after another in this process, stopping (and saying so) when ``--budget-s`` is spent.

Usage: ``python benchmarks/gpu_step.py [--device cuda] [--out-dir docs] [--reps 10] [--warmup 3]``; ``--quick
--device cpu`` runs every arm at a tiny shape (the CI smoke test; no memory numbers on CPU). Writes
``benchmarks_gpu.json`` and ``benchmarks_gpu.md`` into the output directory (default ``docs/``; ``--quick``: a new
temporary folder).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import train_step  # noqa: E402

import ders_peft  # noqa: E402
from ders_peft.atomic import atomic_write_text  # noqa: E402

Arm, Shape, QUICK_SHAPE = train_step.Arm, train_step.Shape, train_step.QUICK_SHAPE
ders_arm, mixtral_arm, lora_rank_matching = train_step.ders_arm, train_step.mixtral_arm, train_step.lora_rank_matching
llama_config, mixtral_config = train_step.llama_config, train_step.mixtral_config

transformers.logging.set_verbosity_error()

GPU_SHAPE = Shape(
    hidden=2048, intermediate=5632, layers=4, heads=16, kv_heads=8, vocab=32000, seq=2048, batch=8, layer_tokens=0
)
NUM_EXPERTS, TOP_K = 8, 2
LM = f"ders_lm_r4_N{NUM_EXPERTS}k{TOP_K}"


def arms(lora_rank: int) -> list[Arm]:
    n, k = NUM_EXPERTS, TOP_K
    return [
        Arm("dense_full_ft", "dense"),
        Arm(f"dense_lora_r{lora_rank}", "lora", lora_rank=lora_rank),
        mixtral_arm(n, k),
        ders_arm("full", n, k),
        ders_arm("lowrank", n, k, rank=4),
        ders_arm("sparse", n, k, rate=0.999),
        ders_arm("sparse", n, k, rate=0.9),
    ]


def build(arm: Arm, shape: Shape, device: torch.device, dtype: torch.dtype):
    """Model of ``arm`` on ``device`` in ``dtype`` (train mode), its trainable parameters and a note of its setup."""
    import peft

    torch.manual_seed(0)
    note = {}
    with torch.device(device):
        if arm.kind == "mixtral":
            model = transformers.MixtralForCausalLM(mixtral_config(shape, arm.num_experts, arm.top_k))
            note["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
        else:
            model = transformers.LlamaForCausalLM(llama_config(shape))
    model.to(dtype)
    if arm.kind == "mixtral":  # like DeRS "full": experts and router train, the rest is frozen
        for name, p in model.named_parameters():
            p.requires_grad_(".mlp." in name)
    elif arm.kind == "lora":
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        cfg = peft.LoraConfig(r=arm.lora_rank, lora_alpha=arm.lora_rank, target_modules=targets)
        model = peft.get_peft_model(model, cfg)
    elif arm.kind == "ders":
        cfg = ders_peft.DeRSConfig(
            target_modules=["mlp"], num_experts=arm.num_experts, top_k=arm.top_k, delta_type=arm.delta_type,
            rank=arm.rank, sparse_rate=arm.sparse_rate, train_base=arm.train_base,
        )  # fmt: skip
        upcast = arm.delta_type != "full"  # whole experts stay in the model dtype (as Mixtral's)
        model = peft.get_peft_model(model, cfg, autocast_adapter_dtype=upcast)
        note["adapter_dtype"] = "float32" if upcast else str(dtype).replace("torch.", "")
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad], note


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(arm: Arm, shape: Shape, device: torch.device, dtype: torch.dtype, reps: int, warmup: int) -> dict:
    """Build ``arm``, run ``warmup`` + ``reps`` training steps; per-step seconds and peak memory."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, params, note = build(arm, shape, device, dtype)
    built_mb = torch.cuda.memory_allocated(device) / 2**20 if cuda else None
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step() -> torch.Tensor:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    _sync(device)
    times, losses = [], []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(step().detach())
            end.record()
            times.append((start, end))
        else:
            t0 = time.perf_counter()
            losses.append(step().detach())
            times.append(time.perf_counter() - t0)
    _sync(device)
    times_s = [s.elapsed_time(e) / 1000.0 for s, e in times] if cuda else times
    result = {
        "arm": asdict(arm),
        **note,
        "trainable_params": sum(p.numel() for p in params),
        "times_s": times_s,
        "median_s": float(statistics.median(times_s)),
        "last_loss": float(losses[-1]),
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        "memory_after_build_mb": built_mb,
    }
    return result  # the model, its gradients and optimizer states are freed with this frame


def targets(results: dict) -> list[dict]:
    """The issue's GPU goals, where the arms they compare were measured."""
    arm = {n: d for n, d in results["arms"].items() if "median_s" in d}
    rows = []
    if LM in arm and "dense_full_ft" in arm:
        rows.append(("step: DeRS-LM r4 / dense full FT", arm[LM]["median_s"] / arm["dense_full_ft"]["median_s"], 1.1))
    mix = f"mixtral_N{NUM_EXPERTS}k{TOP_K}"
    if LM in arm and mix in arm:
        rows.append(("step: DeRS-LM r4 / MixtralForCausalLM", arm[LM]["median_s"] / arm[mix]["median_s"], 0.6))
    lora = next((n for n in arm if n.startswith("dense_lora_r")), None)
    if lora and arm[lora]["peak_memory_mb"]:
        for name in (LM, f"ders_sm_0.999_N{NUM_EXPERTS}k{TOP_K}", f"ders_sm_0.9_N{NUM_EXPERTS}k{TOP_K}"):
            if name in arm:
                ratio = arm[name]["peak_memory_mb"] / arm[lora]["peak_memory_mb"]
                rows.append((f"peak memory: {name} / {lora}", ratio, 1.0))
    return [{"what": w, "measured": round(v, 3), "target": t, "met": v <= t} for w, v, t in rows]


def table(results: dict) -> str:
    arm = results["arms"]
    dense = arm.get("dense_full_ft", {}).get("median_s")
    rows = []
    for name, d in arm.items():
        if "median_s" not in d:
            rows.append([name, "-", "-", "-", "-", d.get("error") or d.get("skipped", "")])
            continue
        mem = d["peak_memory_mb"]
        ratio = f"{d['median_s'] / dense:.2f}" if dense else "-"
        note = d.get("adapter_dtype") or d.get("experts_implementation") or ""
        gib = f"{mem / 1024:.2f}" if mem is not None else "-"
        rows.append([name, _common.fmt_params(d["trainable_params"]), f"{d['median_s'] * 1000:.1f}", ratio, gib, note])
    s = results["shape"]
    parts = [
        f"### One training step on {results['device_name']} ({results['dtype']}, hidden {s['hidden']}, intermediate "
        f"{s['intermediate']}, {s['layers']} blocks, batch {s['batch']} x {s['seq']} tokens, N={NUM_EXPERTS}, "
        f"top_k={TOP_K}; median of {results['reps']} after {results['warmup']} warm-up steps)\n",
        _common.markdown_table(["arm", "trainable", "median step ms", "x dense", "peak GiB", "note"], rows),
        "\n### Goals\n",
        _common.markdown_table(
            ["ratio", "measured", "goal", "met"],
            [[t["what"], t["measured"], f"<= {t['target']}", "yes" if t["met"] else "NO"] for t in results["targets"]],
        ),
    ]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shape, two repetitions (CI smoke run)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--out-dir", type=Path, default=None, help="default: docs/; --quick: a temporary folder")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per arm (default 10, quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per arm (default 3, quick 1)")
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop starting arms after this many seconds")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    if device.type not in ("cuda", "cpu"):
        raise SystemExit(f"--device {args.device!r} is invalid: use cuda or cpu")
    out_dir = _common.output_dir(args.out_dir, args.quick)
    shape = replace(QUICK_SHAPE, vocab=256) if args.quick else GPU_SHAPE
    reps = args.reps or (2 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    dtype = torch.bfloat16
    t0 = time.time()
    # LoRA (all seven projections) of about DeRS-LM's trainable count, counted on the meta device
    lora_rank = lora_rank_matching(shape, _meta_trainable(ders_arm("lowrank", NUM_EXPERTS, TOP_K, rank=4), shape))
    results: dict = {
        "command": "python benchmarks/gpu_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": "bfloat16",
        "shape": asdict(shape),
        "reps": reps,
        "warmup": warmup,
        "lora_rank_matched": lora_rank,
        "timing": "CUDA events around each step" if device.type == "cuda" else "time.perf_counter",
        "memory": "torch.cuda.max_memory_allocated, reset before each arm is built" if device.type == "cuda" else None,
        "arms": {},
    }
    for arm in arms(lora_rank):
        if time.time() - t0 > args.budget_s:
            results["arms"][arm.name] = {"arm": asdict(arm), "skipped": f"time budget of {args.budget_s:.0f}s spent"}
            continue
        try:
            results["arms"][arm.name] = measure(arm, shape, device, dtype, reps, warmup)
        except torch.OutOfMemoryError as exc:
            results["arms"][arm.name] = {"arm": asdict(arm), "error": f"out of memory: {str(exc)[:200]}"}
        d = results["arms"][arm.name]
        print(f"[{time.time() - t0:6.1f}s] {arm.name}: " + (
            f"{d['median_s'] * 1000:.1f} ms, peak {d['peak_memory_mb']} MB" if "median_s" in d else str(d)
        ), flush=True)  # fmt: skip
        gc.collect()
    results["targets"] = targets(results)
    results["wall_s"] = time.time() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "benchmarks_gpu.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out_dir / "benchmarks_gpu.md", table(results))
    print(table(results))
    print(f"wrote {out_dir / 'benchmarks_gpu.json'}")
    return 0


def _meta_trainable(arm: Arm, shape: Shape) -> int:
    """Trainable parameters of ``arm`` counted on the meta device (nothing allocated)."""
    import peft

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(llama_config(shape))
    cfg = ders_peft.DeRSConfig(
        target_modules=["mlp"], num_experts=arm.num_experts, top_k=arm.top_k, delta_type=arm.delta_type,
        rank=arm.rank, train_base=arm.train_base,
    )  # fmt: skip
    model = peft.get_peft_model(model, cfg)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


if __name__ == "__main__":
    raise SystemExit(main())
