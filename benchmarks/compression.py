"""Post-training compression of a trained vanilla-upcycled MoE (DeRS compression): held-out perplexity vs size.

The MoE is real: the project's pretrained small Llama (:func:`ders_peft.local_corpus.pretrained_base`, cached)
vanilla-upcycled (``DeRSConfig(delta_type="full")``, N=8, top-2, every block) and trained (experts + router) on the
held-apart stdlib code domain (:func:`~ders_peft.local_corpus.code_domain_files`, split by file into train /
validation / test) until it is clearly better there than the dense model. A dense model fine-tuned on the same
parameters for the same steps is trained beside it, and a second MoE with a universal FFN (``shared_expert=True``) for
extended compression. The trained models are cached on disk, so a rerun only compresses, evaluates and times.

Then :func:`ders_peft.compress` turns the MoE into dense model + compressed deltas: DARE and magnitude pruning at
0.2 ... 0.99 (DARE over several seeds at 0.9 / 0.99), 8 ... 1-bit quantization with one scale per row and with group
scales; on the extended MoE a few settings with the universal FFN compressed and kept whole. For every setting: test
perplexity (exp of the mean token loss on the test split; nothing is chosen on it), Added Params
(:func:`ders_peft.parameter_report`, the paper's counting), bytes of the saved adapter on disk,
:func:`ders_peft.compression_report`, and how far the compressed expert weights are from the trained ones. Finally
greedy generation tokens/s and peak resident memory (``VmHWM`` of a fresh process per arm, arms timed in interleaved
rounds) of the dense model, the uncompressed MoE and three compressed ones.

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
    drop_rates: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.99)
    dare_seeds: tuple[int, ...] = (0, 1, 2)
    seeded_rates: tuple[float, ...] = (0.9, 0.99)  # DARE rates run with every seed of dare_seeds
    bits: tuple[int, ...] = (8, 4, 3, 2, 1)
    group_size: int = 64  # the "group scales" variant; the other has one scale per row
    extended: tuple[tuple[str, float], ...] = (("dare", 0.9), ("dare", 0.99), ("quantize", 2), ("quantize", 1))
    control_lr_factor: float = 0.1  # the control MoE: the same training at a 10x lower learning rate
    control: tuple[tuple[str, float], ...] = (
        ("dare", 0.9),
        ("dare", 0.99),
        ("magnitude", 0.9),
        ("quantize", 2),
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
    group_size=16,
    extended=(("dare", 0.9), ("quantize", 2)),
    control=(("dare", 0.9), ("quantize", 2)),
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


def moe_config(s: Settings, shared: bool) -> ders_peft.DeRSConfig:
    return ders_peft.DeRSConfig(
        target_modules=["mlp"],
        num_experts=s.num_experts,
        top_k=s.top_k,
        delta_type="full",
        shared_expert=shared,
        seed=s.seed,
        task_type="CAUSAL_LM",
    )


TRAINED = {
    "moe": "Vanilla MoE (N full experts + router trained)",
    "moe_shared": "Vanilla MoE + universal FFN (extended)",
    "dense_ft": "Dense, MLPs fine-tuned (same steps)",
    "moe_lowlr": "Control: vanilla MoE, learning rate x0.1",
}


def trained_dir(root: Path, kind: str, s: Settings) -> Path:
    return root / (f"moe_lr_x{s.control_lr_factor:g}" if kind == "moe_lowlr" else kind)


def build_trainable(kind: str, base_dir: Path, s: Settings) -> torch.nn.Module:
    """A fresh model of ``kind`` ready to train: the MoEs train experts + router; ``dense_ft`` trains the same
    dense parameters (the MLPs) in place."""
    from peft import get_peft_model

    base = load_base(base_dir)
    if kind == "dense_ft":
        for name, param in base.named_parameters():
            param.requires_grad_(".mlp." in name)
        return base
    return get_peft_model(base, moe_config(s, shared=kind == "moe_shared"))


def load_trained(kind: str, path: Path, base_dir: Path) -> torch.nn.Module:
    if kind == "dense_ft":
        return load_base(path / "model")
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(base_dir), path / "adapter").eval()


def trained_model(kind: str, root: Path, base_dir: Path, s: Settings, blocks: dict, log) -> tuple:
    """The trained model of ``kind`` from the cache, or trained now and cached (atomically); returns it and its
    training record (steps, tokens, seconds, losses)."""
    final = trained_dir(root, kind, s)
    meta_path = final / "train.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        log(f"{kind}: cached ({meta['train_seconds']:.0f} s of training when built)")
        return load_trained(kind, final, base_dir), meta | {"cached": True}
    model = build_trainable(kind, base_dir, s)
    log(f"{kind}: training {s.steps} steps x {s.batch_size} x {s.seq_len} tokens")
    start = time.perf_counter()
    losses = lc.pretrain(
        model,
        blocks["train"],
        steps=s.steps,
        batch_size=s.batch_size,
        lr=s.lr * (s.control_lr_factor if kind == "moe_lowlr" else 1.0),
        seed=s.seed,
        weight_decay=0.0,
        log_every=0 if s.steps < 50 else 100,
    )
    seconds = time.perf_counter() - start
    meta = {
        "lr": s.lr * (s.control_lr_factor if kind == "moe_lowlr" else 1.0),
        "steps": s.steps,
        "tokens": s.tokens_per_run,
        "train_seconds": seconds,
        "tokens_per_s": s.tokens_per_run / seconds,
        "threads": torch.get_num_threads(),
        "train_loss_first": losses[0],
        "train_loss_last10": statistics.fmean(losses[-10:]),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "commit": git_commit(),
    }
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{kind}-", dir=root))
    try:
        model.save_pretrained(tmp / ("model" if kind == "dense_ft" else "adapter"))
        (tmp / "train.json").write_text(json.dumps(meta, indent=2) + "\n")  # last: marks the directory complete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{kind}: trained in {seconds:.0f} s ({meta['tokens_per_s']:.0f} tokens/s)")
    return load_trained(kind, final, base_dir), meta | {"cached": False}


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
        for k in s.bits:
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


def control_grid(s: Settings) -> list[dict]:
    """The control MoE's settings (DARE with every seed at the rates of ``seeded_rates``)."""
    grid = []
    for method, value in s.control:
        seeds = s.dare_seeds if method == "dare" and value in s.seeded_rates else (s.dare_seeds[0],)
        for seed in seeds:
            if method == "quantize":
                kw = {"method": method, "bits": int(value)}
            else:
                kw = {"method": method, "drop_rate": value} | ({"seed": seed} if method == "dare" else {})
            sid = f"ctl_{method}_{value:g}" + (f"_s{seed}" if seed != s.dare_seeds[0] else "")
            entry = {"id": sid, "family": f"ctl_{method}", "setting": value, "seed": seed, "kwargs": kw}
            grid.append(entry | {"show_seed": seed != s.dare_seeds[0]})
    return grid


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


