"""Post-training compression of a trained vanilla-upcycled MoE (DeRS compression): held-out perplexity vs size.

The MoE is real: the project's pretrained small Llama (:func:`ders_peft.local_corpus.pretrained_base`, cached)
vanilla-upcycled (``DeRSConfig(delta_type="full")``, N=8, top-2, every block) and trained (experts + router) on the
held-apart stdlib code domain (:func:`~ders_peft.local_corpus.code_domain_files`, split by file into train /
validation / test) until it is clearly better there than the dense model. A dense model fine-tuned on the same
parameters for the same steps is trained beside it, a second MoE with a universal FFN (``shared_expert=True``) for
extended compression, a control MoE at a 10x lower learning rate (smaller deltas) and, in the paper's regime, a
whole-model MoE: the same upcycling with every parameter trained (experts + router, and attention, norms, embeddings
and head as ``modules_to_save``) at a fine-tuning learning rate chosen on the validation split from a small grid, with
a dense model whose every parameter is fine-tuned at that learning rate beside it. The trained models are cached on
disk, so a rerun only compresses, evaluates and times.

Then :func:`ders_peft.compress` turns the MoE into dense model + compressed deltas: DARE and magnitude pruning at
0.2 ... 0.99 (DARE over several seeds at 0.9), 8 ... 1-bit quantization with one scale per row and with group scales;
on the extended MoE a few settings with the universal FFN compressed and kept whole; on the control and the
whole-model MoE the goal settings and a few more (the whole-model MoE's compressed adapter carries its trained
non-expert modules as ``modules_to_save``). For every setting: test perplexity (exp of the mean token loss on the
test split; nothing is chosen on it), Added Params (:func:`ders_peft.parameter_report`, the paper's counting), bytes
of the saved adapter on disk, :func:`ders_peft.compression_report`, and how far the compressed expert weights are
from the trained ones. Finally greedy generation tokens/s and peak resident memory (``VmHWM`` of a fresh process per
arm, arms timed in interleaved rounds) of the dense model, the uncompressed MoE and three compressed ones.

    python benchmarks/compression.py            # full run: docs/compression.{json,md,png}
    python benchmarks/compression.py --quick    # tiny sizes, < 1 min, into a temporary folder (or --out DIR)
    python benchmarks/compression.py --report-only   # redraw md + png from the JSON in --out (default docs/)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import ders_peft  # noqa: E402
from ders_peft import local_corpus as lc  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)  # peft on 5.x

REPO = Path(__file__).resolve().parents[1]
_FORMAT = 1  # bump when a change makes cached trained models incomparable
LOSSLESS_PCT = 1.0  # "within 1 % of the uncompressed perplexity"


@dataclass(frozen=True)
class Settings:
    """Everything that defines the numbers (the training part is hashed into the cache key of the trained models)."""

    base: dict = field(default_factory=lambda: {"steps": 300, "seq_len": 128, "hidden_size": 128, "num_layers": 4})
    seq_len: int = 128
    batch_size: int = 8
    steps: int = 600  # one epoch of the train split
    lr: float = 2e-3  # chosen on the validation split by benchmarks/quality.py (dense and vanilla arms)
    num_experts: int = 8
    top_k: int = 2
    seed: int = 0
    split_seed: int = 0
    train_chars: int | None = None  # None: the whole train split
    max_eval_blocks: int | None = None  # None: every validation / test block
    # the experts-only grid, trimmed to fit the whole-model arm in 30 minutes (the 2026-12-02 run also had drop rate 0,
    # 3 seeds at DARE 0.99, group scales at 8 and 4 bits and DARE 0.99 on the extended MoE; see docs/compression.md)
    drop_rates: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 0.9, 0.99)
    dare_seeds: tuple[int, ...] = (0, 1, 2)
    seeded_rates: tuple[float, ...] = (0.9,)  # DARE rates run with every seed of dare_seeds (on every MoE)
    bits: tuple[int, ...] = (8, 4, 3, 2, 1)
    group_bits: tuple[int, ...] = (3, 2, 1)  # bit widths also run with group scales
    group_size: int = 64  # the "group scales" variant; the other has one scale per row
    extended: tuple[tuple[str, float], ...] = (("dare", 0.9), ("quantize", 2), ("quantize", 1))
    control_lr_factor: float = 0.1  # the control MoE: the same training at a 10x lower learning rate
    control: tuple[tuple[str, float], ...] = (
        ("dare", 0.9),
        ("dare", 0.99),
        ("magnitude", 0.9),
        ("quantize", 2),
        ("quantize_group", 2),
        ("quantize", 1),
    )
    # the whole-model MoE: every non-FFN module trained too (peft matches a name by the end of the module's name)
    whole_modules: tuple[str, ...] = (
        "embed_tokens",
        "self_attn",
        "input_layernorm",
        "post_attention_layernorm",
        "model.norm",
        "lm_head",
    )
    whole_lr_grid: tuple[float, ...] = (2.5e-4, 5e-4, 1e-3)  # fine-tuning learning rates; chosen on validation
    whole: tuple[tuple[str, float], ...] = (
        ("dare", 0.9),
        ("dare", 0.99),
        ("magnitude", 0.9),
        ("quantize", 8),
        ("quantize", 4),
        ("quantize", 3),
        ("quantize", 2),
        ("quantize_group", 2),
        ("quantize", 1),
    )
    gen_arms: tuple[str, ...] = ("dense", "moe", "dare_0.9", "quant_2_row", "quant_4_row")
    gen_prompts: int = 4
    gen_prompt_len: int = 32
    gen_new_tokens: int = 64
    gen_runs: int = 5

    def training_key(self) -> dict:
        keys = ("base", "seq_len", "batch_size", "steps", "lr", "num_experts", "top_k", "seed", "split_seed")
        return {k: getattr(self, k) for k in keys} | {"train_chars": self.train_chars, "format": _FORMAT}

    @property
    def tokens_per_run(self) -> int:
        return self.steps * self.batch_size * self.seq_len


QUICK = Settings(
    base={
        "steps": 10,
        "seq_len": 64,
        "hidden_size": 32,
        "num_layers": 2,
        "max_chars": 200_000,
        "vocab_size": 512,
        "batch_size": 8,
    },
    seq_len=64,
    batch_size=4,
    steps=6,
    num_experts=4,
    train_chars=60_000,
    max_eval_blocks=8,
    drop_rates=(0.0, 0.5, 0.9, 0.99),
    dare_seeds=(0, 1),
    seeded_rates=(0.9,),
    bits=(8, 2),
    group_bits=(8, 2),
    group_size=16,
    extended=(("dare", 0.9), ("quantize", 2)),
    control=(("dare", 0.9), ("quantize", 2), ("quantize_group", 2)),
    whole_lr_grid=(1e-3, 3e-3),
    whole=(("dare", 0.9), ("quantize", 2), ("quantize_group", 2)),
    gen_arms=("dense", "moe", "dare_0.9"),
    gen_prompts=2,
    gen_prompt_len=8,
    gen_new_tokens=8,
    gen_runs=1,
)


# ----------------------------------------------------------------------------------------------------------------
# Data and trained models (cached)
# ----------------------------------------------------------------------------------------------------------------


def prepare_data(tokenizer, s: Settings) -> tuple[dict[str, torch.Tensor], dict]:
    """Train / validation / test blocks of the held-apart code domain, split by file."""
    files = dict(zip(("train", "val", "test"), lc.split_by_file(lc.code_domain_files(), seed=s.split_seed)))
    blocks = {}
    for split, paths in files.items():
        texts = lc.read_texts(paths, s.train_chars if split == "train" else None)
        blocks[split] = lc.pack_tokens(tokenizer, texts, s.seq_len)
        if split != "train" and s.max_eval_blocks is not None:
            blocks[split] = blocks[split][: s.max_eval_blocks]
    info = {k: {"files": len(files[k]), "blocks": len(b), "tokens": b.numel()} for k, b in blocks.items()}
    return blocks, info | {"packages": list(lc.CODE_DOMAIN_PACKAGES)}


def load_base(base_dir: Path) -> transformers.LlamaForCausalLM:
    return transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def moe_config(s: Settings, shared: bool, whole: bool = False) -> ders_peft.DeRSConfig:
    return ders_peft.DeRSConfig(
        target_modules=["mlp"],
        num_experts=s.num_experts,
        top_k=s.top_k,
        delta_type="full",
        shared_expert=shared,
        seed=s.seed,
        task_type="CAUSAL_LM",
        modules_to_save=list(s.whole_modules) if whole else None,
    )


TRAINED = {
    "moe": "Vanilla MoE (N full experts + router trained)",
    "moe_shared": "Vanilla MoE + universal FFN (extended)",
    "dense_ft": "Dense, MLPs fine-tuned (same steps)",
    "moe_lowlr": "Control: vanilla MoE, learning rate x0.1",
    "moe_whole": "Whole-model MoE (experts + router + every other module trained)",
    "dense_whole": "Dense, whole model fine-tuned (same steps, the whole-model MoE's lr)",
}
FIXED_LR = ("moe", "moe_shared", "dense_ft", "moe_lowlr")  # trained at the lr of Settings (x the control factor)
MOES = {"moe": "experts-only MoE", "moe_lowlr": "control MoE (lr x0.1)", "moe_whole": "whole-model MoE"}
GRID_PREFIX = {"moe": "", "moe_lowlr": "ctl_", "moe_whole": "whole_"}  # family prefix of each MoE's settings


def kind_lr(kind: str, s: Settings, lr: float | None = None) -> float:
    if lr is not None:
        return lr
    return s.lr * (s.control_lr_factor if kind == "moe_lowlr" else 1.0)


def trained_dir(root: Path, kind: str, s: Settings, lr: float | None = None) -> Path:
    if kind in ("moe_whole", "dense_whole"):
        return root / f"{kind}_lr{lr:g}"
    return root / (f"moe_lr_x{s.control_lr_factor:g}" if kind == "moe_lowlr" else kind)


def non_ffn_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".mlp." not in n)


def build_trainable(kind: str, base_dir: Path, s: Settings) -> tuple[torch.nn.Module, dict]:
    """A fresh model of ``kind`` ready to train and a count of what trains. The MoEs train experts + router
    (``moe_whole`` also a trainable copy of every non-FFN module: ``modules_to_save``); ``dense_ft`` trains the same
    dense parameters (the MLPs) in place, ``dense_whole`` every parameter."""
    from peft import get_peft_model

    base = load_base(base_dir)
    if kind in ("dense_ft", "dense_whole"):
        for name, param in base.named_parameters():
            param.requires_grad_(kind == "dense_whole" or ".mlp." in name)
        return base, {}
    non_ffn = non_ffn_params(base)
    model = get_peft_model(base, moe_config(s, shared=kind == "moe_shared", whole=kind == "moe_whole"))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    copies = sum(v for n, v in trainable.items() if ".modules_to_save." in n)
    if kind == "moe_whole":
        # every non-FFN parameter of the dense model has exactly one trainable copy (peft matched what we meant)
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad and ".mlp." not in n]
        wrapped = {n.split(".original_module.")[0] for n in frozen if ".original_module." in n}
        if copies != non_ffn or any(".original_module." not in n for n in frozen):
            raise RuntimeError(
                f"whole-model MoE: modules_to_save={list(s.whole_modules)} gives {copies:,} trainable copied "
                f"parameters, the dense model has {non_ffn:,} outside its FFNs (frozen, not copied: "
                f"{[n for n in frozen if '.original_module.' not in n][:4]})"
            )
        info = {"modules_to_save": list(s.whole_modules), "wrapped_modules": len(wrapped)}
    else:
        info = {}
    return model, info | {"experts_router_params": sum(trainable.values()) - copies, "copied_params": copies}


def load_trained(kind: str, path: Path, base_dir: Path) -> torch.nn.Module:
    if kind in ("dense_ft", "dense_whole"):
        return load_base(path / "model")
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(base_dir), path / "adapter").eval()


def trained_model(kind: str, root: Path, base_dir: Path, s: Settings, blocks: dict, log, lr: float | None = None):
    """The trained model of ``kind`` (at ``lr``, default: the settings') from the cache, or trained now and cached
    (atomically); returns it and its training record (steps, tokens, seconds, losses)."""
    lr = kind_lr(kind, s, lr)
    final = trained_dir(root, kind, s, lr)
    meta_path = final / "train.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("modules_to_save", list(s.whole_modules)) == list(s.whole_modules):
            log(f"{final.name}: cached ({meta['train_seconds']:.0f} s of training when built)")
            return load_trained(kind, final, base_dir), meta | {"cached": True}
        log(f"{final.name}: cached with other modules_to_save, retraining")
    model, info = build_trainable(kind, base_dir, s)
    log(f"{final.name}: training {s.steps} steps x {s.batch_size} x {s.seq_len} tokens at lr {lr:g}")
    start = time.perf_counter()
    losses = lc.pretrain(
        model,
        blocks["train"],
        steps=s.steps,
        batch_size=s.batch_size,
        lr=lr,
        seed=s.seed,
        weight_decay=0.0,
        log_every=0 if s.steps < 50 else 100,
    )
    seconds = time.perf_counter() - start
    meta = {
        "lr": lr,
        "steps": s.steps,
        "tokens": s.tokens_per_run,
        "train_seconds": seconds,
        "tokens_per_s": s.tokens_per_run / seconds,
        "threads": torch.get_num_threads(),
        "train_loss_first": losses[0],
        "train_loss_last10": statistics.fmean(losses[-10:]),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        **info,
        "commit": git_commit(),
        "ders_peft_source_digest": library_digest(),
    }
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        model.save_pretrained(tmp / ("model" if kind.startswith("dense") else "adapter"))
        (tmp / "train.json").write_text(json.dumps(meta, indent=2) + "\n")  # last: marks the directory complete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{final.name}: trained in {seconds:.0f} s ({meta['tokens_per_s']:.0f} tokens/s)")
    return load_trained(kind, final, base_dir), meta | {"cached": False}


def choose_whole_lr(root: Path, base_dir: Path, s: Settings, blocks: dict, log) -> tuple:
    """Train the whole-model MoE at every lr of ``whole_lr_grid`` (same steps and batches) and keep the one with the
    lowest validation perplexity; the test split is evaluated on the chosen one only. Returns it, its record (with
    the search) and the seconds the candidates took to train (cached ones: when built)."""
    search, best = [], None
    for lr in s.whole_lr_grid:
        model, meta = trained_model("moe_whole", root, base_dir, s, blocks, log, lr=lr)
        val = lc.evaluate_loss(model, blocks["val"])
        search.append(
            {
                "lr": lr,
                "val_loss": val,
                "val_ppl": math.exp(val),
                "cached": meta["cached"],
                "seconds": meta["train_seconds"],
            }
        )
        log(f"  whole-model MoE, lr {lr:g}: val ppl {math.exp(val):.3f}")
        if best is None or val < best[2]:
            best = (model, meta, val)
        del model
    model, meta, _ = best
    chosen = meta["lr"]
    edge = chosen in (min(s.whole_lr_grid), max(s.whole_lr_grid)) and len(s.whole_lr_grid) > 1
    return model, meta | {"lr_search": search, "lr_chosen": chosen, "lr_at_grid_edge": edge}


def deltas_dropped(moe: torch.nn.Module, base_dir: Path) -> torch.nn.Module:
    """The dense model with the whole-model MoE's trained non-expert modules: the MoE with every expert delta
    dropped (the router's weights then sum to one over identical FFNs)."""
    dense = load_base(base_dir)
    marker = ".modules_to_save.default."
    state = {
        n.removeprefix("base_model.model.").replace(marker, "."): p.detach()
        for n, p in moe.named_parameters()
        if marker in n
    }
    missing = [k for k in dense.state_dict() if ".mlp." not in k and k not in state]
    unexpected = [k for k in state if k not in dense.state_dict()]
    if missing or unexpected:
        raise RuntimeError(f"deltas_dropped: missing {missing[:4]}, unexpected {unexpected[:4]}")
    dense.load_state_dict(state, strict=False)
    return dense.eval()


# ----------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------


def library_digest() -> str:
    """Content hash of the ``ders_peft`` sources in use (the commit alone misses uncommitted changes)."""
    digest = hashlib.sha256()
    root = Path(ders_peft.__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def git_commit() -> dict:
    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return proc.stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain", "ders_peft"))}


def test_metrics(model: torch.nn.Module, blocks: dict, val: bool = False) -> dict:
    start = time.perf_counter()
    loss = lc.evaluate_loss(model, blocks["test"])
    out = {"test_loss": loss, "test_ppl": math.exp(loss), "eval_seconds": time.perf_counter() - start}
    if val:
        out["val_loss"] = lc.evaluate_loss(model, blocks["val"])
        out["val_ppl"] = math.exp(out["val_loss"])
    return out


def dir_bytes(path: Path, skip: tuple[str, ...] = ("README.md",)) -> dict:
    """Bytes of the files under ``path`` (the model card ``README.md`` is documentation, listed apart)."""
    files = {p.name: p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
    return {"total": sum(v for k, v in files.items() if k not in skip), "files": files}


def ders_layers(model: torch.nn.Module) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, ders_peft.DeRSLayer)}


def delta_stats(model: torch.nn.Module, reference: torch.nn.Module | None = None) -> dict:
    """How far expert weights are from the dense FFN and, with ``reference`` (the uncompressed MoE), from it.

    Pooled over every layer and matrix (Frobenius norms): ``delta_rel`` = ||W_e - W_dense|| / ||W_dense|| and, with a
    reference, ``error_rel_delta`` = ||W'_e - W_e|| / ||W_e - W_dense|| (1 = as large as the delta itself, what
    dropping every delta gives) and ``error_rel_weight`` = ||W'_e - W_e|| / ||W_dense||; routed experts and the
    universal FFN (index N) apart.
    """
    from ders_peft import ffn

    sums = {part: {"dense": 0.0, "delta": 0.0, "error": 0.0} for part in ("routed", "universal")}
    ref_layers = ders_layers(reference) if reference is not None else {}
    for name, layer in ders_layers(model).items():
        adapter = layer.active_adapters[0]
        n = layer.ders_settings[adapter].num_experts
        weights = layer.expert_weights(adapter)
        ref = ref_layers[name].expert_weights(ref_layers[name].active_adapters[0]) if reference is not None else None
        for proj, w in weights.items():
            dense = ffn.proj_weight(getattr(layer.base_layer, proj)).detach().float()
            target = (ref[proj] if ref is not None else w).float()
            for part, sl in (("routed", slice(0, n)), ("universal", slice(n, None))):
                t = target[sl]
                if t.shape[0] == 0:
                    continue
                sums[part]["dense"] += float(dense.pow(2).sum()) * t.shape[0]
                sums[part]["delta"] += float((t - dense).pow(2).sum())
                if ref is not None:
                    sums[part]["error"] += float((w.float()[sl] - t).pow(2).sum())
    out = {}
    for part, s in sums.items():
        if s["dense"] == 0:
            continue
        stats = {"delta_rel": math.sqrt(s["delta"] / s["dense"])}
        if reference is not None:
            stats["error_rel_delta"] = math.sqrt(s["error"] / s["delta"]) if s["delta"] else float("nan")
            stats["error_rel_weight"] = math.sqrt(s["error"] / s["dense"])
        out[part] = stats
    return out


def settings_grid(s: Settings) -> list[dict]:
    """The compression settings of the main MoE: id, label, family and CompressionConfig keyword arguments."""
    grid = []
    for method in ("dare", "magnitude"):
        for p in s.drop_rates:
            seeds = s.dare_seeds if method == "dare" and p in s.seeded_rates else (s.dare_seeds[0],)
            for seed in seeds:
                kw = {"method": method, "drop_rate": p} | ({"seed": seed} if method == "dare" else {})
                sid = f"{method}_{p:g}" + (f"_s{seed}" if method == "dare" and seed != s.dare_seeds[0] else "")
                entry = {"id": sid, "family": method, "setting": p, "seed": seed, "kwargs": kw}
                grid.append(entry | {"show_seed": seed != s.dare_seeds[0]})
    for scales, group in (("row", None), ("group", s.group_size)):
        for k in s.bits if group is None else s.group_bits:
            grid.append(
                {
                    "id": f"quant_{k}_{scales}",
                    "family": f"quantize_{scales}",
                    "setting": k,
                    "seed": None,
                    "kwargs": {"method": "quantize", "bits": k, "group_size": group},
                }
            )
    return grid


def extended_grid(s: Settings) -> list[dict]:
    grid = []
    for method, value in s.extended:
        for shared in (True, False):
            kw = {"method": method, "compress_shared": shared}
            kw |= {"drop_rate": value, "seed": s.dare_seeds[0]} if method == "dare" else {"bits": int(value)}
            sid = f"ext_{method}_{value:g}_{'shared' if shared else 'keep'}"
            grid.append({"id": sid, "family": f"ext_{method}", "setting": value, "seed": None, "kwargs": kw})
    return grid


def moe_grid(items: tuple[tuple[str, float], ...], prefix: str, s: Settings) -> list[dict]:
    """The settings of the control (``prefix="ctl_"``) or whole-model (``"whole_"``) MoE: DARE with every seed at the
    rates of ``seeded_rates``, ``quantize`` with row scales, ``quantize_group`` with groups of ``group_size``."""
    grid = []
    for method, value in items:
        seeds = s.dare_seeds if method == "dare" and value in s.seeded_rates else (s.dare_seeds[0],)
        for seed in seeds:
            if method == "quantize_group":
                kw = {"method": "quantize", "bits": int(value), "group_size": s.group_size}
                sid = f"{prefix}quant_{int(value)}_group"
            elif method == "quantize":
                kw = {"method": method, "bits": int(value)}
                sid = f"{prefix}quant_{int(value)}_row" if prefix == "whole_" else f"{prefix}quantize_{value:g}"
            else:
                kw = {"method": method, "drop_rate": value} | ({"seed": seed} if method == "dare" else {})
                sid = f"{prefix}{method}_{value:g}" + (f"_s{seed}" if seed != s.dare_seeds[0] else "")
            entry = {"id": sid, "family": f"{prefix}{method}", "setting": value, "seed": seed, "kwargs": kw}
            grid.append(entry | {"show_seed": seed != s.dare_seeds[0]})
    return grid


def control_grid(s: Settings) -> list[dict]:
    return moe_grid(s.control, "ctl_", s)


def whole_grid(s: Settings) -> list[dict]:
    return moe_grid(s.whole, "whole_", s)


def label(entry: dict) -> str:
    kw = entry["kwargs"]
    if kw["method"] == "quantize":
        scales = "row scales" if kw.get("group_size") is None else f"groups of {kw['group_size']}"
        text = f"{kw['bits']}-bit, {scales}"
    else:
        text = f"{'DARE' if kw['method'] == 'dare' else 'magnitude'} {kw['drop_rate']:g}"
        if kw["method"] == "dare" and entry.get("show_seed"):
            text += f" (seed {kw['seed']})"
    if "compress_shared" in kw:
        text += ", universal FFN " + ("compressed" if kw["compress_shared"] else "kept whole")
    return text


def run_setting(entry: dict, moe, uncompressed_ppl: float, blocks: dict, work: Path, log) -> dict:
    """Compress ``moe`` with one setting, evaluate and measure it; the adapter is saved under ``work``."""
    start = time.perf_counter()
    small = ders_peft.compress(moe, ders_peft.CompressionConfig(**entry["kwargs"]), progress=False)
    compress_seconds = time.perf_counter() - start
    path = work / entry["id"]
    small.save_pretrained(path)
    report = ders_peft.compression_report(small, uncompressed=moe, saved_dir=path)
    result = {
        "id": entry["id"],
        "family": entry["family"],
        "setting": entry["setting"],
        "seed": entry["seed"],
        "kwargs": entry["kwargs"],
        "label": label(entry),
        "added_params": ders_peft.parameter_report(small).added_params,
        "bytes_on_disk": dir_bytes(path),
        "compression_report": report.as_dict(),
        "compress_seconds": compress_seconds,
        "weights": delta_stats(small, moe),
        **test_metrics(small, blocks),
    }
    result["delta_pct"] = 100 * (result["test_ppl"] / uncompressed_ppl - 1)
    log(
        f"  {result['label']:<44} added {result['added_params']:>10,}  disk {result['bytes_on_disk']['total']:>10,} B"
        f"  ppl {result['test_ppl']:8.3f} ({result['delta_pct']:+7.2f} %)  err/delta "
        f"{result['weights']['routed']['error_rel_delta']:.3f}  ({compress_seconds:.1f} s + "
        f"{result['eval_seconds']:.1f} s)"
    )
    del small
    return result


# ----------------------------------------------------------------------------------------------------------------
# Generation: one fresh process per arm, interleaved rounds
# ----------------------------------------------------------------------------------------------------------------



class GenArm:
    """One generation arm, loaded once (the dense model from disk, plus the adapter if any); ``run()`` times one
    greedy generation of ``new_tokens`` for every prompt (one batch)."""

    def __init__(self, spec: dict) -> None:
        self.rss_imports = _common.status_mb("VmHWM")
        model = load_base(Path(spec["base_dir"]))
        if spec["adapter_dir"]:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, spec["adapter_dir"]).eval()
        self.model, self.new_tokens = model, spec["new_tokens"]
        self.prompts = torch.tensor(spec["prompts"], dtype=torch.long)
        self.kwargs = {
            "input_ids": self.prompts,
            "attention_mask": torch.ones_like(self.prompts),
            "do_sample": False,
            "pad_token_id": spec["pad_token_id"],
        }
        self.times: list[float] = []
        self.out = self._generate(4)  # warm-up

    def _generate(self, n: int) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.generate(**self.kwargs, max_new_tokens=n, min_new_tokens=n)

    def run(self) -> float:
        start = time.perf_counter()
        self.out = self._generate(self.new_tokens)
        self.times.append(time.perf_counter() - start)
        return self.times[-1]

    def summary(self, own_process: bool) -> dict:
        new = (self.out.shape[1] - self.prompts.shape[1]) * self.out.shape[0]
        peak = _common.status_mb("VmHWM") if own_process else None
        base = self.rss_imports if own_process else None
        return {
            "tokens_per_s": new / statistics.median(self.times),
            "times_s": self.times,
            "new_tokens_total": new,
            "peak_rss_mib": peak,
            "rss_after_imports_mib": base,
            "model_rss_mib": None if peak is None or base is None else peak - base,
            "generated": self.out[:, self.prompts.shape[1] :].tolist(),
        }


def gen_worker(spec: dict) -> None:
    """Subprocess side: load one arm, warm up, then answer ``run`` (one timed generation) and ``summary``."""
    torch.set_num_threads(spec["threads"])
    _common.serve_arm(GenArm(spec))




def generation(
    arms: dict[str, str | None], base_dir: Path, prompts: list, s: Settings, threads: int, in_process: bool, log
) -> dict:
    """Tokens/s (median over ``gen_runs`` interleaved rounds) and peak RSS of each arm (``None``: the dense model,
    else an adapter directory), each in its own process; ``in_process`` (quick mode) loads them all here instead
    (memory then not measured)."""
    spec = {
        "base_dir": str(base_dir),
        "prompts": prompts,
        "new_tokens": s.gen_new_tokens,
        "threads": threads,
        "pad_token_id": 2,
    }
    if in_process:
        loaded = {name: GenArm(spec | {"adapter_dir": adapter}) for name, adapter in arms.items()}
        for _ in range(s.gen_runs):
            for arm in loaded.values():
                arm.run()
        return {name: arm.summary(own_process=False) for name, arm in loaded.items()}
    procs: dict[str, _common.ArmProcess] = {}
    try:
        for name, adapter in arms.items():  # started together (imports overlap), then timed one at a time
            procs[name] = _common.ArmProcess(name, str(Path(__file__).resolve()), spec | {"adapter_dir": adapter})
        for proc in procs.values():
            proc.expect("ready")
        for r in range(s.gen_runs):
            times = {name: proc.ask("run") for name, proc in procs.items()}
            log(f"  generation round {r + 1}/{s.gen_runs}: " + ", ".join(f"{n} {t:.2f} s" for n, t in times.items()))
        return {name: proc.ask("summary") for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.proc.kill()
            proc.proc.wait()


# ----------------------------------------------------------------------------------------------------------------
# Analysis, report, plot
# ----------------------------------------------------------------------------------------------------------------

FAMILY_LABEL = {
    "dare": "DARE",
    "magnitude": "magnitude",
    "quantize_row": "quantization, row scales",
    "quantize_group": "quantization, group scales",
}


def family_points(result: dict, family: str) -> list[dict]:
    """One point per setting of a family, in order of increasing compression, seeds pooled (mean, min, max)."""
    rows = [r for r in result["compressed"] if r["family"] == family]
    by_setting: dict[float, list[dict]] = {}
    for r in rows:
        by_setting.setdefault(r["setting"], []).append(r)
    reverse = family.startswith("quantize")  # fewer bits = more compression
    points = []
    for setting in sorted(by_setting, reverse=reverse):
        rs = by_setting[setting]
        ppl = [r["test_ppl"] for r in rs]
        points.append(
            {
                "setting": setting,
                "n": len(rs),
                "ppl_mean": statistics.fmean(ppl),
                "ppl_min": min(ppl),
                "ppl_max": max(ppl),
                "delta_pct_mean": statistics.fmean(r["delta_pct"] for r in rs),
                "delta_pct_max": max(r["delta_pct"] for r in rs),
                "added_params": rs[0]["added_params"],
                "bytes": rs[0]["bytes_on_disk"]["total"],
                "error_rel_delta": statistics.fmean(r["weights"]["routed"]["error_rel_delta"] for r in rs),
                "error_rel_weight": statistics.fmean(r["weights"]["routed"]["error_rel_weight"] for r in rs),
            }
        )
    return points


def _setting_text(family: str, setting: float) -> str:
    if family.startswith("quantize"):
        return f"{int(setting)} bit" + ("" if int(setting) == 1 else "s")
    return f"drop {setting:g}"


def breakpoints(result: dict) -> dict:
    """Per family: the most compressed setting still within 1 % (worst seed), the first beyond it, and the first
    that loses at least half of what the MoE gained over the dense model (the midpoint between the two ppls)."""
    ref = result["trained"]["moe"]["test_ppl"]
    dense = result["base_model"]["test_ppl"]
    half = (ref + dense) / 2
    out = {}
    for family in FAMILY_LABEL:
        points = [p for p in family_points(result, family) if p["setting"] not in (0.0, 0)]
        if not points:
            continue
        last_ok, first_bad, first_half = None, None, None
        for p in points:
            if p["delta_pct_max"] <= LOSSLESS_PCT and first_bad is None:
                last_ok = p
            elif first_bad is None:
                first_bad = p
            if first_half is None and p["ppl_mean"] >= half:
                first_half = p
        out[family] = {
            "last_lossless": last_ok and last_ok["setting"],
            "first_over_1pct": first_bad and first_bad["setting"],
            "first_losing_half_the_gain": first_half and first_half["setting"],
            "points": points,
        }
    return out


METHOD_TEXT = {
    "dare": "DARE",
    "magnitude": "magnitude",
    "quantize_row": "row scales",
    "quantize_group": "group scales",
}


def family_of(kind: str, method: str) -> str:
    """The family of ``method`` (``dare``, ``magnitude``, ``quantize_row``, ``quantize_group``) on MoE ``kind``."""
    if kind == "moe":
        return method
    return GRID_PREFIX[kind] + ("quantize" if method == "quantize_row" else method)


def rows_of(result: dict, kind: str, method: str, setting: float) -> list[dict]:
    family = family_of(kind, method)
    return [r for r in result["compressed"] if r["family"] == family and r["setting"] == setting]


GOAL_SETTINGS = (
    ("DARE 0.9 within 1 % of the uncompressed perplexity", "dare", 0.9),
    ("2-bit (one scale per row) within 1 %", "quantize_row", 2),
    ("2-bit (group scales) within 1 %", "quantize_group", 2),
)


SHORT_GOAL = dict(zip((g for g, _, _ in GOAL_SETTINGS), ("DARE 0.9", "2-bit row scales", "2-bit group scales")))


def goals(result: dict) -> list[dict]:
    """The goals, per trained MoE (``moe``: its kind; ``None``: about the whole run)."""
    trained = result["trained"]
    dense = result["base_model"]["test_ppl"]
    rows = []
    for kind in MOES:
        if kind not in trained:
            continue
        ppl = trained[kind]["test_ppl"]
        ref = "dense_whole" if kind == "moe_whole" else "dense_ft"
        value = f"test ppl {ppl:.2f} vs dense {dense:.2f} ({100 * (ppl / dense - 1):+.1f} %)"
        if ref in trained:
            what = "every parameter" if ref == "dense_whole" else "MLPs"
            value += f"; dense, {what} fine-tuned for the same steps: {trained[ref]['test_ppl']:.2f}"
        rows.append(
            {
                "goal": "trained MoE clearly better than the dense model on the held-out domain",
                "moe": kind,
                "value": value,
                "met": ppl < dense * 0.97,
            }
        )
        for goal, method, setting in GOAL_SETTINGS:
            rs = rows_of(result, kind, method, setting)
            if not rs:
                rows.append({"goal": goal, "moe": kind, "value": "not run", "met": None})
                continue
            worst = max(r["delta_pct"] for r in rs)
            value = _pct(rs) + (f" (mean over {len(rs)} seeds, worst in brackets)" if len(rs) > 1 else "")
            rows.append({"goal": goal, "moe": kind, "value": value, "met": worst <= LOSSLESS_PCT})
    wall = result.get("wall_seconds_total")
    if wall is not None and not result["quick"]:
        cached = result.get("cached_training_seconds", 0.0)
        value = f"{wall / 60:.1f} min"
        if cached:
            value += (
                f" with {len(result.get('cached_models', []))} trained models cached; from scratch about "
                f"{(wall + cached) / 60:.0f} min (adding the training times they took when built)"
            )
        rows.append({"goal": "full run under 30 minutes", "moe": None, "value": value, "met": wall < 1800})
    return rows


def _fmt_bytes(n: float) -> str:
    for unit, div in (("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def _yes(met: bool | None) -> str:
    return {None: "-", True: "met", False: "**not met**"}[met]


def _whole_quant_text(result: dict) -> str:
    """2-bit on every trained MoE: its error relative to the delta and to the weights, and its loss."""
    rows = {k: rows_of(result, k, "quantize_row", 2) for k in MOES if k in result["trained"]}
    rows = {k: rs[0] for k, rs in rows.items() if rs}
    if "moe_whole" not in rows or len(rows) < 2:
        return ""
    losses = [r["delta_pct"] for r in rows.values()]
    of_delta = [r["weights"]["routed"]["error_rel_delta"] for r in rows.values()]
    noise = [r["weights"]["routed"]["error_rel_weight"] for r in rows.values()]
    ordered = sorted(range(len(losses)), key=losses.__getitem__) == sorted(range(len(noise)), key=noise.__getitem__)
    proportion = ""
    if "moe" in rows and rows["moe"]["delta_pct"] > 0:
        w, m = rows["moe_whole"], rows["moe"]
        loss = w["delta_pct"] / m["delta_pct"]
        err = w["weights"]["routed"]["error_rel_weight"] / m["weights"]["routed"]["error_rel_weight"]
        if not 1 / 1.3 < loss / err < 1.3:
            proportion = (
                f", but not in proportion to it: the whole-model MoE loses {loss:.2f}x what the experts-only MoE "
                f"loses with {err:.2f}x its error relative to the weights"
            )
    return (
        f" 2-bit (row scales), {' / '.join(MOES[k] for k in rows)}: error "
        + " / ".join(f"{x:.2f}" for x in of_delta)
        + " of the delta, "
        + " / ".join(f"{x:.2f}" for x in noise)
        + " of the weights, loss "
        + " / ".join(f"{x:+.2f} %" for x in losses)
        + ": "
        + (
            "ordered by the error relative to the weights, like DARE"
            if ordered
            else "not ordered by the error relative to the weights as DARE's loss is"
        )
        + proportion
        + "."
    )


def dare_pairs(result: dict) -> list[tuple[float, float, str]]:
    """Every DARE setting of every trained MoE as (noise ||W'_e - W_e|| / ||W_dense||, mean loss %, tag: "" for the
    experts-only MoE, " c" control, " w" whole-model), sorted by noise; drop rate 0 left out."""
    pairs = []
    for kind, tag in (("moe", ""), ("moe_lowlr", " c"), ("moe_whole", " w")):
        by_rate: dict[float, list[dict]] = {}
        for r in result["compressed"]:
            if r["family"] == family_of(kind, "dare") and r["setting"] != 0:
                by_rate.setdefault(r["setting"], []).append(r)
        pairs += [
            (_mean(rs, "error_rel_weight"), statistics.fmean(r["delta_pct"] for r in rs), tag)
            for rs in by_rate.values()
        ]
    return sorted(pairs)


def explain(result: dict, bp: dict) -> list[str]:
    """Where each method breaks and why, from the measured numbers."""
    trained = result["trained"]
    moe_ppl, dense_ppl = trained["moe"]["test_ppl"], result["base_model"]["test_ppl"]
    delta_rel = trained["moe"]["weights"]["routed"]["delta_rel"]
    lines = [
        f"The trained experts differ from the dense FFN by ||W_e - W_dense|| / ||W_dense|| = {delta_rel:.3f} "
        f"(pooled over all experts and matrices). Dropping every delta gives back the dense model exactly (router "
        f"weights sum to one over identical experts), i.e. ppl {dense_ppl:.2f}: a compression that only removes "
        f"information moves the model between {moe_ppl:.2f} (nothing lost) and {dense_ppl:.2f} (the whole domain gain "
        "lost); one that adds noise can go past it. Below, *error* is ||W'_e - W_e|| / ||W_e - W_dense|| of the "
        "compressed experts (1.0 = as far off as dropping the deltas).",
        "",
    ]
    for family, info in bp.items():
        pts = {p["setting"]: p for p in info["points"]}
        ok, bad, half = info["last_lossless"], info["first_over_1pct"], info["first_losing_half_the_gain"]
        desc = f"- **{FAMILY_LABEL[family]}**: "
        desc += f"within 1 % up to {_setting_text(family, ok)}" if ok is not None else "over 1 % at every setting"
        if bad is not None:
            p = pts[bad]
            desc += (
                f"; first over 1 % at {_setting_text(family, bad)} ({p['delta_pct_mean']:+.2f} %, error "
                f"{p['error_rel_delta']:.2f})"
            )
        else:
            desc += " (never over 1 % in this grid)"
        if half is not None:
            desc += f"; loses half the gain over the dense model at {_setting_text(family, half)}"
        worse = [p for p in info["points"] if p["ppl_mean"] > dense_ppl]
        if worse:
            desc += f"; worse than the dense model from {_setting_text(family, worse[0]['setting'])} on"
        last = info["points"][-1]
        desc += (
            f". Most compressed point: {_setting_text(family, last['setting'])}, ppl {last['ppl_mean']:.2f} "
            f"({last['delta_pct_mean']:+.2f} %), error {last['error_rel_delta']:.2f}."
        )
        lines.append(desc)
    lines += ["", "Why:", ""]
    dare = {p["setting"]: p for p in bp.get("dare", {}).get("points", [])}
    mag = {p["setting"]: p for p in bp.get("magnitude", {}).get("points", [])}
    if dare:
        expected = ", ".join(f"{p:g}: {math.sqrt(p / (1 - p)):.2f} / {dare[p]['error_rel_delta']:.2f}" for p in dare)
        lines.append(
            "- **DARE** keeps each delta entry with probability 1 - p and rescales it by 1 / (1 - p): unbiased, but "
            "the error it adds has sqrt(p / (1 - p)) times the delta's norm (expected / measured: " + expected + "), "
            "larger than the delta itself from p = 0.5 on. Relative to the weights that noise is "
            + ", ".join(f"{p:g}: {dare[p]['error_rel_weight']:.2f}" for p in dare)
            + f" x ||W_dense||, because these deltas are large ({delta_rel:.2f} x ||W_dense||: the experts moved far "
            "from the dense FFN while adapting to a new domain at the validation-chosen learning rate). A model "
            "does not tolerate random weight noise of the order of its weights"
            + (
                ", so DARE breaks early here"
                if bp["dare"]["first_over_1pct"] is not None and bp["dare"]["first_over_1pct"] < 0.9
                else ""
            )
            + (
                f"; at {max(dare):g} the model is worse than with no deltas at all (ppl "
                f"{dare[max(dare)]['ppl_mean']:.0f} vs {dense_ppl:.0f})"
                if dare[max(dare)]["ppl_mean"] > dense_ppl
                else ""
            )
            + ". DARE's premise (the paper's fine-tuned models) is deltas that are small next to the weights; the "
            "control and the whole-model MoE test exactly that."
        )
    by_moe: dict[str, dict[float, list[dict]]] = {}
    for kind in ("moe_lowlr", "moe_whole"):
        for r in result["compressed"]:
            if r["family"] == family_of(kind, "dare") and kind in trained:
                by_moe.setdefault(kind, {}).setdefault(r["setting"], []).append(r)

    def dare_text(by_rate: dict[float, list[dict]]) -> str:
        return ", ".join(
            f"{p:g}: {_pct(rs)}, noise {_mean(rs, 'error_rel_weight'):.2f} x ||W_dense||" for p, rs in by_rate.items()
        )

    if "moe_lowlr" in by_moe:
        c = trained["moe_lowlr"]
        lines.append(
            f"- **Control.** The same MoE trained at lr x{result['settings']['control_lr_factor']:g} has deltas of "
            f"{c['weights']['routed']['delta_rel']:.3f} x ||W_dense|| (ppl {c['test_ppl']:.2f}, still "
            f"{100 * (1 - c['test_ppl'] / dense_ppl):.1f} % below the dense model). DARE on it: "
            + dare_text(by_moe["moe_lowlr"])
            + ". The sqrt(p / (1 - p)) factor is the same; what changes is the size of the delta it multiplies."
        )
    if "moe_whole" in by_moe:
        w = trained["moe_whole"]
        drop = w["deltas_dropped"]["test_ppl"]
        gain = max(dense_ppl - w["test_ppl"], 1e-9)
        lines.append(
            f"- **Whole-model MoE** (the paper's regime: every parameter trained, lr {w['lr']:g} chosen on the "
            f"validation split): deltas of {w['weights']['routed']['delta_rel']:.3f} x ||W_dense||, ppl "
            f"{w['test_ppl']:.2f}. With every expert delta dropped (its trained attention, norms, embeddings and head "
            f"kept) it has ppl {drop:.2f}: {100 * (dense_ppl - drop) / gain:.0f} % of its gain over the dense model "
            "sits outside the experts"
            + (
                f", so the experts' share of the adaptation is smaller than in the experts-only MoE (whose deltas "
                f"dropped give the dense model, {dense_ppl:.2f})"
                if drop < dense_ppl
                else ""
            )
            + ". DARE on it: "
            + dare_text(by_moe["moe_whole"])
            + "."
            + _whole_quant_text(result)
        )
    if by_moe:
        pairs = dare_pairs(result)
        limit = _noise_at(pairs, LOSSLESS_PCT)
        monotone = all(a[1] <= b[1] for a, b in zip(pairs, pairs[1:]))
        tags = ", ".join(t for k, t in (("moe_lowlr", "c = control"), ("moe_whole", "w = whole-model")) if k in by_moe)
        text = (
            f"- Sorted by that noise (||W'_e - W_e|| / ||W_dense||), the DARE points of the MoEs ({tags})"
            + (" line up: " if monotone else ": ")
            + ", ".join(f"{n:.2f}{tag} -> {pct:+.1f} %" for n, pct, tag in pairs)
            + (
                ". What decides is the noise relative to the weights, whichever MoE it comes from"
                if monotone
                else ". The loss follows the noise closely but not exactly: the order breaks at "
                + ", ".join(
                    f"{a[0]:.2f}{a[2]} ({a[1]:+.1f} %) / {b[0]:.2f}{b[2]} ({b[1]:+.1f} %)"
                    for a, b in zip(pairs, pairs[1:])
                    if a[1] > b[1]
                )
            )
        )
        if limit is not None:
            sizes = [f"experts-only MoE {delta_rel:.2f}"] + [
                f"{MOES[k]} {trained[k]['weights']['routed']['delta_rel']:.2f}" for k in by_moe
            ]
            text += (
                f"; 1 % is reached at about {limit:.2f} x ||W_dense||. With DARE 0.9's factor of 3, deltas would have "
                f"to be below about {limit / 3:.2f} x ||W_dense|| for DARE 0.9 to stay within 1 % ("
                + ", ".join(sizes)
                + ")"
            )
        lines.append(text + ".")
    if mag:
        lines.append(
            "- **Magnitude pruning** keeps the largest |delta| entries unscaled: its error is the energy of the "
            "dropped entries, always below the delta's norm ("
            + ", ".join(f"{p:g}: {mag[p]['error_rel_delta']:.2f}" for p in mag)
            + "), so it degrades smoothly towards the dense model instead of adding noise, and is never worse than "
            "dropping the deltas. It loses what the dropped entries carried: the largest "
            f"{100 * (1 - max(mag)):g} % of the entries hold {100 * (1 - mag[max(mag)]['error_rel_delta'] ** 2):.0f} "
            "% of the delta's energy"
            + (f", the largest 10 % {100 * (1 - mag[0.9]['error_rel_delta'] ** 2):.0f} %" if 0.9 in mag else "")
            + f" (entries drawn from one Gaussian would give {100 * _gaussian_top_energy(1 - max(mag)):.0f} % / "
            f"{100 * _gaussian_top_energy(0.1):.0f} %): the deltas are not concentrated in a few large entries, so "
            "every dropped entry takes its share of the adaptation with it."
        )
    quant = {p["setting"]: p for p in bp.get("quantize_row", {}).get("points", [])}
    group = {p["setting"]: p for p in bp.get("quantize_group", {}).get("points", [])}
    if quant:
        ratios = [group[k]["error_rel_delta"] / quant[k]["error_rel_delta"] for k in group if k in quant]
        gain = 100 * (1 - statistics.fmean(ratios)) if ratios else 0.0
        lines.append(
            "- **Quantization** rounds every delta entry to a k-bit grid scaled to the row's (or group's) range; "
            "error per bit width, row / group scales: "
            + ", ".join(
                f"{k}: {quant[k]['error_rel_delta']:.2f}"
                + (f" / {group[k]['error_rel_delta']:.2f}" if k in group else "")
                for k in quant
            )
            + ". It keeps every entry, so at a given size it is far more accurate than dropping entries, and "
            "the error is deterministic (no variance over seeds). The error roughly "
            "doubles per bit removed; 1 bit keeps only the sign pattern times a scale. "
            + (
                f"Group scales of {result['settings']['group_size']} barely help here (error {gain:.0f} % lower on "
                "average) and cost extra bytes of fp32 scales."
                if ratios and gain < 10
                else "Group scales follow the local range (outliers cost less) for extra bytes of fp32 scales."
            )
        )
    ext = [r for r in result["compressed"] if r["family"].startswith("ext_")]
    if ext:
        pairs: dict[str, dict[bool, dict]] = {}
        for r in ext:
            name = label({"kwargs": {k: v for k, v in r["kwargs"].items() if k != "compress_shared"}})
            pairs.setdefault(name, {})[r["kwargs"]["compress_shared"]] = r
        lines.append(
            "- **Extended compression** (MoE with a universal FFN), vs its own uncompressed ppl, universal FFN "
            "compressed / kept whole: "
            + "; ".join(
                f"{name}: {pr[True]['delta_pct']:+.2f} % / {pr[False]['delta_pct']:+.2f} %"
                for name, pr in pairs.items()
                if True in pr and False in pr
            )
            + ". Keeping the universal FFN whole costs one dense FFN of bytes per block."
        )
    return lines


def tables(result: dict) -> str:
    s = result["settings"]
    t = result["trained"]
    base = result["base_model"]
    moe = t["moe"]
    bp = breakpoints(result)
    parts = []
    rows = [
        [
            "Dense base (pretrained, no training on the domain)",
            "-",
            f"{base['test_ppl']:.3f}",
            f"{base['val_ppl']:.3f}",
            "0",
            "-",
            "-",
        ]
    ]
    for kind, name in TRAINED.items():
        if kind not in t:
            continue
        r = t[kind]
        rows.append(
            [
                name,
                f"lr {r.get('lr', s['lr']):g}"
                + (" (chosen on val)" if "lr_search" in r else "")
                + f", {r['steps']} steps, {r['tokens']:,} tokens, {r['train_seconds']:.0f} s",
                f"{r['test_ppl']:.3f}",
                f"{r['val_ppl']:.3f}",
                f"{r.get('added_params', 0):,}",
                _fmt_bytes(r["bytes_on_disk"]["total"]) if "bytes_on_disk" in r else "-",
                f"{r['trainable_params']:,}",
            ]
        )
    parts += [
        "### Trained models (test split; the dense rows add nothing)",
        _common.markdown_table(
            ["model", "training", "test ppl", "val ppl", "added params", "adapter on disk", "trainable"], rows
        ),
    ]

    def comp_rows(entries: list[dict], ref_ppl: float) -> list[list[str]]:
        out = []
        for r in entries:
            w = r["weights"]
            err = f"{w['routed']['error_rel_delta']:.3f}"
            if "universal" in w:
                err += f" / {w['universal']['error_rel_delta']:.3f}"
            out.append(
                [
                    r["label"],
                    f"{r['added_params']:,}",
                    _fmt_bytes(r["bytes_on_disk"]["total"]),
                    f"{r['test_ppl']:.3f}",
                    f"{100 * (r['test_ppl'] / ref_ppl - 1):+.2f} %",
                    err,
                ]
            )
        return out

    header = ["method, setting", "Added Params", "bytes on disk", "test ppl", "vs uncompressed", "error / delta"]
    ref_row = [
        "uncompressed MoE",
        f"{moe['added_params']:,}",
        _fmt_bytes(moe["bytes_on_disk"]["total"]),
        f"{moe['test_ppl']:.3f}",
        "+0.00 %",
        "0",
    ]
    main = [r for r in result["compressed"] if not r["family"].startswith(("ext_", "ctl_", "whole_"))]
    first_seed = [r for r in main if r["seed"] in (None, s["dare_seeds"][0]) or r["family"] != "dare"]
    parts += [
        f"### Compressed MoE (N={s['num_experts']}, top-{s['top_k']}); dense base: ppl {base['test_ppl']:.3f}",
        "DARE rows: seed "
        + str(s["dare_seeds"][0])
        + " (the other seeds are in the next table). *error / delta* = ||W'_e - W_e|| / ||W_e - W_dense||. "
        + (
            "Drop rate 0 is stored in the sparse format (an fp32 value and an int32 index per entry): twice the "
            "vanilla MoE's bytes, and the paper's counting (N P (1 - p) values) is above vanilla's (N - 1) P until "
            "p > 1/N."
            if 0.0 in s["drop_rates"]
            else "A sparse delta stores an fp32 value and an int32 index per kept entry; the paper's counting "
            "(N P (1 - p) values) is above vanilla's (N - 1) P until p > 1/N."
        ),
        _common.markdown_table(header, [ref_row, *comp_rows(first_seed, moe["test_ppl"])]),
    ]
    seed_rows = []
    for p in family_points(result, "dare"):
        rs = [r for r in main if r["family"] == "dare" and r["setting"] == p["setting"]]
        if len(rs) > 1:
            ppl = [r["test_ppl"] for r in rs]
            seed_rows.append(
                [
                    f"{p['setting']:g}",
                    ", ".join(f"{x:.3f}" for x in ppl),
                    f"{statistics.fmean(ppl):.3f}",
                    f"{max(ppl) - min(ppl):.3f}",
                    f"{p['delta_pct_mean']:+.2f} % (worst {p['delta_pct_max']:+.2f} %)",
                ]
            )
    if seed_rows:
        parts += [
            f"### DARE over seeds {', '.join(str(x) for x in s['dare_seeds'])}",
            _common.markdown_table(["drop rate", "test ppl per seed", "mean", "range", "vs uncompressed"], seed_rows),
        ]
    ext = [r for r in result["compressed"] if r["family"].startswith("ext_")]
    if ext:
        sh = t["moe_shared"]
        ext_ref = [
            "uncompressed MoE + universal FFN",
            f"{sh['added_params']:,}",
            _fmt_bytes(sh["bytes_on_disk"]["total"]),
            f"{sh['test_ppl']:.3f}",
            "+0.00 %",
            "0",
        ]
        parts += [
            "### Extended compression (MoE with a universal FFN): the universal FFN's delta compressed or kept whole",
            "*error / delta*: routed experts / universal FFN.",
            _common.markdown_table(header, [ext_ref, *comp_rows(ext, sh["test_ppl"])]),
        ]
    cross = cross_rows(result)
    kinds = [k for k in MOES if k in t]
    if cross and len(kinds) > 1:
        sizes = "; ".join(
            f"{MOES[k]}: lr {t[k]['lr']:g}, ppl {t[k]['test_ppl']:.3f}, {t[k]['weights']['routed']['delta_rel']:.3f}"
            for k in kinds
        )
        parts += [
            "### The same settings on every trained MoE: experts-only, control (lr x"
            f"{s['control_lr_factor']:g}, smaller deltas) and whole-model",
            f"Uncompressed, and ||W_e - W_dense|| / ||W_dense||: {sizes}. Each column is relative to its own "
            "uncompressed MoE; DARE: mean over seeds (worst). *error / W* = ||W'_e - W_e|| / ||W_dense||; - = not "
            "run.",
            _common.markdown_table(
                ["setting"] + [f"{MOES[k]}: {c}" for k in kinds for c in ("vs uncompressed", "error / W")], cross
            ),
        ]
    whole = [r for r in result["compressed"] if r["family"].startswith("whole_")]
    if whole and "moe_whole" in t:
        parts += whole_tables(result, whole)
    gen = result.get("generation")
    if gen:
        dense = gen["arms"].get("dense")
        rows = []
        for name, r in gen["arms"].items():
            peak = "-" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}"
            model_mb = "-" if r["model_rss_mib"] is None else f"{r['model_rss_mib']:.0f}"
            rows.append(
                [
                    GEN_LABEL.get(name, name),
                    f"{r['tokens_per_s']:.1f}",
                    f"{r['tokens_per_s'] / dense['tokens_per_s']:.2f}" if dense else "-",
                    peak,
                    model_mb,
                ]
            )
        parts += [
            f"### Generation ({s['gen_prompts']} prompts x {s['gen_new_tokens']} new tokens, greedy, batch "
            f"{s['gen_prompts']}, median of {s['gen_runs']} interleaved rounds, {gen['threads']} thread per process)",
            _common.markdown_table(
                ["model", "tokens/s", "x dense", "peak RSS (MiB)", "added over imports (MiB)"], rows
            ),
        ]
        if all(name in gen["arms"] for name in ("dense", "moe", "dare_0.9", "quant_2_row")) and not result["quick"]:
            a = gen["arms"]
            parts.append(
                "Generation notes. Every arm keeps the dense model; the MoE runs 2 of "
                f"{s['num_experts']} full experts per token; the compressed models run the dense FFN once per token "
                "plus the chosen experts' compressed deltas (`ders_peft/decode.py`), so they are not faster than the "
                f"MoE: DARE 0.9 {a['dare_0.9']['tokens_per_s'] / a['moe']['tokens_per_s']:.2f}x the MoE's tokens/s, "
                f"2-bit {a['quant_2_row']['tokens_per_s'] / a['moe']['tokens_per_s']:.2f}x. Sparse deltas are "
                "applied by gathering each slot's kept entries through cached int64 row / column positions (16 bytes "
                "per kept entry, twice the stored value + index; the prefill goes through the grouped path and its "
                "int32 CSR layouts); quantized deltas have no generation fast path: every call unpacks the codes of "
                "every expert that a token chose. Memory: the process is dominated by the libraries "
                f"({a['dense']['rss_after_imports_mib']:.0f} MiB after the imports); what the model adds is "
                + ", ".join(f"{GEN_LABEL.get(n, n)} {r['model_rss_mib']:.0f} MiB" for n, r in a.items())
                + f". DARE 0.9's adapter is {_fmt_bytes(by_id_bytes(result, 'dare_0.9'))} on disk against the MoE's "
                f"{_fmt_bytes(t['moe']['bytes_on_disk']['total'])}, yet its resident memory is not lower: the index "
                "structures built for computing with it outweigh the saving at this size."
            )
    parts += ["### Goals", goals_markdown(result["goals"])]
    parts += ["### Where each method breaks, and why", "\n".join(explain(result, bp))]
    return "\n\n".join(parts) + "\n"


def by_id_bytes(result: dict, sid: str) -> int:
    return next(r["bytes_on_disk"]["total"] for r in result["compressed"] if r["id"] == sid)


def _pct(rows: list[dict]) -> str:
    values = [r["delta_pct"] for r in rows]
    text = f"{statistics.fmean(values):+.2f} %"
    return text + (f" ({max(values):+.2f} %)" if len(values) > 1 else "")


def _gaussian_top_energy(q: float) -> float:
    """Share of the energy (sum of squares) in the largest ``q`` fraction of entries of i.i.d. Gaussian values."""
    c = statistics.NormalDist().inv_cdf(1 - q / 2)
    return 2 * (c * math.exp(-c * c / 2) / math.sqrt(2 * math.pi) + q / 2)


def _noise_at(pairs: list[tuple[float, float, str]], pct: float) -> float | None:
    """Noise level where the loss (sorted ``(noise, loss %, tag)`` pairs) first crosses ``pct``, by linear
    interpolation between the neighbours; ``None`` if it never does or already does at the first point."""
    for (n0, l0, _), (n1, l1, _) in zip(pairs, pairs[1:]):
        if l0 <= pct < l1:
            return n0 + (n1 - n0) * (pct - l0) / (l1 - l0)
    return None


def _mean(rows: list[dict], key: str) -> float:
    return statistics.fmean(r["weights"]["routed"][key] for r in rows)


def cross_rows(result: dict) -> list[list[str]]:
    """Per setting run on the control or the whole-model MoE: every trained MoE's loss and weight error."""
    kinds = [k for k in MOES if k in result["trained"]]
    keys = []
    for r in result["compressed"]:
        for kind in ("moe_lowlr", "moe_whole"):
            prefix = GRID_PREFIX[kind]
            if r["family"].startswith(prefix):
                name = r["family"].removeprefix(prefix)
                method = "quantize_row" if name == "quantize" else name
                if (method, r["setting"]) not in keys:
                    keys.append((method, r["setting"]))
    out = []
    for method, setting in keys:
        row = [_setting_label(method, setting)]
        for kind in kinds:
            rs = rows_of(result, kind, method, setting)
            row += [_pct(rs), f"{_mean(rs, 'error_rel_weight'):.3f}"] if rs else ["-", "-"]
        out.append(row)
    return out


def _setting_label(method: str, setting: float) -> str:
    if method.startswith("quantize"):
        return f"{int(setting)}-bit, {METHOD_TEXT[method]}"
    return f"{METHOD_TEXT[method]} {setting:g}"


def whole_tables(result: dict, rows: list[dict]) -> list[str]:
    """The whole-model MoE: its learning-rate search (validation split) and its compressed settings."""
    s, t, base = result["settings"], result["trained"], result["base_model"]
    w = t["moe_whole"]
    search = [
        [
            f"{c['lr']:g}",
            f"{c['val_ppl']:.3f}",
            "**chosen**" if c["lr"] == w["lr"] else "",
            f"{c['seconds']:.0f} s" + (" (cached)" if c["cached"] else ""),
        ]
        for c in w["lr_search"]
    ]
    ref = w["test_ppl"]
    carried_total = w["carried_bytes"]
    header = [
        "method, setting",
        "Added Params",
        "bytes on disk",
        "of which carried",
        "test ppl",
        "vs uncompressed",
        "error / delta",
        "error / W",
    ]
    table = [
        [
            "uncompressed whole-model MoE",
            f"{w['added_params']:,}",
            _fmt_bytes(w["bytes_on_disk"]["total"]),
            _fmt_bytes(carried_total),
            f"{ref:.3f}",
            "+0.00 %",
            "0",
            "0",
        ],
        [
            "every expert delta dropped (dense FFNs, trained rest)",
            "0",
            "-",
            _fmt_bytes(carried_total),
            f"{w['deltas_dropped']['test_ppl']:.3f}",
            f"{100 * (w['deltas_dropped']['test_ppl'] / ref - 1):+.2f} %",
            "1",
            f"{w['weights']['routed']['delta_rel']:.3f}",
        ],
    ]
    for r in rows:
        wt = r["weights"]["routed"]
        table.append(
            [
                r["label"],
                f"{r['added_params']:,}",
                _fmt_bytes(r["bytes_on_disk"]["total"]),
                _fmt_bytes(r["compression_report"]["compressed_bytes"]["carried"]),
                f"{r['test_ppl']:.3f}",
                f"{r['delta_pct']:+.2f} %",
                f"{wt['error_rel_delta']:.3f}",
                f"{wt['error_rel_weight']:.3f}",
            ]
        )
    dense_line = f"dense base {base['test_ppl']:.3f}"
    if "dense_whole" in t:
        d = t["dense_whole"]
        dense_line += f", dense with every parameter fine-tuned (lr {d['lr']:g}) {d['test_ppl']:.3f}"
    modules = ", ".join(f"`{m}`" for m in s["whole_modules"])
    return [
        f"### Whole-model MoE (the paper's regime): lr {w['lr']:g}, every parameter trained",
        f"`DeRSConfig(delta_type='full', modules_to_save=[{modules}])`: {w['trainable_params']:,} trainable "
        f"parameters = {w['experts_router_params']:,} (experts + router, as in the experts-only MoE) + "
        f"{w['copied_params']:,} (trainable copies of the {w['wrapped_modules']} non-FFN modules; checked equal to "
        "the dense model's parameters outside its FFNs). Learning rate chosen on the validation split (same steps "
        "and batches for every candidate; the test split is evaluated on the chosen one only):",
        _common.markdown_table(["lr", "val ppl", "chosen", "training"], search)
        + (
            "\n\nThe chosen lr is the largest of the grid, which was fixed in advance to fine-tuning learning rates "
            "and not extended: the validation ppl was still falling with the lr, so a larger one might fit the "
            "domain better, and move the weights further."
            if w.get("lr_at_grid_edge")
            else ""
        ),
        f"Compressed by `ders_peft.compress`, which carries the MoE's differing non-expert weights (here all of them) "
        "as `modules_to_save` of the compressed adapter: *of which carried* is `compression_report(small)."
        "compressed['carried']`, in the bytes on disk but not in Added Params (the carried copies replace the dense "
        f"model's modules, they add no parameter). For reference: {dense_line}. *error / delta* = ||W'_e - W_e|| / "
        "||W_e - W_dense||, *error / W* = ||W'_e - W_e|| / ||W_dense||.",
        _common.markdown_table(header, table),
    ]


def goals_markdown(rows: list[dict]) -> str:
    """The goals: one column per trained MoE, then the goals about the whole run."""
    kinds = [k for k in MOES if any(g["moe"] == k for g in rows)]
    names = list(dict.fromkeys(g["goal"] for g in rows if g["moe"] is not None))
    by = {(g["goal"], g["moe"]): g for g in rows}
    table = []
    for name in names:
        row = [name]
        for kind in kinds:
            g = by.get((name, kind))
            row.append("-" if g is None else f"{_yes(g['met'])}: {g['value']}" if g["met"] is not None else g["value"])
        table.append(row)
    text = _common.markdown_table(["goal"] + [MOES[k] for k in kinds], table)
    other = [[g["goal"], g["value"], _yes(g["met"])] for g in rows if g["moe"] is None]
    if other:
        text += "\n\n" + _common.markdown_table(["goal", "measured", "met"], other)
    met = []
    for kind in kinds:
        ok = [SHORT_GOAL[g["goal"]] for g in rows if g["moe"] == kind and g["met"] and g["goal"] in SHORT_GOAL]
        met.append(f"{MOES[kind]}: " + (", ".join(ok) if ok else "none"))
    return text + "\n\nCompression goals (within 1 %) met: " + "; ".join(met) + "."


GEN_LABEL = {
    "dense": "dense Llama",
    "moe": "uncompressed MoE (N full experts)",
    "dare_0.9": "DARE 0.9",
    "quant_2_row": "2-bit, row scales",
    "quant_4_row": "4-bit, row scales",
}


def _limit_text(result: dict) -> str:
    limit = _noise_at(dare_pairs(result), LOSSLESS_PCT)
    if limit is None:
        return ""
    t = result["trained"]
    return (
        f" (smaller than the experts-only MoE's {t['moe']['weights']['routed']['delta_rel']:.2f}, but above the "
        f"about {limit / 3:.2f} that DARE 0.9 would need: over all MoEs DARE reaches +1 % at a noise of about "
        f"{limit:.2f} x the weights, and DARE 0.9's noise is 3x the delta)"
    )


def summary(result: dict) -> list[str]:
    """The headline numbers, from the results."""
    t, base = result["trained"], result["base_model"]
    by_id = {r["id"]: r for r in result["compressed"]}
    bp = breakpoints(result)
    dare = [r for r in result["compressed"] if r["family"] == "dare" and r["setting"] == 0.9]
    lines = [
        f"- The experts-only MoE (experts + router trained) is clearly better than the dense model on the held-out "
        f"domain: test ppl "
        f"{t['moe']['test_ppl']:.2f} vs {base['test_ppl']:.2f} (dense MLPs fine-tuned for the same steps: "
        f"{t['dense_ft']['test_ppl']:.2f}). Its experts differ from the dense FFN by "
        f"{t['moe']['weights']['routed']['delta_rel']:.2f} x its norm.",
    ]
    if dare and "quant_2_row" in by_id:
        lines.append(
            f"- On this MoE DARE 0.9 costs {_pct(dare)} (mean over {len(dare)} seeds, worst in brackets), 2-bit "
            f"{by_id['quant_2_row']['delta_pct']:+.2f} % (row scales) / "
            + (f"{by_id['quant_2_group']['delta_pct']:+.2f} % (group scales)" if "quant_2_group" in by_id else "")
            + (
                ": neither goal is met; the paper found both lossless."
                if max(r["delta_pct"] for r in dare) > LOSSLESS_PCT
                and by_id["quant_2_row"]["delta_pct"] > LOSSLESS_PCT
                else "."
            )
        )
    best = []
    for family in ("magnitude", "quantize_row", "dare"):
        ok = bp.get(family, {}).get("last_lossless")
        if ok is None:
            continue
        p = next(p for p in bp[family]["points"] if p["setting"] == ok)
        share = 100 * p["bytes"] / t["moe"]["bytes_on_disk"]["total"]
        best.append(
            f"{FAMILY_LABEL[family]} {_setting_text(family, ok)} ({p['delta_pct_max']:+.2f} %, "
            f"{_fmt_bytes(p['bytes'])} = {share:.0f} % of the MoE adapter's bytes)"
        )
    if best:
        lines.append(
            "- The most compressed settings still within 1 % (worst seed): "
            + "; ".join(best)
            + f". The MoE adapter holds all {result['settings']['num_experts']} experts in fp32 "
            f"({_fmt_bytes(t['moe']['bytes_on_disk']['total'])}); a sparse delta stores an fp32 value and an int32 "
            "index per kept entry, so it is smaller in bytes only above drop rate 0.5, while quantization keeps every "
            "entry at k bits plus the scales."
        )
    if "moe_lowlr" in t:
        ctl = [r for r in result["compressed"] if r["family"] == "ctl_dare" and r["setting"] == 0.9]
        q = [r for r in result["compressed"] if r["family"] == "ctl_quantize" and r["setting"] == 2]
        lines.append(
            f"- Why DARE breaks: its noise is sqrt(p / (1 - p)) = 3 times the delta at p = 0.9, and these deltas are "
            "large. On a control MoE trained at a 10x lower learning rate (deltas "
            f"{t['moe_lowlr']['weights']['routed']['delta_rel']:.2f} x the weights, ppl "
            f"{t['moe_lowlr']['test_ppl']:.2f}) DARE 0.9 costs {_pct(ctl)}"
            + (f" and 2-bit {_pct(q)}" if q else "")
            + ": the smaller the deltas, the closer to the paper's lossless result."
        )
    if "moe_whole" in t:
        w = t["moe_whole"]
        wd = rows_of(result, "moe_whole", "dare", 0.9)
        w2 = rows_of(result, "moe_whole", "quantize_row", 2)
        w2g = rows_of(result, "moe_whole", "quantize_group", 2)
        dense_whole = t.get("dense_whole")
        lines.append(
            f"- **Whole-model MoE** (the paper's regime: every parameter trained, lr {w['lr']:g} chosen on the "
            f"validation split from {', '.join(f'{x:g}' for x in result['settings']['whole_lr_grid'])}): test ppl "
            f"{w['test_ppl']:.2f}"
            + (
                f" (a dense model with every parameter fine-tuned at that lr: {dense_whole['test_ppl']:.2f})"
                if dense_whole
                else ""
            )
            + f", deltas {w['weights']['routed']['delta_rel']:.2f} x the weights"
            + _limit_text(result)
            + f"; with every expert delta dropped {w['deltas_dropped']['test_ppl']:.2f}. DARE 0.9 costs "
            f"{_pct(wd) if wd else '-'}, 2-bit "
            f"{_pct(w2) if w2 else '-'} (row scales) / {_pct(w2g) if w2g else '-'} (group scales); its compressed "
            f"adapters also carry {_fmt_bytes(w['carried_bytes'])} of trained non-expert modules."
        )
    met = {}
    for g in result.get("goals", []):
        if g["moe"] is not None and g["goal"] in {goal for goal, _, _ in GOAL_SETTINGS}:
            met.setdefault(g["moe"], []).append(g)
    if met:
        lines.append(
            "- **Goals (within 1 % of the uncompressed ppl) per MoE**: "
            + "; ".join(
                f"{MOES[k]}: "
                + ", ".join(f"{SHORT_GOAL[g['goal']]} {_yes(g['met'])}" for g in gs if g["met"] is not None)
                for k, gs in met.items()
            )
            + "."
        )
    gen = result.get("generation", {}).get("arms", {})
    if {"dense", "moe", "dare_0.9", "quant_2_row"} <= set(gen):
        d = gen["dense"]["tokens_per_s"]
        lines.append(
            f"- Generation: uncompressed MoE {gen['moe']['tokens_per_s'] / d:.2f}x the dense model's tokens/s, DARE "
            f"0.9 {gen['dare_0.9']['tokens_per_s'] / d:.2f}x, 2-bit {gen['quant_2_row']['tokens_per_s'] / d:.2f}x: "
            "compression makes the model smaller on disk, not faster (see the generation notes)."
        )
    return lines


def _grid_text(items) -> str:
    out = []
    for method, value in items:
        if method.startswith("quantize"):
            out.append(f"{int(value)}-bit" + (" (group scales)" if method == "quantize_group" else ""))
        else:
            out.append(f"{'DARE' if method == 'dare' else method} {value:g}")
    return ", ".join(out)


def _bytes_note(result: dict) -> str:
    """What "bytes on disk" counts, and how it relates to ``compression_report().file_bytes``."""
    text = (
        "**bytes on disk** is the size of the files `save_pretrained` writes for the adapter, the model card "
        "`README.md` left out (`adapter_model.safetensors` + `adapter_config.json`: what ships on top of the dense "
        "model); `compression_report(small, saved_dir=...).file_bytes` (`compression_report.file_bytes` in the JSON) "
        "sums every file of that directory, the README included"
    )
    row = next((r for r in result["compressed"] if r["id"] == "dare_0.9"), None)
    if row is not None and "README.md" in row["bytes_on_disk"]["files"]:
        extra = row["compression_report"]["file_bytes"] - row["bytes_on_disk"]["total"]
        text += (
            f", so it is larger by the README's bytes (DARE 0.9: {row['compression_report']['file_bytes']:,} vs "
            f"{row['bytes_on_disk']['total']:,} B, {extra:,} B of README)"
        )
    return text + "; `compression_report(...).adapter_bytes` counts the adapter's tensors (no file format, no config)."


def markdown(result: dict) -> str:
    s = result["settings"]
    t = result["trained"]
    m = result["machine"]
    base = result["base_model"]
    timing = result["timings"]
    cached = result.get("cached_models", [])
    if not cached:
        cache_text = " training every model from scratch"
    else:
        cache_text = (
            f" with {len(cached)} trained models loaded from the cache ({', '.join(f'`{c}`' for c in cached)}, "
            f"{result['cached_training_seconds']:.0f} s of training when they were built, by an earlier run) and "
            + (
                "the others trained in this run"
                if len(cached) < result.get("trained_models_total", len(cached))
                else "none trained in this run"
            )
        )
    lines = [
        "# Compressing a trained vanilla-upcycled MoE (DeRS compression)",
        "",
        "**Script:** `benchmarks/compression.py` &nbsp; **Raw results:** [compression.json](compression.json) "
        "&nbsp; **Plot:** [compression.png](compression.png)",
        "",
        "```",
        f"{result['command']}        # this page",
        "python benchmarks/compression.py --quick  # smoke run (tests/test_compression_benchmark_quick.py)",
        "python benchmarks/compression.py --report-only   # re-render this page and the plot from the JSON",
        "```",
        "",
        f"Run on {m['date']} on the shared {m['cpu_count']}-core machine ({m['processor']}, torch {m['torch']} CPU, "
        f"fp32, Python {m['python']}, torch threads: {result['threads']}; load average at the end "
        f"{m['loadavg_1_5_15'][0]:g}), ders_peft at commit `{result['commit']['commit']}`"
        + (" plus uncommitted changes" if result["commit"]["dirty"] else "")
        + f" (source digest `{result.get('ders_peft_source_digest', '?')}`). "
        f"**Wall time {result['wall_seconds_total'] / 60:.1f} min**"
        + cache_text
        + f": base {timing['base_seconds']:.0f} s"
        + (
            " (cached; pretraining it the first time takes "
            f"{base['meta']['train_seconds'] + base['meta']['prep_seconds']:.0f} s more)"
            if timing["base_seconds"] < 30
            else ""
        )
        + f", data {timing['data_seconds']:.0f} s, training (or loading) + evaluating the four fixed-lr models "
        f"{timing['train_seconds']:.0f} s, the whole-model MoE's lr search + the dense whole-model fine-tuning "
        f"{timing.get('whole_seconds', 0):.0f} s, compression + evaluation of {len(result['compressed'])} settings "
        f"{timing['compress_eval_seconds']:.0f} s, generation {timing['generation_seconds']:.0f} s.",
        "",
        "## In short",
        "",
        "\n".join(summary(result)),
        "",
        "![perplexity vs added parameters and vs bytes](compression.png)",
        "",
        "## What is measured",
        "",
        "**Base.** `local_corpus.pretrained_base()` with its defaults (Llama, hidden "
        f"{base['meta']['settings']['hidden_size']}, {base['meta']['settings']['num_layers']} layers, "
        f"{base['meta']['num_parameters']:,} parameters, pretrained "
        "on pydoc text and the standard library's source outside the code domain; cached).",
        "",
        f"**Domain.** The held-apart stdlib packages ({', '.join(result['data']['packages'])}), never seen in "
        f"pretraining, split by file (seed {s['split_seed']}): train / validation / test "
        f"{result['data']['train']['files']} / {result['data']['val']['files']} / {result['data']['test']['files']} "
        f"files, {result['data']['train']['tokens']:,} / {result['data']['val']['tokens']:,} / "
        f"{result['data']['test']['tokens']:,} tokens. Perplexity is exp of the mean token loss over every test "
        "block; no choice is made on the test split (the experts-only MoEs' learning rate is the one "
        "`benchmarks/quality.py` chose on the validation split, the whole-model MoE's is chosen here on the "
        "validation split; the compression grids are fixed in advance).",
        "",
        f"**Training.** `local_corpus.pretrain` (AdamW, warm-up, cosine decay, clipping; lr {s['lr']:g}, no weight "
        f"decay): {s['steps']} steps x {s['batch_size']} x {s['seq_len']} tokens ({t['moe']['tokens']:,} tokens, "
        f"{t['moe']['tokens'] / result['data']['train']['tokens']:.2f} epochs), the same for every trained model. The "
        f"MoE is `DeRSConfig(delta_type='full', num_experts={s['num_experts']}, top_k={s['top_k']})` on every block; "
        "in the experts-only MoEs its experts and router train and nothing else: the attention, norms, embeddings "
        "and head stay those of the dense model, so the whole domain adaptation lives in the experts and what "
        "compression loses is measured against all of it. The dense comparison fine-tunes the same dense parameters "
        "(the MLPs) with the same batches and schedule. The extended MoE adds an always-on universal FFN "
        f"(`shared_expert=True`). A control MoE is trained identically at a {1 / s['control_lr_factor']:g}x lower "
        "learning rate: its deltas are smaller, which tests the explanation of where DARE breaks. The "
        "**whole-model MoE** is the paper's regime: the same upcycling, and every other module trains too "
        "(`modules_to_save=["
        + ", ".join(f"'{x}'" for x in s["whole_modules"])
        + "]`: peft trains a copy of each; the trainable count is checked against the dense model's non-FFN "
        "parameters), at a fine-tuning learning rate chosen on the validation split from "
        + ", ".join(f"{x:g}" for x in s["whole_lr_grid"])
        + " (one full training per value, same steps and batches); a dense model with every parameter fine-tuned "
        "at the chosen lr (not tuned separately, to save time) shows what the experts add. The experts-only lr is "
        "not tuned for compression; every trained model is cached on disk (training times are those of the run "
        "that trained it).",
        "",
        "**Compression.** `ders_peft.compress(moe, CompressionConfig(...))`: DARE (random drop, kept entries "
        "rescaled by 1/(1-p)) and magnitude pruning at drop rates "
        + ", ".join(f"{p:g}" for p in s["drop_rates"])
        + f" (DARE with seeds {', '.join(str(x) for x in s['dare_seeds'])} at "
        + ", ".join(f"{p:g}" for p in s["seeded_rates"])
        + ", on every MoE), quantization to "
        + ", ".join(str(k) for k in s["bits"])
        + " bits with one scale per row and to "
        + ", ".join(str(k) for k in s["group_bits"])
        + f" bits with groups of {s['group_size']}. Control MoE: "
        + _grid_text(s["control"])
        + "; whole-model MoE: "
        + _grid_text(s["whole"])
        + ". "
        + (
            "The experts-only grid is trimmed from the previous run's (2026-12-02 15:43 UTC, page of commit "
            "1bac839: it also had drop rate 0, which reproduced the uncompressed ppl exactly, the seeds 1 and 2 at "
            "DARE 0.99, 8- and 4-bit group scales, within 0.01 % of row scales, and DARE 0.99 on the extended MoE) "
            "to fit the whole-model MoE in the time budget. "
            if not result["quick"]
            else ""
        )
        + "**Added Params** is `parameter_report(small).added_params` (the paper's counting: kept values for sparse "
        "deltas, values x k/16 for k-bit ones, plus the router; modules carried by `modules_to_save` are not "
        "counted: they replace the dense model's, they add no parameter). "
        + _bytes_note(result)
        + " *error / delta* compares the compressed experts' weights with the trained ones.",
        "",
        "**Generation.** Greedy, batch of "
        f"{s['gen_prompts']} prompts ({s['gen_prompt_len']} tokens from the test split) x {s['gen_new_tokens']} new "
        "tokens, KV cache; "
        + (
            "quick mode: every arm in this process (memory not measured), "
            if result["quick"]
            else "each arm in its own fresh process that loads the dense model (and the adapter) from disk, "
        )
        + f"timed in {s['gen_runs']} interleaved rounds after a warm-up (one process generates at a time). Peak "
        "memory is the process's `VmHWM` (peak resident set, including the libraries) and its growth over the peak "
        "right after the imports.",
        "",
        "## Results",
        "",
        result["tables_markdown"],
    ]
    return "\n".join(lines)


FAMILY_STYLE = {
    "dare": ("o", "tab:blue"),
    "magnitude": ("s", "tab:orange"),
    "quantize_row": ("D", "tab:green"),
    "quantize_group": ("^", "tab:red"),
}


MOE_STYLE = {"moe": ("o", "tab:blue"), "moe_lowlr": ("s", "tab:green"), "moe_whole": ("D", "tab:red")}


def plot_moes(result: dict, fig) -> None:
    """Every trained MoE: DARE's loss vs the noise it adds (||W'_e - W_e|| / ||W_dense||), and the loss of the goal
    settings (and a few more) relative to each MoE's own uncompressed perplexity."""
    import matplotlib.ticker

    t = result["trained"]
    kinds = [k for k in MOES if k in t]
    left, right = fig.subplots(1, 2)
    for kind in kinds:
        marker, color = MOE_STYLE[kind]
        rates = sorted({r["setting"] for r in result["compressed"] if r["family"] == family_of(kind, "dare")} - {0.0})
        pts = [(p, rows_of(result, kind, "dare", p)) for p in rates]
        x = [_mean(rs, "error_rel_weight") for _, rs in pts]
        y = [statistics.fmean(r["delta_pct"] for r in rs) for _, rs in pts]
        delta = t[kind]["weights"]["routed"]["delta_rel"]
        left.plot(x, y, marker + "-", color=color, ms=6, label=f"{MOES[kind]} (deltas {delta:.2f} x W)")
        for (p, _), xi, yi in zip(pts, x, y):
            left.annotate(f"{p:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    left.axhline(LOSSLESS_PCT, color="k", lw=0.8, ls="--", label="+1 % (the goal)")
    left.set_xscale("log")
    left.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 3.0, 5.0)))
    left.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    left.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    left.set_yscale("symlog", linthresh=1.0)
    ys = [y for line in left.get_lines() for y in line.get_ydata()]
    left.set_ylim(min(0.0, min(ys, default=0.0)), max(ys, default=1.0) * 3)
    left.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:+g} %"))
    left.set_xlabel("DARE noise ||W'_e - W_e|| / ||W_dense|| (log scale)")
    left.set_ylabel("test ppl vs its own uncompressed MoE (symlog)")
    left.set_title("DARE on every trained MoE: the loss follows the noise (labels: drop rate)", fontsize=9)
    left.grid(alpha=0.3, which="major")
    left.legend(fontsize=7)
    keys = [("dare", 0.9), ("magnitude", 0.9), ("quantize_row", 2), ("quantize_group", 2), ("quantize_row", 1)]
    width = 0.8 / max(1, len(kinds))
    for i, kind in enumerate(kinds):
        marker, color = MOE_STYLE[kind]
        vals = []
        for method, setting in keys:
            rs = rows_of(result, kind, method, setting)
            vals.append(statistics.fmean(r["delta_pct"] for r in rs) if rs else math.nan)
        xs = [j + (i - (len(kinds) - 1) / 2) * width for j in range(len(keys))]
        right.bar(xs, vals, width=width, color=color, alpha=0.8, label=MOES[kind])
        for xi, v in zip(xs, vals):
            if not math.isnan(v):
                right.annotate(
                    f"{v:+.1f}",
                    (xi, v),
                    ha="center",
                    va="bottom",
                    fontsize=6,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
    right.axhline(LOSSLESS_PCT, color="k", lw=0.8, ls="--", label="+1 % (the goal)")
    right.set_yscale("symlog", linthresh=1.0)
    heights = [b.get_height() for b in right.patches if not math.isnan(b.get_height())]
    right.set_ylim(min(0.0, min(heights, default=0.0)), max(max(heights, default=1.0), LOSSLESS_PCT) * 3)
    right.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:+g} %"))
    right.set_xticks(range(len(keys)), [_setting_label(m, v) for m, v in keys], fontsize=8)
    right.set_ylabel("test ppl vs its own uncompressed MoE (symlog)")
    right.set_title("the goal settings (and magnitude 0.9, 1-bit) per MoE; DARE: mean over seeds", fontsize=9)
    right.grid(alpha=0.3, axis="y", which="both")
    right.legend(fontsize=7)