def _status_mib(field_name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


class GenArm:
    """One generation arm, loaded once (the dense model from disk, plus the adapter if any); ``run()`` times one
    greedy generation of ``new_tokens`` for every prompt (one batch)."""

    def __init__(self, spec: dict) -> None:
        self.rss_imports = _status_mib("VmHWM")
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
        peak = _status_mib("VmHWM") if own_process else None
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
    arm = GenArm(spec)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            print(json.dumps(arm.run()), flush=True)
        elif line.strip() == "summary":
            print(json.dumps(arm.summary(own_process=True)), flush=True)
            return


class _GenProcess:
    def __init__(self, name: str, spec: dict) -> None:
        self.name = name
        cmd = [sys.executable, str(Path(__file__).resolve()), "--gen-worker", json.dumps(spec)]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )

    def expect(self, what: str | None = None) -> str:
        line = self.proc.stdout.readline()
        if not line or (what and line.strip() != what):
            self.proc.kill()
            err = self.proc.stderr.read()[-3000:]
            raise RuntimeError(f"generation arm {self.name!r} failed (got {line!r}):\n{err}")
        return line

    def ask(self, command: str):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self.expect())


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
    procs: dict[str, _GenProcess] = {}
    try:
        for name, adapter in arms.items():  # started together (imports overlap), then timed one at a time
            procs[name] = _GenProcess(name, spec | {"adapter_dir": adapter})
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