def plot(result: dict, path: Path) -> None:
    """Experts-only MoE: test perplexity vs Added Params (left) and vs bytes on disk (right), log x; first row the
    whole range (log y), second row zoomed on the lossless region (linear y, off-scale points left out); DARE: mean
    over seeds, bars min..max; one legend below. Third row, every trained MoE: DARE's loss vs its weight noise, and
    the loss at the goal settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    t = result["trained"]
    moe, dense, ft = t["moe"]["test_ppl"], result["base_model"]["test_ppl"], t["dense_ft"]["test_ppl"]
    series = {f: [p for p in family_points(result, f) if p["setting"] not in (0, 0.0)] for f in FAMILY_STYLE}
    fig = plt.figure(figsize=(13, 15.5), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[2.3, 1])
    axes = top.subplots(2, 2)
    zoom_hi = max(dense, ft) * 1.04
    for col, (xkey, xlabel) in enumerate(
        (("added_params", "Added Params (paper counting, log scale)"), ("bytes", "adapter bytes on disk (log scale)"))
    ):
        for row in (0, 1):
            ax = axes[row][col]
            ys = [moe, dense, ft]
            for family, (marker, color) in FAMILY_STYLE.items():
                pts = series[family]
                if not pts:
                    continue
                x = [p[xkey] for p in pts]
                y = [p["ppl_mean"] for p in pts]
                err = [[p["ppl_mean"] - p["ppl_min"] for p in pts], [p["ppl_max"] - p["ppl_mean"] for p in pts]]
                ax.errorbar(
                    x, y, yerr=err, fmt=marker + "-", color=color, ms=6, capsize=3, lw=1.2, label=FAMILY_LABEL[family]
                )
                below = family == "quantize_group"  # same Added Params as row scales: label it underneath
                for p, xi, yi in zip(pts, x, y):
                    if row == 1 and yi > zoom_hi:
                        continue
                    text = f"{int(p['setting'])}b" if family.startswith("quantize") else f"{p['setting']:g}"
                    ax.annotate(
                        text,
                        (xi, yi),
                        textcoords="offset points",
                        xytext=(4, -11 if below else 4),
                        fontsize=7,
                        color=color,
                    )
                ys += [p["ppl_max"] for p in pts] + [p["ppl_min"] for p in pts]
            mx = t["moe"]["added_params"] if xkey == "added_params" else t["moe"]["bytes_on_disk"]["total"]
            ax.plot([mx], [moe], "k*", ms=12, label="uncompressed MoE", zorder=5)
            ax.axhline(moe, color="k", lw=0.8, ls=":")
            ax.axhline(
                moe * (1 + LOSSLESS_PCT / 100), color="k", lw=0.7, ls="--", alpha=0.6, label="uncompressed + 1 %"
            )
            ax.axhline(dense, color="tab:gray", lw=1.2, ls="--", label="dense base model (all deltas dropped)")
            ax.axhline(ft, color="tab:purple", lw=1.0, ls="-.", label="dense, MLPs fine-tuned (same steps)")
            ax.set_xscale("log")
            if row == 0:
                ax.set_yscale("log")
                ax.set_ylim(min(ys) / 1.02, max(ys) * 1.1)
                ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
                ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.0f"))
                ax.tick_params(axis="y", which="minor", labelsize=7)
                ax.set_title("whole range (log y)", fontsize=9)
            else:
                ax.set_ylim(moe * 0.99, zoom_hi)
                ax.set_title(f"zoom: ppl up to {zoom_hi:.0f} (points above are left out)", fontsize=9)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test perplexity")
            ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    top.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    s = result["settings"]
    top.suptitle(
        f"Compressing a trained vanilla MoE (N={s['num_experts']}, top-{s['top_k']}, {s['steps']} steps on held-apart "
        "stdlib code, experts + router trained): test perplexity vs size.\nPoint labels: drop rate / bits; DARE: "
        "mean over seeds, bars min..max",
        fontsize=10,
    )
    plot_moes(result, bottom)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (< 1 min), for CI")
    parser.add_argument("--out", default=None, help="output folder (default: docs/; --quick: a new temporary folder)")
    parser.add_argument("--cache", default="~/.cache/ders_peft/base", help="cache of the base and trained models")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for training and evaluation (default 1: on a shared 2-core machine 2 can be 10x slower)",
    )
    parser.add_argument("--gen-threads", type=int, default=1, help="torch threads per generation process")
    parser.add_argument("--fresh", action="store_true", help="retrain the MoEs and the dense comparison")
    parser.add_argument("--report-only", action="store_true", help="only re-render md + png from the JSON in --out")
    parser.add_argument("--gen-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.gen_worker:
        gen_worker(json.loads(args.gen_worker))
        return None
    out = _common.output_dir(Path(args.out) if args.out else None, args.quick and not args.report_only)
    if args.report_only:
        result = json.loads((out / "compression.json").read_text())
        result["tables_markdown"] = tables(result)
        write_outputs(result, out)
        return result

    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else Settings()
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    timings = {}
    cache = Path(args.cache).expanduser()
    base, tokenizer = lc.pretrained_base(cache, **s.base, log_every=0 if args.quick else 100)
    base_dir = Path(base.name_or_path)
    base_meta = json.loads((base_dir / "ders_base.json").read_text())
    timings["base_seconds"] = time.perf_counter() - t0
    log(f"base {base_dir.name}: {base_meta['num_parameters']:,} parameters")

    t = time.perf_counter()
    blocks, data_info = prepare_data(tokenizer, s)
    base_metrics = test_metrics(base, blocks, val=True)
    timings["data_seconds"] = time.perf_counter() - t
    log(f"data {data_info}; dense base test ppl {base_metrics['test_ppl']:.3f}")

    key = hashlib.sha256(json.dumps([s.training_key(), base_dir.name], sort_keys=True).encode()).hexdigest()[:12]
    root = cache / f"compression-{key}"
    if args.fresh and root.exists():
        shutil.rmtree(root)
    t = time.perf_counter()
    models, trained = {}, {}

    def record(kind: str, model, meta: dict) -> None:
        models[kind] = model
        trained[kind] = meta | test_metrics(model, blocks, val=True)
        if not kind.startswith("dense"):
            trained[kind]["added_params"] = ders_peft.parameter_report(model).added_params
            trained[kind]["bytes_on_disk"] = dir_bytes(trained_dir(root, kind, s, meta["lr"]) / "adapter")
            trained[kind]["weights"] = delta_stats(model)
            trained[kind]["carried_bytes"] = ders_peft.compression_report(model).compressed["carried"]
        log(f"{kind}: test ppl {trained[kind]['test_ppl']:.3f}, val ppl {trained[kind]['val_ppl']:.3f}")

    for kind in FIXED_LR:
        record(kind, *trained_model(kind, root, base_dir, s, blocks, log))
    timings["train_seconds"] = time.perf_counter() - t  # loading + evaluating when cached

    t = time.perf_counter()
    log(f"whole-model MoE: learning rate from {list(s.whole_lr_grid)} on the validation split")
    record("moe_whole", *choose_whole_lr(root, base_dir, s, blocks, log))
    dropped = deltas_dropped(models["moe_whole"], base_dir)
    trained["moe_whole"]["deltas_dropped"] = test_metrics(dropped, blocks, val=True)
    dropped_ppl = trained["moe_whole"]["deltas_dropped"]["test_ppl"]
    del dropped
    log(f"whole-model MoE, every expert delta dropped: test ppl {dropped_ppl:.3f}")
    record("dense_whole", *trained_model("dense_whole", root, base_dir, s, blocks, log, lr=trained["moe_whole"]["lr"]))
    del models["dense_whole"], models["dense_ft"]
    timings["whole_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    compressed = []
    with tempfile.TemporaryDirectory(prefix="ders-compression-") as tmp:
        work = Path(tmp)
        log(f"compressing the MoE ({len(settings_grid(s))} settings)")
        for entry in settings_grid(s):
            compressed.append(run_setting(entry, models["moe"], trained["moe"]["test_ppl"], blocks, work, log))
        log(f"compressing the MoE with a universal FFN ({len(extended_grid(s))} settings)")
        for entry in extended_grid(s):
            compressed.append(
                run_setting(entry, models["moe_shared"], trained["moe_shared"]["test_ppl"], blocks, work, log)
            )
        log(f"compressing the control MoE ({len(control_grid(s))} settings)")
        for entry in control_grid(s):
            compressed.append(
                run_setting(entry, models["moe_lowlr"], trained["moe_lowlr"]["test_ppl"], blocks, work, log)
            )
        log(f"compressing the whole-model MoE ({len(whole_grid(s))} settings)")
        for entry in whole_grid(s):
            compressed.append(
                run_setting(entry, models["moe_whole"], trained["moe_whole"]["test_ppl"], blocks, work, log)
            )
        timings["compress_eval_seconds"] = time.perf_counter() - t

        t = time.perf_counter()
        arms = {}
        for name in s.gen_arms:
            arms[name] = (
                None if name == "dense" else str(root / "moe" / "adapter") if name == "moe" else str(work / name)
            )
        first = blocks["test"][:: max(1, len(blocks["test"]) // s.gen_prompts)][: s.gen_prompts]
        prompts = first[:, : s.gen_prompt_len].tolist()
        log(f"generation: {list(arms)}")
        gen = generation(arms, base_dir, prompts, s, args.gen_threads, args.quick, log)
        timings["generation_seconds"] = time.perf_counter() - t
    for name, r in gen.items():
        log(f"  {name:<12} {r['tokens_per_s']:8.1f} tokens/s, peak RSS {r['peak_rss_mib']} MiB")

    result = {
        "command": "python benchmarks/compression.py" + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "commit": git_commit(),
        "ders_peft_source_digest": library_digest(),
        "machine": _common.machine_note(),
        "threads": args.threads,
        "settings": asdict(s) | {"tokens_per_run": s.tokens_per_run},
        "base_model": {"dir": base_dir.name, "meta": base_meta, **base_metrics},
        "data": data_info,
        "trained_cache": str(root),
        "trained": trained,
        "compressed": compressed,
        "generation": {"threads": args.gen_threads, "prompts": prompts, "arms": gen},
        "timings": timings,
        "wall_seconds_total": None,
    }
    built = [(trained_dir(root, k, s, trained[k]["lr"]).name, trained[k]) for k in trained if k != "moe_whole"]
    built += [(trained_dir(root, "moe_whole", s, c["lr"]).name, c) for c in trained["moe_whole"]["lr_search"]]
    result["cached_models"] = [name for name, meta in built if meta["cached"]]
    result["cached_training_seconds"] = sum(
        meta.get("train_seconds", meta.get("seconds", 0.0)) for _, meta in built if meta["cached"]
    )
    result["trained_models_total"] = len(built)
    result["wall_seconds_total"] = time.perf_counter() - t0
    result["breakpoints"] = {
        k: {kk: vv for kk, vv in v.items() if kk != "points"} for k, v in breakpoints(result).items()
    }
    result["goals"] = goals(result)
    result["tables_markdown"] = tables(result)
    write_outputs(result, out)
    print(result["tables_markdown"])
    log(f"wrote {out / 'compression.json'}, .md, .png")
    return result


def write_outputs(result: dict, out: Path) -> None:
    _common.write_json(out / "compression.json", result)
    (out / "compression.md").write_text(markdown(result), encoding="utf-8")
    plot(result, out / "compression.png")


if __name__ == "__main__":
    main()