def goals(result: dict) -> list[dict]:
    by_id = {r["id"]: r for r in result["compressed"]}
    trained = result["trained"]
    rows = []
    moe, dense = trained["moe"]["test_ppl"], result["base_model"]["test_ppl"]
    rows.append(
        {
            "goal": "trained MoE clearly better than the dense model on the held-out domain",
            "value": f"test ppl {moe:.2f} vs dense {dense:.2f} ({100 * (moe / dense - 1):+.1f} %); dense MLPs "
            f"fine-tuned for the same steps: {trained['dense_ft']['test_ppl']:.2f}",
            "met": moe < dense * 0.97,
        }
    )
    dare = [r for r in result["compressed"] if r["family"] == "dare" and r["setting"] == 0.9]
    if dare:
        worst = max(r["delta_pct"] for r in dare)
        mean = statistics.fmean(r["delta_pct"] for r in dare)
        rows.append(
            {
                "goal": "DARE 0.9 within 1 % of the uncompressed perplexity",
                "value": f"{mean:+.2f} % mean over {len(dare)} seeds (worst {worst:+.2f} %)",
                "met": worst <= LOSSLESS_PCT,
            }
        )
    for scales in ("row", "group"):
        r = by_id.get(f"quant_2_{scales}")
        if r is not None:
            rows.append(
                {
                    "goal": f"2-bit ({'one scale per row' if scales == 'row' else 'group scales'}) within 1 %",
                    "value": f"{r['delta_pct']:+.2f} %",
                    "met": r["delta_pct"] <= LOSSLESS_PCT,
                }
            )
    ctl = {(r["family"], r["setting"]): [] for r in result["compressed"] if r["family"].startswith("ctl_")}
    for r in result["compressed"]:
        if (r["family"], r["setting"]) in ctl:
            ctl[(r["family"], r["setting"])].append(r)
    for key, name in ((("ctl_dare", 0.9), "DARE 0.9"), (("ctl_quantize", 2), "2-bit (row scales)")):
        if ctl.get(key):
            worst = max(r["delta_pct"] for r in ctl[key])
            rows.append(
                {
                    "goal": f"(control, lr x{result['settings']['control_lr_factor']:g}) {name} within 1 %",
                    "value": f"{_pct(ctl[key])} (ppl {trained['moe_lowlr']['test_ppl']:.2f} uncompressed)",
                    "met": worst <= LOSSLESS_PCT,
                }
            )
    wall = result.get("wall_seconds_total")
    if wall is not None and not result["quick"]:
        rows.append({"goal": "full run under 30 minutes", "value": f"{wall / 60:.1f} min", "met": wall < 1800})
    return rows


def _fmt_bytes(n: float) -> str:
    for unit, div in (("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def _yes(met: bool | None) -> str:
    return {None: "-", True: "met", False: "**not met**"}[met]


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
            "control tests exactly that."
        )
    ctl = [r for r in result["compressed"] if r["family"] == "ctl_dare"]
    if ctl and "moe_lowlr" in trained:
        c = trained["moe_lowlr"]
        by_rate: dict[float, list[dict]] = {}
        for r in ctl:
            by_rate.setdefault(r["setting"], []).append(r)
        lines.append(
            f"- **Control.** The same MoE trained at lr x{result['settings']['control_lr_factor']:g} has deltas of "
            f"{c['weights']['routed']['delta_rel']:.3f} x ||W_dense|| (ppl {c['test_ppl']:.2f}, still "
            f"{100 * (1 - c['test_ppl'] / dense_ppl):.1f} % below the dense model). DARE on it: "
            + ", ".join(
                f"{p:g}: {_pct(rs)}, noise {_mean(rs, 'error_rel_weight'):.2f} x ||W_dense||"
                for p, rs in by_rate.items()
            )
            + ". The sqrt(p / (1 - p)) factor is the same; what changes is the size of the delta it multiplies."
        )
        pairs = [(p["error_rel_weight"], p["delta_pct_mean"], "") for p in dare.values()]
        pairs += [
            (_mean(rs, "error_rel_weight"), statistics.fmean(r["delta_pct"] for r in rs), " c")
            for rs in by_rate.values()
        ]
        pairs.sort()
        limit = _noise_at(pairs, LOSSLESS_PCT)
        monotone = all(a[1] <= b[1] for a, b in zip(pairs, pairs[1:]))
        text = (
            "- Sorted by that noise (||W'_e - W_e|| / ||W_dense||), the DARE points of both MoEs (c = control)"
            + (" line up: " if monotone else ": ")
            + ", ".join(f"{n:.2f}{tag} -> {pct:+.1f} %" for n, pct, tag in pairs)
            + (
                ". What decides is the noise relative to the weights, whichever MoE it comes from"
                if monotone
                else ". The loss does not follow the noise alone"
            )
        )
        if limit is not None:
            text += (
                f"; 1 % is reached at about {limit:.2f} x ||W_dense||. With DARE 0.9's factor of 3, deltas would have "
                f"to be below about {limit / 3:.2f} x ||W_dense|| for DARE 0.9 to stay within 1 % (this MoE: "
                f"{delta_rel:.2f}, the control: {c['weights']['routed']['delta_rel']:.2f})"
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
                f"lr {r.get('lr', s['lr']):g}, {r['steps']} steps, {r['tokens']:,} tokens, {r['train_seconds']:.0f} s",
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
    main = [r for r in result["compressed"] if not r["family"].startswith(("ext_", "ctl_"))]
    first_seed = [r for r in main if r["seed"] in (None, s["dare_seeds"][0]) or r["family"] != "dare"]
    parts += [
        f"### Compressed MoE (N={s['num_experts']}, top-{s['top_k']}); dense base: ppl {base['test_ppl']:.3f}",
        "DARE rows: seed "
        + str(s["dare_seeds"][0])
        + " (the other seeds are in the next table). *error / delta* = ||W'_e - W_e|| / ||W_e - W_dense||. Drop rate "
        "0 is stored in the sparse format (an fp32 value and an int32 index per entry): twice the vanilla MoE's "
        "bytes, and the paper's counting (N P (1 - p) values) is above vanilla's (N - 1) P until p > 1/N.",
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
    ctl_rows = control_rows(result)
    if ctl_rows:
        c = t["moe_lowlr"]
        parts += [
            f"### Control: the same MoE trained at a {1 / s['control_lr_factor']:g}x lower learning rate "
            "(smaller deltas)",
            f"Trained MoE: ppl {moe['test_ppl']:.3f}, ||W_e - W_dense|| / ||W_dense|| = "
            f"{moe['weights']['routed']['delta_rel']:.3f}; control (lr {c['lr']:g}): ppl {c['test_ppl']:.3f}, "
            f"{c['weights']['routed']['delta_rel']:.3f}. Each column is relative to its own uncompressed MoE; DARE: "
            "mean over seeds (worst). *error / W* = ||W'_e - W_e|| / ||W_dense||.",
            _common.markdown_table(
                [
                    "setting",
                    "MoE: vs uncompressed",
                    "MoE: error / W",
                    "control: vs uncompressed",
                    "control: error / W",
                ],
                ctl_rows,
            ),
        ]
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
    goal_rows = [[g["goal"], g["value"], _yes(g["met"])] for g in result["goals"]]
    parts += ["### Goals", _common.markdown_table(["goal", "measured", "met"], goal_rows)]
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


def control_rows(result: dict) -> list[list[str]]:
    """Per control setting: the trained MoE's and the control MoE's loss and weight error, side by side."""
    out = []
    ctl = [r for r in result["compressed"] if r["family"].startswith("ctl_")]
    for key in dict.fromkeys((r["family"], r["setting"]) for r in ctl):
        family, setting = key
        mine = [r for r in ctl if (r["family"], r["setting"]) == key]
        name = family.removeprefix("ctl_")
        main_family = "quantize_row" if name == "quantize" else name
        theirs = [r for r in result["compressed"] if r["family"] == main_family and r["setting"] == setting]
        seeds = {r["seed"] for r in mine}
        theirs = [r for r in theirs if r["seed"] in seeds or r["seed"] is None]
        err = [_mean(rs, "error_rel_weight") if rs else math.nan for rs in (theirs, mine)]
        out.append(
            [
                mine[0]["label"].split(" (seed")[0],
                _pct(theirs) if theirs else "-",
                f"{err[0]:.3f}" if theirs else "-",
                _pct(mine),
                f"{err[1]:.3f}",
            ]
        )
    return out


GEN_LABEL = {
    "dense": "dense Llama",
    "moe": "uncompressed MoE (N full experts)",
    "dare_0.9": "DARE 0.9",
    "quant_2_row": "2-bit, row scales",
    "quant_4_row": "4-bit, row scales",
}


def summary(result: dict) -> list[str]:
    """The headline numbers, from the results."""
    t, base = result["trained"], result["base_model"]
    by_id = {r["id"]: r for r in result["compressed"]}
    bp = breakpoints(result)
    dare = [r for r in result["compressed"] if r["family"] == "dare" and r["setting"] == 0.9]
    lines = [
        f"- The trained MoE is clearly better than the dense model on the held-out domain: test ppl "
        f"{t['moe']['test_ppl']:.2f} vs {base['test_ppl']:.2f} (dense MLPs fine-tuned for the same steps: "
        f"{t['dense_ft']['test_ppl']:.2f}). Its experts differ from the dense FFN by "
        f"{t['moe']['weights']['routed']['delta_rel']:.2f} x its norm.",
    ]
    if dare and "quant_2_row" in by_id:
        lines.append(
            f"- **Goals not met on this MoE**: DARE 0.9 costs {_pct(dare)} (mean over {len(dare)} seeds, worst in "
            f"brackets), 2-bit {by_id['quant_2_row']['delta_pct']:+.2f} % (row scales) / "
            f"{by_id['quant_2_group']['delta_pct']:+.2f} % (group scales); the paper found both lossless."
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
    gen = result.get("generation", {}).get("arms", {})
    if {"dense", "moe", "dare_0.9", "quant_2_row"} <= set(gen):
        d = gen["dense"]["tokens_per_s"]
        lines.append(
            f"- Generation: uncompressed MoE {gen['moe']['tokens_per_s'] / d:.2f}x the dense model's tokens/s, DARE "
            f"0.9 {gen['dare_0.9']['tokens_per_s'] / d:.2f}x, 2-bit {gen['quant_2_row']['tokens_per_s'] / d:.2f}x: "
            "compression makes the model smaller on disk, not faster (see the generation notes)."
        )
    return lines


def markdown(result: dict) -> str:
    s = result["settings"]
    t = result["trained"]
    m = result["machine"]
    base = result["base_model"]
    timing = result["timings"]
    cached = all(t[k].get("cached") for k in t)
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
        + (" with the trained models cached" if cached else " training every model from scratch")
        + f": base {timing['base_seconds']:.0f} s"
        + (
            " (cached; pretraining it the first time takes "
            f"{base['meta']['train_seconds'] + base['meta']['prep_seconds']:.0f} s more)"
            if timing["base_seconds"] < 30
            else ""
        )
        + f", data {timing['data_seconds']:.0f} s, training + evaluating the trained models "
        f"{timing['train_seconds']:.0f} s, compression + evaluation of {len(result['compressed'])} settings "
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
        "block; no choice is made on the test split (the learning rate is the one `benchmarks/quality.py` chose on "
        "the validation split; the grids are fixed in advance).",
        "",
        f"**Training.** `local_corpus.pretrain` (AdamW, warm-up, cosine decay, clipping; lr {s['lr']:g}, no weight "
        f"decay): {s['steps']} steps x {s['batch_size']} x {s['seq_len']} tokens ({t['moe']['tokens']:,} tokens, "
        f"{t['moe']['tokens'] / result['data']['train']['tokens']:.2f} epochs). The MoE is "
        f"`DeRSConfig(delta_type='full', num_experts={s['num_experts']}, top_k={s['top_k']})` on every block; its "
        "experts and router train and nothing else: the attention, norms, embeddings and head stay those of the "
        "dense model, so the whole domain adaptation lives in the experts and what compression loses is measured "
        "against all of it (the paper trains the whole model; then part of the adaptation sits outside the experts "
        "and compressing them is easier). The dense comparison fine-tunes the same dense parameters (the MLPs) with "
        "the same batches and schedule. The extended MoE adds an always-on universal FFN (`shared_expert=True`). "
        f"A control MoE is trained identically at a {1 / s['control_lr_factor']:g}x lower learning rate: its deltas "
        "are smaller, which tests the explanation of where DARE breaks (its grid: "
        + ", ".join(
            f"{int(v)}-bit" if m == "quantize" else f"{m.upper() if m == 'dare' else m} {v:g}" for m, v in s["control"]
        )
        + "). The lr is not tuned for compression; every trained model is cached on disk (training times are those "
        "of the run that trained it).",
        "",
        "**Compression.** `ders_peft.compress(moe, CompressionConfig(...))`: DARE (random drop, kept entries "
        "rescaled by 1/(1-p)) and magnitude pruning at drop rates "
        + ", ".join(f"{p:g}" for p in s["drop_rates"])
        + f" (DARE with seeds {', '.join(str(x) for x in s['dare_seeds'])} at "
        + ", ".join(f"{p:g}" for p in s["seeded_rates"])
        + "), quantization to "
        + ", ".join(str(k) for k in s["bits"])
        + f" bits with one scale per row and with groups of {s['group_size']}. **Added Params** is "
        "`parameter_report(small).added_params` (the paper's counting: kept values for sparse deltas, values x k/16 "
        "for k-bit ones, plus the router); **bytes on disk** is what `save_pretrained` writes for the adapter "
        "(safetensors + config; the model card README is left out), i.e. what ships on top of the dense model. "
        "*error / delta* compares the compressed experts' weights with the trained ones.",
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


def plot(result: dict, path: Path) -> None:
    """Test perplexity vs Added Params (left) and vs bytes on disk (right), log x; top row the whole range (log y),
    bottom row zoomed on the lossless region (linear y, off-scale points left out). DARE: mean over seeds, bars
    min..max. One legend below the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    t = result["trained"]
    moe, dense, ft = t["moe"]["test_ppl"], result["base_model"]["test_ppl"], t["dense_ft"]["test_ppl"]
    series = {f: [p for p in family_points(result, f) if p["setting"] not in (0, 0.0)] for f in FAMILY_STYLE}
    fig, axes = plt.subplots(2, 2, figsize=(13, 10.5))
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
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    s = result["settings"]
    fig.suptitle(
        f"Compressing a trained vanilla MoE (N={s['num_experts']}, top-{s['top_k']}, {s['steps']} steps on held-apart "
        "stdlib code): test perplexity vs size.\nPoint labels: drop rate / bits; DARE: mean over seeds, bars "
        "min..max",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
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
    for kind in TRAINED:
        models[kind], meta = trained_model(kind, root, base_dir, s, blocks, log)
        trained[kind] = meta | test_metrics(models[kind], blocks, val=True)
        if kind != "dense_ft":
            trained[kind]["added_params"] = ders_peft.parameter_report(models[kind]).added_params
            trained[kind]["bytes_on_disk"] = dir_bytes(trained_dir(root, kind, s) / "adapter")
            trained[kind]["weights"] = delta_stats(models[kind])
        log(f"{kind}: test ppl {trained[kind]['test_ppl']:.3f}, val ppl {trained[kind]['val_ppl']:.3f}")
    timings["train_seconds"] = time.perf_counter() - t  # loading + evaluating when cached

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
