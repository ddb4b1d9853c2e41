"""D2-MoE vs expert pruning / merging / plain SVD on a small MoE pretrained from scratch on real text.

No pretrained MoE can be downloaded here, so the benchmark pretrains its own: a ``MixtralForCausalLM`` (8 experts,
top-2, independent random initialisations as Mixtral's) trained from scratch on the project's offline corpus
(:func:`ders_peft.local_corpus.prose_corpus`: pydoc text + standard-library source, split by file), cached on disk
like :func:`~ders_peft.local_corpus.pretrained_base`. Then, at 20 / 40 / 60 / 80 % compression (share of the routed
experts' parameters removed; the achieved share is reported from the stored parameters):

* D2-MoE (:func:`ders_peft.compress`, ``method="d2moe"``) with mean / frequency / Fisher base x plain / whitened SVD,
  without and with semi-dynamic base pruning (10 % of the base down projection, as the paper's table 12);
* D2-MoE's extras on the variant chosen on validation, at 40 / 60 %: ShareV (one ``V`` per matrix shared by all
  experts), adaptive ranks (appendix A.7) and trimming the deltas of the 1 / 2 least-used experts per layer (each
  trimmed run is also compared with the untrimmed variant compressed to the trimmed run's achieved ratio);
* the baselines of :mod:`ders_peft.compression.baselines`: expert pruning (NAEE-style), expert merging
  (MC-SMoE-style), plain per-expert truncated SVD.

Calibration batches come from the train split only, perplexity is measured on the held-out test split, nothing is
chosen on it. Also: calibration-size sensitivity (as the paper's table 8), "healing" (a few AdamW steps on the
compressed experts), and greedy generation tokens/s and peak resident memory (``VmHWM`` of a fresh process per arm).

    python benchmarks/d2moe.py            # full run: docs/d2moe.{json,md,png}
    python benchmarks/d2moe.py --quick    # tiny sizes, seconds, into a temporary folder (or --out DIR)
    python benchmarks/d2moe.py --report-only   # redraw md + png from the JSON in --out (default docs/)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
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
from ders_peft.compression import baselines  # noqa: E402
from ders_peft.compression.d2moe import stored_expert_params  # noqa: E402
from ders_peft.compression.moe_blocks import find_moe_blocks  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)

REPO = Path(__file__).resolve().parents[1]
_FORMAT = 1  # bump when the pretraining recipe changes (cached MoEs are then rebuilt)
_META = "ders_moe.json"  # written last: a cache directory is complete iff it holds this file


@dataclass(frozen=True)
class Settings:
    """Everything that defines the numbers; ``moe`` is the pretraining recipe (its values name the cache folder)."""

    moe: dict = field(
        default_factory=lambda: {
            "vocab_size": 2048,
            "hidden_size": 128,
            "intermediate_size": 344,
            "num_layers": 4,
            "num_experts": 8,
            "top_k": 2,
            "seq_len": 128,
            "steps": 600,
            "batch_size": 32,
            "lr": 3e-3,
            "aux_loss": 0.01,
            "max_chars": lc.DEFAULT_PRETRAIN_CHARS,
            "seed": 0,
        }
    )
    eval_blocks: int = 128  # test blocks (seq_len tokens each) for the perplexity
    val_blocks: int = 64
    eval_chars: int = 600_000  # characters read from the held-out splits (enough for eval_blocks)
    ratios: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
    merges: tuple[str, ...] = ("mean", "frequency", "fisher")
    svds: tuple[str, ...] = ("plain", "whitened")
    base_prunes: tuple[float, ...] = (0.0, 0.1)
    calib_samples: int = 256  # calibration sequences (seq_len tokens each) from the train split
    calib_sizes: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)  # table-8 analogue (chosen D2-MoE variant, 40 %)
    extras_ratios: tuple[float, ...] = (0.4, 0.6)  # ShareV / adaptive ranks / expert trimming on the chosen variant
    trims: tuple[int, ...] = (1, 2)  # trim_experts: experts per layer whose delta is dropped
    heal_ratios: tuple[float, ...] = (0.4, 0.6)
    heal_steps: int = 100
    heal_batch: int = 16
    heal_lr: float = 3e-4  # the pretraining schedule's final learning rate (peak 3e-3, cosine to 10 %)
    gen_ratios: tuple[float, ...] = (0.4, 0.6)
    gen_prompt_len: int = 32
    gen_new_tokens: int = 64
    gen_runs: int = 3


QUICK = Settings(
    moe={
        "vocab_size": 512,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_layers": 2,
        "num_experts": 4,
        "top_k": 2,
        "seq_len": 64,
        "steps": 30,
        "batch_size": 8,
        "lr": 3e-3,
        "aux_loss": 0.01,
        "max_chars": 200_000,
        "seed": 0,
    },
    eval_blocks=8,
    val_blocks=4,
    eval_chars=60_000,
    ratios=(0.4, 0.6),
    merges=("mean", "fisher"),
    svds=("plain", "whitened"),
    base_prunes=(0.0, 0.1),
    calib_samples=8,
    calib_sizes=(4, 8),
    extras_ratios=(0.4, 0.6),
    trims=(1, 2),
    heal_ratios=(0.4,),
    heal_steps=3,
    heal_batch=4,
    gen_ratios=(0.4,),
    gen_prompt_len=8,
    gen_new_tokens=8,
    gen_runs=1,
)


# ----------------------------------------------------------------------------------------------------------------
# The pretrained MoE (cached)
# ----------------------------------------------------------------------------------------------------------------


def moe_cache_name(moe: dict) -> str:
    short = {"vocab_size": "v", "hidden_size": "h", "intermediate_size": "i", "num_layers": "L", "num_experts": "E"}
    short |= {"top_k": "k", "seq_len": "t", "steps": "s", "batch_size": "b", "lr": "lr", "aux_loss": "aux"}
    short |= {"max_chars": "c", "seed": "seed"}
    parts = "-".join(f"{short[k]}{v}" for k, v in moe.items())
    return f"mixtral-{parts}-py{sys.version_info.major}{sys.version_info.minor}-f{_FORMAT}"


def mixtral_config(moe: dict, tokenizer) -> transformers.MixtralConfig:
    return transformers.MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=moe["hidden_size"],
        intermediate_size=moe["intermediate_size"],
        num_hidden_layers=moe["num_layers"],
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=moe["num_experts"],
        num_experts_per_tok=moe["top_k"],
        max_position_embeddings=max(512, moe["seq_len"]),
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        output_router_logits=True,  # load-balancing loss while pretraining; switched off in the saved config
        router_aux_loss_coef=moe["aux_loss"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def load_moe(path: Path) -> tuple[transformers.MixtralForCausalLM, transformers.PreTrainedTokenizerFast]:
    model = transformers.MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, transformers.PreTrainedTokenizerFast.from_pretrained(path)


def pretrained_moe(cache: Path, moe: dict, log) -> tuple[transformers.MixtralForCausalLM, object, dict]:
    """The MoE pretrained from scratch with recipe ``moe``: loaded from ``cache`` or trained now and cached
    (atomically: a temporary folder renamed into place once complete). Returns the model, tokenizer and record."""
    final = cache / moe_cache_name(moe)
    if (final / _META).is_file():
        meta = json.loads((final / _META).read_text())
        log(f"pretrained MoE: cached ({final.name}, {meta['train_seconds']:.0f} s of training when built)")
        return (*load_moe(final), meta | {"cached": True})
    start = time.perf_counter()
    texts = lc.prose_corpus(max_chars=moe["max_chars"], split="train", seed=moe["seed"])
    tokenizer = lc.train_tokenizer(texts, vocab_size=moe["vocab_size"], model_max_length=max(512, moe["seq_len"]))
    blocks = lc.pack_tokens(tokenizer, texts, moe["seq_len"])
    torch.manual_seed(moe["seed"])
    model = transformers.MixtralForCausalLM(mixtral_config(moe, tokenizer))
    prep = time.perf_counter() - start
    log(
        f"pretraining the MoE from scratch: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{moe['steps']} steps x {moe['batch_size']} x {moe['seq_len']} tokens ({len(blocks)} train blocks)"
    )
    losses = lc.pretrain(
        model,
        blocks,
        steps=moe["steps"],
        batch_size=moe["batch_size"],
        lr=moe["lr"],
        seed=moe["seed"],
        log_every=max(1, moe["steps"] // 12),
    )
    model.config.output_router_logits = False  # the saved model's loss is the plain LM loss
    meta = {
        "format": _FORMAT,
        "settings": moe,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "train_blocks": len(blocks),
        "train_tokens": moe["steps"] * moe["batch_size"] * moe["seq_len"],
        "epochs": moe["steps"] * moe["batch_size"] / len(blocks),
        "first_train_loss": losses[0],
        "final_train_loss": statistics.fmean(losses[-10:]),  # includes the load-balancing term
        "prep_seconds": prep,
        "train_seconds": time.perf_counter() - start - prep,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=cache))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _META).write_text(json.dumps(meta, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"pretrained MoE: trained in {meta['train_seconds']:.0f} s, cached as {final.name}")
    return (*load_moe(final), meta | {"cached": False})


# ----------------------------------------------------------------------------------------------------------------
# Data, evaluation, expert diversity
# ----------------------------------------------------------------------------------------------------------------


def prepare_data(tokenizer, s: Settings) -> tuple[dict[str, torch.Tensor], dict]:
    """Token blocks of the train split (calibration and healing) and of the held-out validation / test splits."""
    moe, blocks = s.moe, {}
    train = lc.prose_corpus(max_chars=moe["max_chars"], split="train", seed=moe["seed"])
    blocks["train"] = lc.pack_tokens(tokenizer, train, moe["seq_len"])
    for split, n in (("val", s.val_blocks), ("test", s.eval_blocks)):
        texts = lc.prose_corpus(max_chars=s.eval_chars, split=split, seed=moe["seed"])
        blocks[split] = lc.pack_tokens(tokenizer, texts, moe["seq_len"])[:n]
        if len(blocks[split]) < n:
            raise RuntimeError(f"the {split} split has only {len(blocks[split])} blocks of {moe['seq_len']} tokens")
    return blocks, {k: {"blocks": len(b), "tokens": b.numel()} for k, b in blocks.items()}


def calibration(blocks: dict, n: int, seed: int = 1) -> list[torch.Tensor]:
    """``n`` train blocks in a seeded random order (a smaller ``n`` is a prefix of a larger one's set)."""
    order = torch.randperm(len(blocks["train"]), generator=torch.Generator().manual_seed(seed))
    return list(blocks["train"][order[:n]])


def metrics(model: torch.nn.Module, blocks: dict) -> dict:
    start = time.perf_counter()
    out = {}
    for split in ("val", "test"):
        loss = lc.evaluate_loss(model, blocks[split])
        out[f"{split}_loss"], out[f"{split}_ppl"] = loss, math.exp(loss)
    return out | {"eval_seconds": time.perf_counter() - start}


def expert_diversity(model: torch.nn.Module, ratio: float = 0.4) -> dict:
    """How different the experts are, pooled over layers, per projection (gate, up, down):

    * ``pairwise_rel_distance``: mean over expert pairs of ||W_i - W_j|| / sqrt((||W_i||^2 + ||W_j||^2) / 2)
      (0: identical; sqrt(2) = 1.414: orthogonal, e.g. independent random matrices);
    * ``mean_share``: ||mean_e W_e||^2 / mean_e ||W_e||^2 (1: identical experts; 1/E: orthogonal equal-norm ones);
    * ``energy_kept_delta`` / ``energy_kept_weight``: share of the squared singular values kept by the rank D2-MoE uses
      at ``ratio`` (``rank_for_ratio``), for the deltas W_e - mean and for the weights themselves (paper figure 2).
    """
    from ders_peft.compression.svd import rank_for_ratio

    sums: dict[str, dict[str, list[float]]] = {}
    for info in find_moe_blocks(model).values():
        for proj, w in (("gate", info.gate), ("up", info.up), ("down", info.down)):
            w = w.double()
            e = w.shape[0]
            acc = sums.setdefault(proj, {k: [] for k in ("dist", "share", "kept_delta", "kept_weight")})
            norms2 = w.square().sum((1, 2))
            for i in range(e):
                for j in range(i + 1, e):
                    acc["dist"].append(float((w[i] - w[j]).norm() / ((norms2[i] + norms2[j]) / 2).sqrt()))
            mean = w.mean(0)
            acc["share"].append(float(mean.square().sum() / norms2.mean()))
            r = rank_for_ratio(e, w.shape[1], w.shape[2], ratio)
            for key, m in (("kept_delta", w - mean), ("kept_weight", w)):
                s2 = torch.linalg.svdvals(m).square()
                acc[key].append(float((s2[:, :r].sum(-1) / s2.sum(-1)).mean()))
    out = {}
    for proj, acc in sums.items():
        out[proj] = {
            "pairwise_rel_distance": statistics.fmean(acc["dist"]),
            "mean_share": statistics.fmean(acc["share"]),
            "energy_kept_delta": statistics.fmean(acc["kept_delta"]),
            "energy_kept_weight": statistics.fmean(acc["kept_weight"]),
        }
    out["all"] = {k: statistics.fmean(v[k] for v in out.values()) for k in next(iter(out.values()))}
    return out | {"rank_ratio": ratio}


def router_balance(model: torch.nn.Module, calib: list[torch.Tensor]) -> dict:
    """Share of the routed slots each expert gets on the calibration data, per layer (uniform: 1/E)."""
    from ders_peft.compression.calibration import collect_statistics
    from ders_peft.compression.d2moe import calibration_batches

    stats = collect_statistics(
        model, calibration_batches(calib), fisher=False, intermediate_gram=False, progress=False
    )
    shares = {str(i): [round(float(x), 4) for x in st.router_frequency] for i, st in stats.items()}
    flat = [x for v in shares.values() for x in v]
    return {"per_layer": shares, "min": min(flat), "max": max(flat)}


# ----------------------------------------------------------------------------------------------------------------
# Compression runs
# ----------------------------------------------------------------------------------------------------------------


def d2_id(ratio: float, merge: str, svd: str, prune: float) -> str:
    return f"d2_{merge}_{svd}_p{prune:g}_{ratio:g}"


def d2_label(merge: str, svd: str, prune: float) -> str:
    return f"D2-MoE {merge}, {svd}" + (f", base prune {prune:g}" if prune else "")


BASELINES = {"prune": "expert pruning (NAEE-style)", "merge": "expert merging (MC-SMoE-style)", "svd": "plain SVD"}
#: not one of the paper's baselines: D2-MoE's whitened SVD applied to whole experts (no base), to separate the two
ABLATIONS = {"svd_whitened": "whitened SVD, no base (ablation)"}
LABELS = BASELINES | ABLATIONS


def compress_d2(
    model,
    calib,
    *,
    ratio: float | None = None,
    rank: int | None = None,
    merge: str = "fisher",
    svd: str = "whitened",
    prune: float = 0.0,
    share_v: bool = False,
    trim: int = 0,
    adaptive: bool = False,
) -> tuple[torch.nn.Module, dict]:
    kw = {"method": "d2moe", "base_merge": merge, "svd": svd, "base_prune": prune}
    kw |= {"rank": rank} if rank is not None else {"ratio": ratio}
    kw |= {"share_v": True} if share_v else {}
    kw |= {"trim_experts": trim} if trim else {}
    kw |= {"adaptive_ranks": True} if adaptive else {}
    small = ders_peft.compress(model, ders_peft.CompressionConfig(**kw), calibration=calib, progress=False)
    stored = stored_expert_params(small)
    layers = small.config.quantization_config.layers
    return small, {"stored": stored, "ranks": compact_ranks({k: v["ranks"] for k, v in layers.items()}), "kwargs": kw}


def compact_ranks(ranks: dict) -> dict:
    """Per layer and projection: one int where every expert has the same delta rank, else the per-expert list."""
    out = {}
    for layer, per_proj in ranks.items():
        out[layer] = {}
        for proj, r in per_proj.items():
            out[layer][proj] = r[0] if isinstance(r, list) and len(set(r)) == 1 else r
    return out


def run_entry(entry: dict, model, calib, ref: dict, blocks: dict, log) -> dict:
    """Compress with one setting (``entry``: id, family, label, ratio, and method settings), evaluate, record."""
    start = time.perf_counter()
    if entry["family"] == "d2moe":
        small, info = compress_d2(model, calib, **entry["d2"])
        stored, details = info["stored"], {"ranks": info["ranks"]}
    else:
        fam, ratio = entry["family"], entry["ratio"]
        if fam in ("prune", "merge"):
            out = (baselines.prune_experts if fam == "prune" else baselines.merge_experts)(model, ratio, calib)
        else:
            out = baselines.svd_experts(model, ratio, calibration=calib if fam == "svd_whitened" else None)
        small, stored, details = out.model, out.stored, out.details
    seconds = time.perf_counter() - start
    result = {k: v for k, v in entry.items() if k != "d2"} | {"settings": entry.get("d2")}
    result |= {"stored": stored, "achieved_ratio": 1 - stored["compressed"] / stored["original"]}
    result |= {"compress_seconds": seconds, "details": _small_details(details), **metrics(small, blocks)}
    result["test_ppl_rise_pct"] = 100 * (result["test_ppl"] / ref["test_ppl"] - 1)
    log(
        f"  {result['label']:<46} req {entry['ratio']:.2f} got {result['achieved_ratio']:.3f}  test ppl "
        f"{result['test_ppl']:8.3f} ({result['test_ppl_rise_pct']:+7.2f} %)  val {result['val_ppl']:8.3f}  "
        f"({seconds:.1f} s + {result['eval_seconds']:.1f} s)"
    )
    return result


def _small_details(details: dict) -> dict:
    """Per-layer details without the long per-expert frequency lists (kept experts, groups, ranks stay)."""
    return {
        str(k): {kk: vv for kk, vv in v.items() if kk != "frequency"} if isinstance(v, dict) else v
        for k, v in details.items()
    }


def d2_grid(s: Settings) -> list[dict]:
    grid = []
    for ratio in s.ratios:
        for merge in s.merges:
            for svd in s.svds:
                for prune in s.base_prunes:
                    grid.append(
                        {
                            "id": d2_id(ratio, merge, svd, prune),
                            "family": "d2moe",
                            "variant": f"{merge}_{svd}_p{prune:g}",
                            "label": d2_label(merge, svd, prune),
                            "ratio": ratio,
                            "d2": {"ratio": ratio, "merge": merge, "svd": svd, "prune": prune},
                        }
                    )
    return grid


def baseline_grid(s: Settings) -> list[dict]:
    return [
        {"id": f"{fam}_{ratio:g}", "family": fam, "variant": fam, "label": LABELS[fam], "ratio": ratio}
        for ratio in (0.0, *s.ratios)
        for fam in LABELS
        if not (fam.startswith("svd") and ratio == 0.0)
    ]


def choose_variant(d2: list[dict], s: Settings) -> str:
    """The D2-MoE variant with the lowest mean validation perplexity over the ratios (the test split is not used)."""
    by_variant: dict[str, list[float]] = {}
    for r in d2:
        by_variant.setdefault(r["variant"], []).append(r["val_ppl"])
    return min(by_variant, key=lambda v: statistics.fmean(by_variant[v]))


EXTRAS = {"share_v": "+ ShareV", "adaptive": "+ adaptive ranks (A.7)"}


def extra_label(extra: str) -> str:
    if extra.startswith("trim"):
        k = int(extra.removeprefix("trim"))
        return f"+ trim {k} expert{'s' if k > 1 else ''} per layer"
    if extra.startswith("untrimmed"):
        k, side = extra.removeprefix("untrimmed").split("_")
        where = {"above": "just above", "below": "just below", "equal": "at"}[side]
        return f"untrimmed, achieved {where} the trim-{k} run's"
    return EXTRAS[extra]


def run_extras(model, calib, ref, blocks, s: Settings, chosen: str, cv: dict, log) -> list[dict]:
    """ShareV, adaptive ranks and expert trimming on the chosen variant ``cv`` at each ``extras_ratios`` ratio.
    After each trimmed run, the untrimmed variant at the two delta ranks whose achieved ratios bracket the trimmed
    run's (one rank apart; a single run where one lands exactly on it): the equal-size comparison interpolates
    between them (:func:`equal_size`)."""
    h, i = s.moe["hidden_size"], s.moe["intermediate_size"]
    step = (h + i) / (h * i)  # one delta rank less in every matrix of a layer adds this to the achieved ratio
    out = []
    for ratio in s.extras_ratios:
        todo = [("share_v", {"share_v": True}), ("adaptive", {"adaptive": True})]
        todo += [(f"trim{k}", {"trim": k}) for k in s.trims]
        for extra, kw in todo:
            e = {
                "id": f"d2x_{extra}_{ratio:g}",
                "family": "d2moe",
                "variant": chosen,
                "extra": extra,
                "column": ratio,
                "ratio": ratio,
                "label": f"{chosen} {extra_label(extra)}",
                "d2": cv | {"ratio": ratio} | kw,
            }
            res = run_entry(e, model, calib, ref, blocks, log)
            out.append(res)
            if extra.startswith("trim"):
                k, got = kw["trim"], res["achieved_ratio"]
                request = got  # the largest rank removing at least `got`: achieved at or just above it
                for side in ("above", "below"):
                    e = {
                        "id": f"d2x_untrimmed{k}_{side}_{ratio:g}",
                        "family": "d2moe",
                        "variant": chosen,
                        "extra": f"untrimmed{k}_{side}",
                        "column": ratio,
                        "ratio": request,
                        "label": f"{chosen} untrimmed, {side} {got:.3f}",
                        "d2": cv | {"ratio": request},
                    }
                    run = run_entry(e, model, calib, ref, blocks, log)
                    if side == "above" and abs(run["achieved_ratio"] - got) < 1e-9:
                        out.append(run | {"id": f"d2x_untrimmed{k}_equal_{ratio:g}", "extra": f"untrimmed{k}_equal"})
                        break
                    out.append(run)
                    request = max(0.0, got - step)  # one rank more everywhere: achieved just below `got`
    return out


def equal_size(result: dict, k: int, ratio: float) -> dict | None:
    """The untrimmed variant's test / val perplexity at the trim-``k`` run's achieved ratio (requested ``ratio``):
    log perplexity interpolated linearly in the achieved ratio between the two bracketing untrimmed runs (or the
    one run that lands on it). None when the runs are missing or do not bracket it."""
    x = {e["id"]: e for e in result.get("extras", [])}
    trim = x.get(f"d2x_trim{k}_{ratio:g}")
    if trim is None:
        return None
    got = trim["achieved_ratio"]
    exact = x.get(f"d2x_untrimmed{k}_equal_{ratio:g}")
    if exact:
        return {"test_ppl": exact["test_ppl"], "val_ppl": exact["val_ppl"], "achieved_ratio": got, "runs": [exact]}
    hi, lo = x.get(f"d2x_untrimmed{k}_above_{ratio:g}"), x.get(f"d2x_untrimmed{k}_below_{ratio:g}")
    if not (hi and lo) or not lo["achieved_ratio"] - 1e-9 <= got <= hi["achieved_ratio"] + 1e-9:
        return None
    span = hi["achieved_ratio"] - lo["achieved_ratio"]
    w = min(1.0, max(0.0, (got - lo["achieved_ratio"]) / span)) if span > 0 else 0.0
    out = {"achieved_ratio": got, "runs": [lo, hi]}
    for key in ("test_ppl", "val_ppl"):
        out[key] = math.exp((1 - w) * math.log(lo[key]) + w * math.log(hi[key]))
    return out


def trimmed_experts(entry: dict) -> dict[str, list[int]]:
    """Per layer, the experts whose delta is trimmed (rank 0) in a D2-MoE entry."""
    out = {}
    for layer, per_proj in entry["details"]["ranks"].items():
        r = per_proj["gate_proj"]
        out[layer] = [i for i, x in enumerate(r) if x == 0] if isinstance(r, list) else []
    return out


def rank_summary(entry: dict) -> str:
    """Delta ranks of an entry: per projection one number where every layer (and untrimmed expert) has the same,
    else the per-layer ranks; trimmed experts (rank 0) noted."""
    ranks = entry["details"]["ranks"]
    parts = []
    for proj in ("gate_proj", "up_proj", "down_proj"):
        per_layer = []
        for per_proj in ranks.values():
            r = per_proj[proj]
            per_layer.append(max(r) if isinstance(r, list) else r)
        name = proj.removesuffix("_proj")
        same = len(set(per_layer)) == 1
        parts.append(f"{name} {per_layer[0]}" if same else f"{name} {'/'.join(map(str, per_layer))}")
    text = ", ".join(parts)
    trimmed = trimmed_experts(entry)
    n = {len(v) for v in trimmed.values()}
    if n != {0}:
        text += f"; {'/'.join(str(len(v)) for v in trimmed.values()) if len(n) > 1 else n.pop()} per layer at rank 0"
    return text


# ----------------------------------------------------------------------------------------------------------------
# Healing: a few AdamW steps on the compressed experts
# ----------------------------------------------------------------------------------------------------------------


def expert_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer.mlp.experts for layer in model.model.layers]


def heal(model: torch.nn.Module, blocks: dict, s: Settings, label: str, ref: dict, log) -> dict:
    """Train only the experts modules' parameters (D2-MoE: base + low-rank factors; pruned MoE: the kept experts;
    uncompressed: all experts) for ``heal_steps`` AdamW steps on the train split; the stored parameter count is
    unchanged. Returns test / val perplexity before and after."""
    model = copy_model(model)
    before = metrics(model, blocks)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [p for m in expert_modules(model) for p in m.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    start = time.perf_counter()
    losses = lc.pretrain(
        model,
        blocks["train"],
        steps=s.heal_steps,
        batch_size=s.heal_batch,
        lr=s.heal_lr,
        seed=s.moe["seed"] + 1,
        weight_decay=0.0,
    )
    seconds = time.perf_counter() - start
    after = metrics(model, blocks)
    lost = before["test_ppl"] - ref["test_ppl"]
    result = {
        "label": label,
        "trainable_params": sum(p.numel() for p in trainable),
        "before": before,
        "after": after,
        "train_loss_first": losses[0],
        "train_loss_last10": statistics.fmean(losses[-10:]),
        "seconds": seconds,
        "recovered_share": (before["test_ppl"] - after["test_ppl"]) / lost if lost > 0 else None,
    }
    log(f"  healed {label:<40} test ppl {before['test_ppl']:.3f} -> {after['test_ppl']:.3f} ({seconds:.0f} s)")
    return result


def copy_model(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


# ----------------------------------------------------------------------------------------------------------------
# Generation: tokens/s and peak resident memory, one fresh process per arm
# ----------------------------------------------------------------------------------------------------------------



class GenArm:
    """One arm loaded from a saved model directory; ``run()`` times one greedy generation (batch 1)."""

    def __init__(self, spec: dict) -> None:
        self.rss_imports = _common.status_mb("VmRSS")
        model = transformers.AutoModelForCausalLM.from_pretrained(spec["dir"], dtype=torch.float32).eval()
        self.model, self.new_tokens = model, spec["new_tokens"]
        self.rss_loaded = _common.status_mb("VmRSS")
        self.hwm_loading = _common.status_mb("VmHWM")
        self.prompt = torch.tensor([spec["prompt"]], dtype=torch.long)
        self.kwargs = {"input_ids": self.prompt, "attention_mask": torch.ones_like(self.prompt), "do_sample": False}
        self.kwargs["pad_token_id"] = spec["pad_token_id"]
        self.times: list[float] = []
        self.out = self._generate(4)  # warm-up
        self.peak_reset = _common.reset_peak_rss()  # from here VmHWM is the peak while generating

    def _generate(self, n: int) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.generate(**self.kwargs, max_new_tokens=n, min_new_tokens=n)

    def run(self) -> float:
        start = time.perf_counter()
        self.out = self._generate(self.new_tokens)
        self.times.append(time.perf_counter() - start)
        return self.times[-1]

    def summary(self, own_process: bool) -> dict:
        new = self.out.shape[1] - self.prompt.shape[1]
        peak = _common.status_mb("VmHWM") if own_process and self.peak_reset else None
        return {
            "tokens_per_s": new / statistics.median(self.times),
            "times_s": self.times,
            "new_tokens": new,
            "rss_after_imports_mib": self.rss_imports if own_process else None,
            "rss_after_loading_mib": self.rss_loaded if own_process else None,
            "peak_rss_loading_mib": self.hwm_loading if own_process else None,
            "peak_rss_generating_mib": peak,
            "model_peak_generating_mib": None if peak is None else peak - self.rss_imports,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "generated": self.out[0, self.prompt.shape[1] :].tolist(),
        }


def greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            pad_token_id=2,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
        )
    return out[0, len(prompt) :].tolist()


def gen_worker(spec: dict) -> None:
    """Subprocess side: load one arm, warm up, then answer ``run`` and ``summary`` on stdin."""
    torch.set_num_threads(spec["threads"])
    _common.serve_arm(GenArm(spec))




def generation(arms: dict[str, Path], prompt: list[int], s: Settings, in_process: bool, log) -> dict:
    """Median tokens/s over ``gen_runs`` interleaved rounds and peak RSS of each arm (a saved model directory), each
    in its own process, timed one at a time; ``in_process`` (quick mode) loads them all here (memory not measured)."""
    spec = {"prompt": prompt, "new_tokens": s.gen_new_tokens, "threads": 1, "pad_token_id": 2}
    if in_process:
        loaded = {name: GenArm(spec | {"dir": str(d)}) for name, d in arms.items()}
        for _ in range(s.gen_runs):
            for arm in loaded.values():
                arm.run()
        return {name: arm.summary(own_process=False) for name, arm in loaded.items()}
    procs: dict[str, _common.ArmProcess] = {}
    try:
        for name, d in arms.items():
            procs[name] = _common.ArmProcess(name, str(Path(__file__).resolve()), spec | {"dir": str(d)})
            procs[name].expect("ready")  # one at a time: the loading peaks do not overlap
        for r in range(s.gen_runs):
            times = {name: proc.ask("run") for name, proc in procs.items()}
            log(f"  generation round {r + 1}/{s.gen_runs}: " + ", ".join(f"{n} {t:.2f} s" for n, t in times.items()))
        return {name: proc.ask("summary") for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.proc.kill()
            proc.proc.wait()


# ----------------------------------------------------------------------------------------------------------------
# Goals, report, plot
# ----------------------------------------------------------------------------------------------------------------


def _by_id(result: dict) -> dict[str, dict]:
    return {r["id"]: r for r in result["d2"] + result["baselines"] + result["matched"]}


def orderings(result: dict) -> dict:
    """How often the paper's orderings hold on the test split, over every other setting held fixed."""
    by_id, s = _by_id(result), result["settings"]
    merge_pairs = [("fisher", "frequency"), ("frequency", "mean"), ("fisher", "mean")]
    out: dict[str, dict] = {}
    for a, b in merge_pairs:
        if a not in s["merges"] or b not in s["merges"]:
            continue
        cases = [
            (by_id[d2_id(r, a, v, p)], by_id[d2_id(r, b, v, p)])
            for r in s["ratios"]
            for v in s["svds"]
            for p in s["base_prunes"]
        ]
        out[f"{a} <= {b}"] = {"held": sum(x["test_ppl"] <= y["test_ppl"] for x, y in cases), "of": len(cases)}
    cases = [
        (by_id[d2_id(r, m, "whitened", p)], by_id[d2_id(r, m, "plain", p)])
        for r in s["ratios"]
        for m in s["merges"]
        for p in s["base_prunes"]
    ]
    out["whitened < plain"] = {"held": sum(x["test_ppl"] < y["test_ppl"] for x, y in cases), "of": len(cases)}
    if len(s["base_prunes"]) > 1:
        p = s["base_prunes"][1]
        cases = [
            (by_id[d2_id(r, m, v, p)], by_id[d2_id(r, m, v, 0.0)])
            for r in s["ratios"]
            for m in s["merges"]
            for v in s["svds"]
        ]
        out[f"base prune {p:g} < none"] = {
            "held": sum(x["test_ppl"] < y["test_ppl"] for x, y in cases),
            "of": len(cases),
        }
    return out


def memory_falls(result: dict) -> dict[str, dict]:
    """Per compressed generation arm: how much the model's peak resident memory while generating fell below the
    uncompressed MoE's, as MiB and as a share of the uncompressed experts' fp32 bytes (to compare with the ratio)."""
    gen, by_id = result["generation"]["arms"], _by_id(result)
    base = gen.get("moe", {})
    if base.get("model_peak_generating_mib") is None:
        return {}
    expert_mib = result["moe"]["expert_params"] * 4 / 2**20
    out = {}
    for name, arm in gen.items():
        if name == "moe":
            continue
        fell = base["model_peak_generating_mib"] - arm["model_peak_generating_mib"]
        ratio = float(name.removeprefix("d2moe_"))
        out[name] = {
            "fell_mib": fell,
            "expert_mib": expert_mib,
            "fell_share": fell / expert_mib,
            "params_fell_mib": (base["parameters"] - arm["parameters"]) * 4 / 2**20,
            "achieved_ratio": by_id[f"d2_{result['chosen_variant']}_{ratio:g}"]["achieved_ratio"],
        }
    return out


def goals(result: dict) -> list[dict]:
    by_id, s, ref = _by_id(result), result["settings"], result["uncompressed"]["test_ppl"]
    chosen = result["chosen_variant"]
    out = []
    order = orderings(result)
    for key in ("fisher <= frequency", "frequency <= mean", "fisher <= mean", "whitened < plain"):
        if key in order:
            o = order[key]
            out.append(
                {
                    "goal": f"paper ordering: {key} (test ppl, every ratio / other setting)",
                    "met": o["held"] == o["of"],
                    "value": f"{o['held']} of {o['of']}",
                }
            )
    beaten = []
    for ratio in s["ratios"]:
        mine = by_id[f"d2_{chosen}_{ratio:g}"]["test_ppl"]
        for fam in BASELINES:
            beaten.append(mine < by_id[f"{fam}_{ratio:g}"]["test_ppl"])
    out.append(
        {
            "goal": f"D2-MoE ({chosen}, chosen on validation) below every baseline at each requested ratio",
            "met": all(beaten),
            "value": f"{sum(beaten)} of {len(beaten)} comparisons",
        }
    )
    matched = [r for r in result["matched"]]
    if matched:
        wins = [r["test_ppl"] < by_id[f"{r['vs']}_{r['vs_ratio']:g}"]["test_ppl"] for r in matched for _ in [0]]
        out.append(
            {
                "goal": "D2-MoE below expert pruning / merging at their achieved ratios",
                "met": all(wins),
                "value": f"{sum(wins)} of {len(wins)}",
            }
        )
    if 0.4 in s["ratios"]:
        rise = by_id[f"d2_{chosen}_0.4"]["test_ppl_rise_pct"]
        out.append(
            {
                "goal": "40 % compression: test perplexity rises < 10 % over the uncompressed MoE",
                "met": rise < 10,
                "value": f"{rise:+.2f} % ({chosen})",
            }
        )
    gen = result.get("generation", {}).get("arms", {})
    if gen and gen.get("moe", {}).get("model_peak_generating_mib") is not None:
        vals, met = [], True
        for name, fall in memory_falls(result).items():
            vals.append(
                f"{name}: peak fell {fall['fell_mib']:.1f} MiB = {fall['fell_share']:.3f} of the experts' "
                f"{fall['expert_mib']:.1f} MiB (achieved ratio {fall['achieved_ratio']:.3f})"
            )
            met &= abs(fall["fell_share"] - fall["achieved_ratio"]) <= 0.1
        out.append(
            {
                "goal": "generation peak memory falls in proportion to the ratio (fall / expert bytes within 0.1 of "
                "the achieved ratio)",
                "met": met,
                "value": "; ".join(vals),
            }
        )
    wall = result["wall_seconds_total"] - result["timings"].get("pretrain_seconds", 0.0)
    out.append(
        {"goal": "full run under 30 minutes (pretraining cached)", "met": wall < 1800, "value": f"{wall / 60:.1f} min"}
    )
    _ = ref
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _yes(met: bool | None) -> str:
    return "n/a" if met is None else ("**met**" if met else "**not met**")


def tables(result: dict) -> str:
    by_id, s, ref = _by_id(result), result["settings"], result["uncompressed"]
    ratios = s["ratios"]
    md = []
    head = ["method"] + [f"{_pct(r)}: test ppl (achieved, rise)" for r in ratios]
    rows = [["uncompressed MoE"] + [f"{ref['test_ppl']:.3f}" for _ in ratios]]
    for merge in s["merges"]:
        for svd in s["svds"]:
            for prune in s["base_prunes"]:
                cells = []
                for r in ratios:
                    e = by_id[d2_id(r, merge, svd, prune)]
                    cells.append(f"{e['test_ppl']:.3f} ({_pct(e['achieved_ratio'])}, {e['test_ppl_rise_pct']:+.1f} %)")
                name = d2_label(merge, svd, prune)
                if f"{merge}_{svd}_p{prune:g}" == result["chosen_variant"]:
                    name = f"**{name}** (chosen on val)"
                rows.append([name] + cells)
    for fam, name in LABELS.items():
        cells = []
        for r in ratios:
            e = by_id[f"{fam}_{r:g}"]
            cells.append(f"{e['test_ppl']:.3f} ({_pct(e['achieved_ratio'])}, {e['test_ppl_rise_pct']:+.1f} %)")
        rows.append([name] + cells)
    md += [
        "### Held-out test perplexity by method and compression ratio",
        "",
        "Each cell: test perplexity (achieved ratio from the stored parameters, rise over the uncompressed MoE). "
        "The requested ratio heads the column.",
        "",
        _common.markdown_table(head, rows),
        "",
    ]
    # validation perplexity (the split the variant was chosen on)
    vhead = ["D2-MoE variant"] + [f"{_pct(r)} val ppl" for r in ratios] + ["mean"]
    vrows = []
    for merge in s["merges"]:
        for svd in s["svds"]:
            for prune in s["base_prunes"]:
                vals = [by_id[d2_id(r, merge, svd, prune)]["val_ppl"] for r in ratios]
                vrows.append(
                    [d2_label(merge, svd, prune)] + [f"{v:.3f}" for v in vals] + [f"{statistics.fmean(vals):.3f}"]
                )
    md += [
        "### Validation perplexity of the D2-MoE variants (used to choose the variant for the later sections)",
        "",
        f"Uncompressed: {ref['val_ppl']:.3f}.",
        "",
        _common.markdown_table(vhead, vrows),
        "",
    ]
    if result["matched"]:
        mrows = []
        for m in result["matched"]:
            b = by_id[f"{m['vs']}_{m['vs_ratio']:g}"]
            mrows.append(
                [
                    f"{_pct(m['vs_ratio'])} requested of {BASELINES[m['vs']]}",
                    _pct(b["achieved_ratio"]),
                    f"{b['test_ppl']:.3f}",
                    _pct(m["achieved_ratio"]),
                    f"{m['test_ppl']:.3f}",
                ]
            )
        md += [
            "### D2-MoE at the baselines' achieved ratios",
            "",
            f"Pruning / merging remove whole experts (round(ratio x {s['moe']['num_experts']}) per layer), so their "
            f"achieved ratio differs from the requested one; here D2-MoE ({result['chosen_variant']}) is "
            "compressed to exactly that ratio.",
            "",
            _common.markdown_table(
                ["baseline setting", "baseline achieved", "baseline test ppl", "D2-MoE achieved", "D2-MoE test ppl"],
                mrows,
            ),
            "",
        ]
    if result.get("extras"):
        md += [extras_table(result), ""]
    cal = result["calibration_sensitivity"]
    if cal:
        tok = s["moe"]["seq_len"]
        crow = [
            [
                str(c["calib_samples"]),
                f"{c['calib_samples'] * tok:,}",
                f"{c['test_ppl']:.3f}",
                f"{c['val_ppl']:.3f}",
                f"{c['compress_seconds']:.1f}",
            ]
            for c in cal
        ]
        md += [
            "### Calibration-size sensitivity (as the paper's table 8)",
            "",
            f"D2-MoE {result['chosen_variant']} at 40 %; calibration = the first n of one seeded random order of "
            f"train blocks of {tok} tokens.",
            "",
            _common.markdown_table(["samples", "tokens", "test ppl", "val ppl", "compress s"], crow),
            "",
        ]
    heal = result["healing"]
    if heal:
        hrows = []
        for h in heal["runs"]:
            rec = "n/a" if h["recovered_share"] is None else _pct(h["recovered_share"])
            hrows.append(
                [
                    h["label"],
                    f"{h['trainable_params']:,}",
                    f"{h['before']['test_ppl']:.3f}",
                    f"{h['after']['test_ppl']:.3f}",
                    rec,
                    f"{h['seconds']:.0f}",
                ]
            )
        md += [
            "### Healing: further training of the compressed experts",
            "",
            f"{s['heal_steps']} AdamW steps (batch {s['heal_batch']} x {s['moe']['seq_len']} tokens of the train "
            f"split, peak lr {s['heal_lr']:g}, 10 % warm-up, cosine decay, no weight decay); only the experts "
            "modules train (D2-MoE: shared base + low-rank factors), so the stored size is unchanged. 'Recovered' = "
            "(ppl before - ppl after) / (ppl before - uncompressed ppl). The control row trains the uncompressed "
            "MoE's experts the same way: whatever it gains is plain extra training, not recovery.",
            "",
            _common.markdown_table(["model", "trainable", "test ppl before", "after", "recovered", "s"], hrows),
            "",
        ]
    gen = result["generation"]["arms"]
    if gen:
        grows = []
        for name, a in gen.items():
            mem = lambda k, a=a: "-" if a.get(k) is None else f"{a[k]:.0f}"  # noqa: E731
            grows.append(
                [
                    name,
                    f"{a['parameters']:,}",
                    f"{a['tokens_per_s']:.1f}",
                    mem("rss_after_imports_mib"),
                    mem("peak_rss_loading_mib"),
                    mem("peak_rss_generating_mib"),
                    mem("model_peak_generating_mib"),
                    {True: "yes", False: "**NO**"}.get(a.get("same_tokens_as_in_memory"), "-"),
                ]
            )
        md += [
            "### Generation: tokens/s and peak resident memory",
            "",
            f"Greedy, batch 1, {s['gen_new_tokens']} new tokens after a {s['gen_prompt_len']}-token test prompt, "
            f"median of {s['gen_runs']} interleaved rounds; every arm is a fresh process (1 torch thread) that "
            "imports torch / transformers / ders_peft, loads its saved model with "
            "`AutoModelForCausalLM.from_pretrained`, warms up, then resets the kernel's peak counter (`VmHWM`, "
            "clear_refs 5), so 'peak generating' is the peak while generating; 'model' subtracts the resident set "
            "after the imports.",
            "",
            _common.markdown_table(
                [
                    "arm",
                    "parameters",
                    "tokens/s",
                    "RSS after imports MiB",
                    "peak loading MiB",
                    "peak generating MiB",
                    "model (peak gen. - imports) MiB",
                    "same tokens as in memory",
                ],
                grows,
            ),
            "",
        ]
    return "\n".join(md)


def extras_rows(result: dict) -> list[tuple[float, str, dict]]:
    """(requested ratio, setting name, entry) of the extras table: per ratio the chosen variant as in the main grid,
    then each extra in run order."""
    by_id, chosen = _by_id(result), result["chosen_variant"]
    rows = []
    for ratio in result["settings"]["extras_ratios"]:
        plain = by_id.get(f"d2_{chosen}_{ratio:g}")
        if plain:
            rows.append((ratio, f"{chosen} (main grid)", plain))
        rows += [(ratio, extra_label(e["extra"]), e) for e in result["extras"] if e["column"] == ratio]
    return rows


def extras_table(result: dict) -> str:
    s, ref = result["settings"], result["uncompressed"]
    rows = []
    for ratio, name, e in extras_rows(result):
        rows.append(
            [
                _pct(ratio),
                name,
                _pct(e["achieved_ratio"]),
                f"{e['test_ppl']:.3f}",
                f"{e['test_ppl_rise_pct']:+.1f} %",
                f"{e['val_ppl']:.3f}",
                rank_summary(e),
            ]
        )
    return "\n".join(
        [
            "### D2-MoE extras",
            "",
            f"The variant chosen on validation ({result['chosen_variant']}) with each of `CompressionConfig`'s "
            "D2-MoE extras: `share_v=True` (ShareV: one V per matrix shared by all experts, from the SVD of the "
            "stacked (whitened) deltas; each expert keeps its own U, and the saved budget buys a higher rank), "
            "`adaptive_ranks=True` (appendix A.7: the same rank total spread over the layers by their delta "
            f"energy) and `trim_experts=k` for k in {list(s['trims'])} (per layer the k least-used experts on the "
            "calibration data keep no delta and compute the base alone; the other experts keep the rank of the "
            "requested ratio, so trimming removes more than requested). The rows after each trimmed run are the "
            "untrimmed variant at the two delta ranks whose achieved ratios bracket the trimmed run's: the "
            "equal-size comparison in the discussion interpolates log perplexity between them. Achieved "
            "ratio from `stored_expert_params`; rise over the uncompressed MoE's test perplexity "
            f"{ref['test_ppl']:.3f} (validation {ref['val_ppl']:.3f}). Delta ranks: per projection, one number "
            "where every layer has the same, else per layer.",
            "",
            _common.markdown_table(
                ["requested", "setting", "achieved", "test ppl", "rise", "val ppl", "delta ranks"], rows
            ),
        ]
    )


def dead_expert_note(result: dict) -> list[str]:
    """A note on experts the router (almost) never picks on the calibration data (< 1 % of the slots)."""
    per_layer = result["moe"]["router_balance"]["per_layer"]
    dead = {k: [i for i, x in enumerate(v) if x < 0.01] for k, v in per_layer.items()}
    dead = {k: v for k, v in dead.items() if v}
    if not dead:
        return []
    where = "; ".join(
        f"layer {k}: expert{'s' if len(v) > 1 else ''} {', '.join(map(str, v))}" for k, v in dead.items()
    )
    return [
        f"- The routers are partly collapsed despite the load-balancing loss: experts with under 1 % of the routed "
        f"slots on the calibration data ({where}; router table above). Expert pruning removes those first, which "
        "makes it cheap at low ratios; every method still stores (and D2-MoE still compresses) them."
    ]


def router_table(result: dict) -> str:
    per_layer = result["moe"]["router_balance"]["per_layer"]
    e = len(next(iter(per_layer.values())))
    rows = [[f"layer {k}"] + [_pct(x) for x in v] for k, v in per_layer.items()]
    return _common.markdown_table(["share of routed slots"] + [f"expert {i}" for i in range(e)], rows)


def diversity_table(result: dict) -> str:
    rows = []
    for key, name in (("diversity_init", "at initialisation"), ("diversity", "after pretraining")):
        d = result["moe"][key]
        for proj in ("gate", "up", "down"):
            v = d[proj]
            rows.append(
                [
                    name,
                    proj,
                    f"{v['pairwise_rel_distance']:.3f}",
                    f"{v['mean_share']:.3f}",
                    _pct(v["energy_kept_delta"]),
                    _pct(v["energy_kept_weight"]),
                ]
            )
    return _common.markdown_table(
        [
            "experts",
            "matrix",
            "pairwise rel. distance",
            "mean share",
            "delta energy at 40 % rank",
            "weight energy at same rank",
        ],
        rows,
    )


def markdown(result: dict) -> str:
    s, meta, ref = result["settings"], result["moe"]["meta"], result["uncompressed"]
    m, mach = s["moe"], result["machine"]
    wall = result["wall_seconds_total"] - result["timings"].get("pretrain_seconds", 0.0)
    lines = [
        "# D2-MoE vs expert pruning, merging and plain SVD on a small MoE pretrained from scratch",
        "",
        f"Produced by `{result['command']}` in {wall / 60:.1f} min (pretraining "
        + (
            "cached"
            if meta.get("cached")
            else f"not cached: +{result['timings'].get('pretrain_seconds', 0) / 60:.1f} min"
        )
        + f") on {mach['cpu_count']} CPU cores ({mach['processor']}) shared with other jobs, torch {mach['torch']}, "
        f"{result['threads']} torch thread, {mach['date']}; raw numbers in `d2moe.json`, plot `d2moe.png`. "
        "`--quick` is the CI smoke run (tiny sizes, seconds).",
        "",
        "## The MoE",
        "",
        f"No pretrained MoE can be downloaded here, so the benchmark pretrains a `MixtralForCausalLM` from scratch: "
        f"hidden {m['hidden_size']}, {m['num_layers']} layers, {m['num_experts']} experts of intermediate size "
        f"{m['intermediate_size']} (top-{m['top_k']}, load-balancing loss {m['aux_loss']:g}), vocab {m['vocab_size']} "
        f"(byte-level BPE trained on the train split), {meta['num_parameters']:,} parameters of which "
        f"{result['moe']['expert_params']:,} in the routed experts. Every expert starts from its own random "
        "initialisation (transformers' Mixtral init). Training: "
        f"{m['steps']} AdamW steps x {m['batch_size']} x {m['seq_len']} tokens ({meta['epochs']:.1f} epochs of the "
        f"train split of `local_corpus.prose_corpus`: pydoc text + standard-library source, split by file), peak lr "
        f"{m['lr']:g}, cosine decay, {meta['train_seconds'] / 60:.1f} min on 1 thread; cached under the `--cache` "
        "folder like `pretrained_base`.",
        "",
        f"Uncompressed: test perplexity **{ref['test_ppl']:.3f}**, validation {ref['val_ppl']:.3f} "
        f"({s['eval_blocks']} / {s['val_blocks']} held-out blocks of {m['seq_len']} tokens from files never trained "
        f"on). Calibration: {s['calib_samples']} train blocks ({s['calib_samples'] * m['seq_len']:,} tokens). Router "
        f"load on the calibration data: every expert gets between {_pct(result['moe']['router_balance']['min'])} and "
        f"{_pct(result['moe']['router_balance']['max'])} of the routed slots (uniform: "
        f"{_pct(1 / m['num_experts'])}).",
        "",
        router_table(result),
        "",
        "Expert diversity (pooled over layers; 'mean share' = ||mean_e W_e||^2 / mean_e ||W_e||^2, 1 for identical "
        f"experts, 1/{m['num_experts']} = {1 / m['num_experts']:.3f} for orthogonal ones; the energy columns: share "
        "of the squared singular values kept by D2-MoE's 40 % delta rank, for the deltas W_e - mean and for the "
        "weights):",
        "",
        diversity_table(result),
        "",
        "## Results",
        "",
        "Ratio = share of the routed experts' parameters removed (routers kept whole and not counted), as in the "
        "paper; the achieved ratio is computed from the stored parameters (`stored_expert_params` for D2-MoE, "
        "`baselines.expert_params` for the others). D2-MoE settings: base merged by `mean`, router `frequency` or "
        "element-wise `fisher`; deltas by `plain` or `whitened` (truncation-aware) SVD; optional semi-dynamic "
        "pruning of 10 % of the base down projection's channels (5 % static + 5 % per batch, table 12's performance "
        "setting). Baselines (`ders_peft/compression/baselines.py`): expert pruning drops the round(ratio x E) "
        "least-used experts per layer (router frequency on the same calibration data; tokens routed among the "
        "rest), expert merging forms E - round(ratio x E) groups led by the most-used experts (others join the "
        "leader with the most similar router logits) merged by frequency-weighted averaging, plain SVD factorises "
        "every expert matrix with no shared base.",
        "",
        tables(result),
        "## Goals",
        "",
        _common.markdown_table(
            ["goal", "result", "value"], [[g["goal"], _yes(g["met"]), g["value"]] for g in result["goals"]]
        ),
        "",
        "## Discussion",
        "",
        *explain(result),
        "",
        "## Notes",
        "",
        "- Nothing is chosen on the test split: the D2-MoE variant used for the extras, calibration, healing and "
        "generation sections is the one with the lowest mean validation perplexity over the ratios; the calibration "
        f"size ({s['calib_samples']} samples) was set from a first run's validation numbers (the same sweep as the "
        "calibration table).",
        "- Saving a D2-MoE model: `save_pretrained` of a model compressed from a Mixtral *loaded with "
        "`from_pretrained`* writes, by transformers' default `save_original_format=True`, the compressed experts "
        "under Mixtral's legacy key names (`block_sparse_moe.experts.base_gate`, ...), and "
        "`AutoModelForCausalLM.from_pretrained` of that folder does not map them back: every compressed tensor is "
        "reported MISSING and left uninitialised (garbage output, only a load-report warning). The benchmark saves "
        "its generation arms (the uncompressed one too, for the same loading path) with "
        "`save_original_format=False` and checks that every reloaded arm generates the in-memory model's tokens.",
        *dead_expert_note(result),
        f"- Pretraining the MoE took {meta['train_seconds'] / 60:.1f} min on 1 thread (first run only; the target "
        "was about 10 min; the 2-core machine was shared with other jobs). Tokens/s figures move by tens of percent "
        "between runs for the same reason; perplexities and parameter counts are deterministic.",
        "",
        "## Sanity checks in the run",
        "",
        *sanity_lines(result),
        "",
    ]
    return "\n".join(lines)


def _ids(entries: list[dict]) -> set[str]:
    return {e["id"] for e in entries}


def sanity_lines(result: dict) -> list[str]:
    ref = result["uncompressed"]["test_ppl"]
    out = []
    full = result["sanity"]["d2_full_rank"]
    out.append(
        f"- D2-MoE at full delta rank (mean base, plain SVD): test ppl {full['test_ppl']:.5f} vs uncompressed "
        f"{ref:.5f} (relative difference {abs(full['test_ppl'] / ref - 1):.1e})."
    )
    by_id = _by_id(result)
    for fam in ("prune", "merge"):
        e = by_id.get(f"{fam}_0")
        if e:
            out.append(
                f"- {BASELINES[fam]} at ratio 0: test ppl {e['test_ppl']:.5f} (relative difference "
                f"{abs(e['test_ppl'] / ref - 1):.1e})."
            )
    gen = result["generation"]["arms"]
    if gen:
        same = [n for n, a in gen.items() if a.get("same_tokens_as_in_memory")]
        out.append(
            f"- Generation arms reloaded from disk that generate exactly the in-memory model's tokens: "
            f"{len(same)} of {len(gen)}."
        )
    worst = max(abs(r["achieved_ratio"] - r["ratio"]) for r in result["d2"])
    out.append(
        f"- Largest |achieved - requested| ratio over the D2-MoE grid: {worst:.4f} (the rank is the largest "
        "that removes at least the requested share)."
    )
    extras = result.get("extras", [])
    if extras:
        sv = [e["achieved_ratio"] - e["ratio"] for e in extras if e["extra"] == "share_v"]
        plain = {r["ratio"]: r for r in result["d2"] if r["variant"] == result["chosen_variant"]}
        trims = [e for e in extras if e["extra"].startswith("trim") and e["ratio"] in plain]
        above = sum(e["achieved_ratio"] > plain[e["ratio"]]["achieved_ratio"] for e in trims)
        s = result["settings"]
        pairs = [(k, r) for k in s["trims"] for r in s["extras_ratios"] if f"d2x_trim{k}_{r:g}" in _ids(extras)]
        bracketed = sum(equal_size(result, k, r) is not None for k, r in pairs)
        out.append(
            f"- Extras: ShareV achieved - requested ratio {min(sv, default=0):+.4f} to {max(sv, default=0):+.4f}; "
            f"trimmed runs above the untrimmed variant's achieved ratio at the same request: {above} of "
            f"{len(trims)}; trimmed runs whose achieved ratio the two untrimmed runs bracket: {bracketed} of "
            f"{len(pairs)}."
        )
    return out


def _failures(result: dict, a: str, b: str) -> list[tuple[float, str, float, float, float]]:
    """Settings (ratio, svd, base prune, ppl with ``a``, ppl with ``b``) where D2-MoE with merge ``a`` is above
    merge ``b`` (test perplexity)."""
    by_id, s = _by_id(result), result["settings"]
    out = []
    for r in s["ratios"]:
        for v in s["svds"]:
            for p in s["base_prunes"]:
                x, y = by_id[d2_id(r, a, v, p)]["test_ppl"], by_id[d2_id(r, b, v, p)]["test_ppl"]
                if x > y:
                    out.append((r, v, p, x, y))
    return out


def _rank(entry: dict) -> int:
    """The (first layer's, first projection's, first expert's) delta or factor rank of an entry."""
    if "ranks" in entry["details"]:  # D2-MoE: {"ranks": {layer: {projection: rank or per-expert ranks}}}
        ranks = next(iter(entry["details"]["ranks"].values()))["gate_proj"]
    else:  # svd_experts: {layer: {"rank": r}}
        return int(next(iter(entry["details"].values()))["rank"])
    return int(ranks[0] if isinstance(ranks, list) else ranks)


def _rel(a: float, b: float) -> str:
    return f"{100 * (a / b - 1):+.2f} %"


def extras_reading(result: dict) -> list[str]:
    """The extras bullets: each extra against the plain chosen variant at (nearly) the same achieved ratio, on the
    test split, with how often validation orders the pair the same way."""
    extras = result.get("extras", [])
    if not extras:
        return []
    by_id, chosen = _by_id(result), result["chosen_variant"]
    x = {e["id"]: e for e in extras}
    ratios = result["settings"]["extras_ratios"]
    out, agree, pairs = [], 0, 0
    tally: dict[str, list[bool]] = {}  # extra -> [val says the extra is lower] per ratio

    def pair(extra: str, mine: dict, other: dict) -> None:
        nonlocal agree, pairs
        val_low, test_low = mine["val_ppl"] < other["val_ppl"], mine["test_ppl"] < other["test_ppl"]
        tally.setdefault(extra, []).append(val_low)
        agree += val_low == test_low
        pairs += 1

    for extra, what in (("share_v", "ShareV"), ("adaptive", "Adaptive ranks")):
        parts = []
        for r in ratios:
            mine, plain = x.get(f"d2x_{extra}_{r:g}"), by_id.get(f"d2_{chosen}_{r:g}")
            if not (mine and plain):
                continue
            pair(extra, mine, plain)
            parts.append(
                f"{_pct(r)}: {mine['test_ppl']:.2f} ({_pct(mine['achieved_ratio'])}, {rank_summary(mine)}) vs "
                f"{plain['test_ppl']:.2f} ({_pct(plain['achieved_ratio'])}, {rank_summary(plain)}), "
                f"{_rel(mine['test_ppl'], plain['test_ppl'])}"
            )
        if parts:
            same = [
                x[f"d2x_adaptive_{r:g}"]["stored"] == by_id[f"d2_{chosen}_{r:g}"]["stored"]
                for r in ratios
                if f"d2x_adaptive_{r:g}" in x and f"d2_{chosen}_{r:g}" in by_id
            ]
            note = ""
            if extra == "adaptive":
                note = (
                    " Both store the same parameters (the same rank total, moved between layers)."
                    if all(same)
                    else " The stored sizes differ (see the achieved ratios)."
                )
            elif all(v is False for v in tally.get("share_v", [])) and all(
                x[f"d2x_share_v_{r:g}"]["test_ppl"] > by_id[f"d2_{chosen}_{r:g}"]["test_ppl"]
                for r in ratios
                if f"d2x_share_v_{r:g}" in x and f"d2_{chosen}_{r:g}" in by_id
            ):
                e = result["settings"]["moe"]["num_experts"]
                unrelated = result["moe"]["diversity"]["all"]["mean_share"] < 2 / e
                note = (
                    " Higher on both splits at every ratio: the higher rank does not pay, one V having to serve the "
                    f"input row spaces of all {e} experts"
                    + (", which here share almost nothing (diversity table)." if unrelated else ".")
                )
            out.append(f"- **{what}** against the plain variant: " + "; ".join(parts) + "." + note)
    per_layer = result["moe"]["router_balance"]["per_layer"]
    for k in result["settings"]["trims"]:
        parts = []
        for r in ratios:
            mine, equal = x.get(f"d2x_trim{k}_{r:g}"), equal_size(result, k, r)
            plain = by_id.get(f"d2_{chosen}_{r:g}")
            if not (mine and equal):
                continue
            pair(f"trim{k}", mine, equal)
            runs = " and ".join(f"{u['test_ppl']:.2f} at {_pct(u['achieved_ratio'])}" for u in equal["runs"])
            text = (
                f"{_pct(r)} requested: {mine['test_ppl']:.2f} at {_pct(mine['achieved_ratio'])} achieved vs "
                f"untrimmed {equal['test_ppl']:.2f} at the same size ({runs}"
                + (", interpolated" if len(equal["runs"]) > 1 else "")
                + f"): {_rel(mine['test_ppl'], equal['test_ppl'])}"
            )
            if plain:
                text += (
                    f"; against the untrimmed run at the same request ({plain['test_ppl']:.2f} at "
                    f"{_pct(plain['achieved_ratio'])}) {_rel(mine['test_ppl'], plain['test_ppl'])}"
                )
            fewer = x.get(f"d2x_trim{k - 1}_{r:g}")
            if fewer:
                text += (
                    f", against trimming {k - 1} at the same request ({fewer['test_ppl']:.2f} at "
                    f"{_pct(fewer['achieved_ratio'])}) {_rel(mine['test_ppl'], fewer['test_ppl'])}"
                )
            parts.append(text)
        if not parts:
            continue
        trimmed = trimmed_experts(x[f"d2x_trim{k}_{ratios[0]:g}"])
        loads = [sum(per_layer[layer][i] for i in idx) for layer, idx in trimmed.items()]
        top = max(((layer, i) for layer, idx in trimmed.items() for i in idx), key=lambda li: per_layer[li[0]][li[1]])
        out.append(
            f"- **Trimming {k} expert{'s' if k > 1 else ''} per layer** (their deltas dropped: "
            + "; ".join(f"layer {layer}: {', '.join(map(str, idx))}" for layer, idx in trimmed.items())
            + f", together {_pct(min(loads))} to {_pct(max(loads))} of a layer's routed slots on the calibration "
            f"data; the busiest trimmed expert is layer {top[0]}'s expert {top[1]} with "
            f"{_pct(per_layer[top[0]][top[1]])}: `trim_experts` drops the same count in every layer, whatever the "
            "load): " + "; ".join(parts) + "."
        )
    if pairs:
        val = "; ".join(
            f"{extra_label(e).removeprefix('+ ')} lower at {sum(v)} of {len(v)} ratios" for e, v in tally.items()
        )
        keep = [extra_label(e).removeprefix("+ ") for e, v in tally.items() if all(v)]
        out.append(
            "- **Extras on validation** (the split a choice would be made on; each extra against the plain variant, "
            f"trimmed runs against the untrimmed one of equal size): {val}. The test split orders {agree} of {pairs} "
            "of these pairs the same way. A choice on validation would keep "
            + (" and ".join(keep) if keep else "none of the extras")
            + " (lower at every ratio measured)."
        )
    return out


def explain(result: dict) -> list[str]:
    """Data-driven reading of the results (every number from this run)."""
    by_id, s, ref = _by_id(result), result["settings"], result["uncompressed"]["test_ppl"]
    chosen, order = result["chosen_variant"], orderings(result)
    e = s["moe"]["num_experts"]
    div, init = result["moe"]["diversity"]["all"], result["moe"]["diversity_init"]["all"]
    unrelated = div["mean_share"] < 2 / e
    head = "The experts share almost nothing" if unrelated else "The experts share a component"
    text = (
        f"- **{head}.** Mean pairwise relative distance {div['pairwise_rel_distance']:.3f} (at initialisation "
        f"{init['pairwise_rel_distance']:.3f}; sqrt 2 = 1.414 for unrelated matrices); the element-wise mean of the "
        f"experts carries {_pct(div['mean_share'])} of an expert's squared norm (1/{e} = {_pct(1 / e)} for "
        f"unrelated matrices); the delta rank D2-MoE affords at 40 % keeps {_pct(div['energy_kept_delta'])} of the "
        f"deltas' energy and {_pct(div['energy_kept_weight'])} of the weights' at the same rank."
    )
    if unrelated:
        text += (
            " Experts trained from independent initialisations have no reason to share a coordinate system for "
            "their intermediate channels (permuting an expert's channels gives the same function), so D2-MoE's "
            "shared base captures next to nothing and the deltas are as large as the weights. The paper's premise "
            "(experts with CKA 0.3-0.5 and a strong shared component) does not hold for this MoE; an MoE upcycled "
            "from a dense model would be the opposite case."
        )
    out = [text]
    for key, o in order.items():
        text = f"- Ordering `{key}`: held in {o['held']} of {o['of']} settings"
        if o["held"] < o["of"] and " <= " in key:
            a, b = key.split(" <= ")
            fails = _failures(result, a, b)
            text += f"; fails at {len(fails)}: " + "; ".join(
                f"{_pct(r)} {v}{f', prune {p:g}' if p else ''} ({x:.2f} vs {y:.2f})" for r, v, p, x, y in fails
            )
            if all(v == "plain" for _, v, _, _, _ in fails):
                text += f" (all with plain SVD, by at most {100 * max(x / y - 1 for *_, x, y in fails):.1f} %)"
        out.append(text + ".")
    if "svd" in LABELS and 0.4 in s["ratios"]:
        d2 = by_id[f"d2_{chosen}_0.4"]
        low = by_id["svd_0.4"]
        lines = []
        for r in s["ratios"]:
            parts = [
                f"D2-MoE {by_id[f'd2_{chosen}_{r:g}']['test_ppl']:.2f}",
                f"plain SVD {by_id[f'svd_{r:g}']['test_ppl']:.2f}",
            ]
            if f"svd_whitened_{r:g}" in by_id:
                parts.append(f"whitened SVD without base {by_id[f'svd_whitened_{r:g}']['test_ppl']:.2f}")
            lines.append(f"{_pct(r)}: " + ", ".join(parts))
        svd_wins = sum(by_id[f"svd_{r:g}"]["test_ppl"] < by_id[f"d2_{chosen}_{r:g}"]["test_ppl"] for r in s["ratios"])
        abl = [r for r in s["ratios"] if f"svd_whitened_{r:g}" in by_id]
        abl_wins = sum(by_id[f"svd_whitened_{r:g}"]["test_ppl"] < by_id[f"svd_{r:g}"]["test_ppl"] for r in abl)
        white = order.get("whitened < plain", {"held": 0, "of": 0})
        out.append(
            f"- **Base or no base.** Plain SVD of the whole experts is below D2-MoE at {svd_wins} of "
            f"{len(s['ratios'])} ratios; D2-MoE's whitened SVD without the base is below plain SVD at {abl_wins} of "
            f"{len(abl)}: " + "; ".join(lines) + f". The base costs 1/{e} of the expert budget ({_pct(1 / e)} of the "
            f"parameters) whatever it captures, so at 40 % D2-MoE's deltas get rank {_rank(d2)} where the base-free "
            f"factorisation gets rank {_rank(low)}; with a base holding {_pct(div['mean_share'])} of the weights' "
            "energy that trade does not pay. Whitening (truncation-aware SVD) is below plain SVD in "
            f"{white['held']} of {white['of']} D2-MoE settings."
        )
    lines, wins, total = [], 0, 0
    for ratio in s["ratios"]:
        mine = by_id[f"d2_{chosen}_{ratio:g}"]
        pr, mg = by_id[f"prune_{ratio:g}"], by_id[f"merge_{ratio:g}"]
        wins += (mine["test_ppl"] < pr["test_ppl"]) + (mine["test_ppl"] < mg["test_ppl"])
        total += 2
        lines.append(
            f"{_pct(ratio)}: {mine['test_ppl']:.2f} vs pruning {pr['test_ppl']:.2f} / merging {mg['test_ppl']:.2f}"
        )
    matched_wins = sum(m["test_ppl"] < by_id[f"{m['vs']}_{m['vs_ratio']:g}"]["test_ppl"] for m in result["matched"])
    out.append(
        f"- **Against expert pruning and merging** D2-MoE (chosen variant, requested ratio) is lower in {wins} of "
        f"{total} comparisons: " + "; ".join(lines) + f"; at the baselines' own achieved ratios in {matched_wins} "
        f"of {len(result['matched'])} (table above). Dropping or averaging whole experts loses what they computed; "
        "averaging unrelated experts (merging) mixes unrelated functions."
    )
    if 0.4 in s["ratios"]:
        r40 = by_id[f"d2_{chosen}_0.4"]
        best40 = min((r for r in result["d2"] if r["ratio"] == 0.4), key=lambda r: r["test_ppl"])
        out.append(
            f"- **40 %**: the chosen variant's test perplexity rises {r40['test_ppl_rise_pct']:+.1f} % (goal < 10 %); "
            f"the lowest of the {len(s['merges']) * len(s['svds']) * len(s['base_prunes'])} D2-MoE variants on the "
            f"test split (reported, not chosen on) is {best40['label']} with {best40['test_ppl_rise_pct']:+.1f} %."
        )
    out += extras_reading(result)
    cal = result["calibration_sensitivity"]
    if len(cal) >= 2:
        last, prev = cal[-1], cal[-2]
        trend = "still falling" if last["val_ppl"] < prev["val_ppl"] else "flat or rising"
        out.append(
            f"- **Calibration size**: from {cal[0]['calib_samples']} to {last['calib_samples']} samples the test "
            f"perplexity goes {cal[0]['test_ppl']:.2f} -> {last['test_ppl']:.2f}; validation perplexity is {trend} "
            f"between the two largest sizes ({prev['val_ppl']:.2f} -> {last['val_ppl']:.2f})."
        )
    heal = result.get("healing", {}).get("runs", [])
    if heal:
        control = next((h for h in heal if h["label"].startswith("control")), None)
        parts = [f"{h['label']}: {h['before']['test_ppl']:.2f} -> {h['after']['test_ppl']:.2f}" for h in heal]
        text = f"- **Healing** ({s['heal_steps']} steps): " + "; ".join(parts) + "."
        if control:
            gain = control["before"]["test_ppl"] - control["after"]["test_ppl"]
            text += f" The control (uncompressed MoE, same training) changes by {-gain:+.2f}: plain extra training."
        ranked = sorted((h for h in heal if h is not control), key=lambda h: h["after"]["test_ppl"])
        text += " After healing, lowest first: " + ", ".join(
            f"{h['label']} {h['after']['test_ppl']:.2f}" for h in ranked
        )
        text += "."
        out.append(text)
    gen = result["generation"]["arms"]
    falls = memory_falls(result)
    if falls:
        base = gen["moe"]
        parts = []
        for n, f in falls.items():
            a = gen[n]
            parts.append(
                f"{n}: {a['tokens_per_s']:.1f} tokens/s ({a['tokens_per_s'] / base['tokens_per_s']:.2f}x), model "
                f"memory {a['model_peak_generating_mib']:.1f} MiB, {f['fell_mib']:.1f} MiB below the MoE where its "
                f"parameters are {f['params_fell_mib']:.1f} MiB smaller ({f['fell_share']:.3f} vs achieved ratio "
                f"{f['achieved_ratio']:.3f} of the {f['expert_mib']:.1f} MiB of experts)"
            )
        slower = [n for n in falls if gen[n]["tokens_per_s"] < base["tokens_per_s"]]
        out.append(
            f"- **Generation** (batch 1): the uncompressed MoE decodes {base['tokens_per_s']:.1f} tokens/s with "
            f"{base['model_peak_generating_mib']:.1f} MiB of model memory (peak while generating minus the resident "
            f"set after the imports) for {base['parameters'] * 4 / 2**20:.1f} MiB of fp32 parameters; "
            + "; ".join(parts)
            + ". The memory saved is the parameter bytes removed: the peak falls in proportion to the ratio of the "
            "experts, but as a share of the whole process (torch + transformers alone take "
            f"{base['rss_after_imports_mib']:.0f} MiB) or even of the model's share (a fixed ~"
            f"{base['model_peak_generating_mib'] - base['parameters'] * 4 / 2**20:.0f} MiB of buffers and allocator "
            "slack at this size) the fall is small."
            + (
                f" {', '.join(slower)} decode slower than the MoE: each token runs the shared base plus the "
                "low-rank products of its experts (more, smaller matrix products in `D2Experts`) instead of two "
                "dense experts; at this size the per-call overhead dominates, and tokens/s on the shared machine "
                "varies by tens of percent between runs."
                if slower
                else ""
            )
        )
    _ = ref
    return out


PLOT_STYLE = {
    "fisher_whitened": ("o", "tab:blue", "-"),
    "frequency_whitened": ("s", "tab:cyan", "-"),
    "mean_whitened": ("^", "tab:purple", "-"),
    "fisher_plain": ("o", "tab:blue", ":"),
    "frequency_plain": ("s", "tab:cyan", ":"),
    "mean_plain": ("^", "tab:purple", ":"),
    "prune": ("x", "tab:red", "--"),
    "merge": ("P", "tab:orange", "--"),
    "svd": ("D", "tab:brown", "--"),
    "svd_whitened": ("d", "tab:green", "-."),
}


def plot(result: dict, path: Path) -> None:
    """(a) test perplexity vs achieved ratio per method, (b) calibration size, (c) generation memory and speed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, ref = result["settings"], result["uncompressed"]["test_ppl"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.6), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    ax = axes[0]
    prune0 = s["base_prunes"][0]
    for variant, (marker, color, ls) in PLOT_STYLE.items():
        if variant in LABELS:
            rows = [r for r in result["baselines"] if r["family"] == variant and r["ratio"] > 0]
            label = LABELS[variant]
        else:
            rows = [r for r in result["d2"] if r["variant"] == f"{variant}_p{prune0:g}"]
            label = "D2-MoE " + variant.replace("_", ", ")
        if not rows:
            continue
        rows.sort(key=lambda r: r["achieved_ratio"])
        ax.plot(
            [100 * r["achieved_ratio"] for r in rows],
            [r["test_ppl"] for r in rows],
            marker=marker,
            color=color,
            ls=ls,
            label=label,
            ms=6,
        )
    chosen = [r for r in result["d2"] if r["variant"] == result["chosen_variant"]]
    chosen.sort(key=lambda r: r["achieved_ratio"])
    ax.plot(
        [100 * r["achieved_ratio"] for r in chosen],
        [r["test_ppl"] for r in chosen],
        "k*",
        ms=11,
        label=f"chosen on val: {result['chosen_variant']}",
    )
    extra_style = {"share_v": ("v", "tab:olive"), "adaptive": ("<", "tab:pink"), "trim": ("X", "tab:gray")}
    for key, (marker, color) in extra_style.items():
        rows = [e for e in result.get("extras", []) if e["extra"].startswith(key)]
        if rows:
            ax.plot(
                [100 * e["achieved_ratio"] for e in rows],
                [e["test_ppl"] for e in rows],
                marker,
                color=color,
                ms=8,
                mec="k",
                mew=0.5,
                label=f"chosen + {'trim 1 / 2 experts' if key == 'trim' else extra_label(key).removeprefix('+ ')}",
            )
    ax.axhline(ref, color="k", lw=0.8, ls=":", label="uncompressed")
    ax.axhline(ref * 1.1, color="k", lw=0.6, ls="--", alpha=0.5, label="uncompressed + 10 %")
    ax.set_yscale("log")
    ax.set_xlabel("achieved compression ratio of the routed experts (%)")
    ax.set_ylabel("held-out test perplexity (log)")
    ax.set_title(f"D2-MoE (base prune {prune0:g}; star: chosen variant) vs baselines", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    ax = axes[1]
    cal = result["calibration_sensitivity"]
    if cal:
        ax.plot([c["calib_samples"] for c in cal], [c["test_ppl"] for c in cal], "o-", color="tab:blue", label="test")
        ax.plot([c["calib_samples"] for c in cal], [c["val_ppl"] for c in cal], "s--", color="tab:gray", label="val")
        ax.set_xscale("log", base=2)
        ax.axhline(ref, color="k", lw=0.8, ls=":", label="uncompressed (test)")
        ax.legend(fontsize=8)
    ax.set_xlabel(f"calibration samples ({s['moe']['seq_len']} tokens each)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"calibration size, D2-MoE 40 % ({result['chosen_variant']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax = axes[2]
    gen = result["generation"]["arms"]
    names = list(gen)
    if names:
        mem = [gen[n]["model_peak_generating_mib"] or 0.0 for n in names]
        params = [gen[n]["parameters"] * 4 / 2**20 for n in names]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], mem, width=0.4, color="tab:blue", label="model peak RSS (MiB)")
        ax.bar([i + 0.2 for i in x], params, width=0.4, color="tab:gray", label="fp32 parameter bytes (MiB)")
        ax.set_xticks(list(x), names, fontsize=8)
        ax.set_ylabel("MiB")
        twin = ax.twinx()
        twin.plot(list(x), [gen[n]["tokens_per_s"] for n in names], "k*-", label="tokens/s")
        twin.set_ylabel("tokens/s (batch 1)")
        twin.set_ylim(0, 1.25 * max(gen[n]["tokens_per_s"] for n in names))
        ax.legend(fontsize=7, loc="upper right")
        twin.legend(fontsize=7, loc="lower left")
    ax.set_title("generation: memory and speed", fontsize=9)
    fig.suptitle(
        f"{s['moe']['num_experts']}-expert top-{s['moe']['top_k']} Mixtral pretrained from scratch on the "
        "offline corpus: post-training compression",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict, out: Path) -> None:
    _common.write_json(out / "d2moe.json", result)
    (out / "d2moe.md").write_text(markdown(result), encoding="utf-8")
    plot(result, out / "d2moe.png")


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for CI")
    parser.add_argument("--out", default=None, help="output folder (default: docs/; --quick: a new temporary folder)")
    parser.add_argument("--cache", default="~/.cache/ders_peft/base", help="cache of the pretrained MoE")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--pretrain-only", action="store_true", help="only pretrain (or load) the MoE")
    parser.add_argument("--report-only", action="store_true", help="only re-render md + png from the JSON in --out")
    parser.add_argument("--gen-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.gen_worker:
        gen_worker(json.loads(args.gen_worker))
        return None
    out = _common.output_dir(Path(args.out) if args.out else None, args.quick and not args.report_only)
    if args.report_only:
        result = json.loads((out / "d2moe.json").read_text())
        result["goals"] = goals(result)
        write_outputs(result, out)
        return result
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else Settings()
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    timings: dict[str, float] = {}
    model, tokenizer, meta = pretrained_moe(Path(args.cache).expanduser(), s.moe, log)
    timings["pretrain_seconds"] = 0.0 if meta["cached"] else meta["prep_seconds"] + meta["train_seconds"]
    if args.pretrain_only:
        return None
    t = time.perf_counter()
    blocks, data_info = prepare_data(tokenizer, s)
    ref = metrics(model, blocks)
    calib = calibration(blocks, s.calib_samples)
    torch.manual_seed(s.moe["seed"])
    init = transformers.MixtralForCausalLM(model.config)  # the pretraining's own initial weights (same seed)
    moe_info = {
        "dir": Path(model.name_or_path).name,
        "meta": meta,
        "expert_params": baselines.expert_params(model),
        "diversity": expert_diversity(model),
        "diversity_init": expert_diversity(init),
        "router_balance": router_balance(model, calib),
    }
    del init
    timings["data_seconds"] = time.perf_counter() - t
    log(
        f"data {data_info}; uncompressed test ppl {ref['test_ppl']:.3f}, val ppl {ref['val_ppl']:.3f}; "
        f"diversity {moe_info['diversity']['all']}"
    )

    t = time.perf_counter()
    full = {
        "id": "d2_full_rank",
        "family": "d2moe",
        "variant": "full_rank",
        "label": "D2-MoE full rank",
        "ratio": 0.0,
        "d2": {"rank": 10**6, "merge": "mean", "svd": "plain"},
    }
    sanity = {"d2_full_rank": run_entry(full, model, calib, ref, blocks, log)}
    log(f"D2-MoE grid ({len(d2_grid(s))} settings)")
    d2 = [run_entry(e, model, calib, ref, blocks, log) for e in d2_grid(s)]
    timings["d2_grid_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    log(f"baselines ({len(baseline_grid(s))} settings)")
    base = [run_entry(e, model, calib, ref, blocks, log) for e in baseline_grid(s)]
    timings["baselines_seconds"] = time.perf_counter() - t
    chosen = choose_variant(d2, s)
    cv = next(r["settings"] for r in d2 if r["variant"] == chosen)
    log(f"chosen D2-MoE variant (lowest mean validation ppl): {chosen}")

    t = time.perf_counter()
    matched, done = [], set()
    for r in base:
        if r["family"] != "prune" or r["ratio"] == 0 or abs(r["achieved_ratio"] - r["ratio"]) < 1e-9:
            continue
        if round(r["achieved_ratio"], 9) not in done:
            done.add(round(r["achieved_ratio"], 9))
            e = {
                "id": f"d2match_{r['ratio']:g}",
                "family": "d2moe",
                "variant": chosen,
                "ratio": r["achieved_ratio"],
                "label": f"D2-MoE {chosen} at {r['achieved_ratio']:.3f}",
                "d2": cv | {"ratio": r["achieved_ratio"]},
            }
            res = run_entry(e, model, calib, ref, blocks, log)
        matched += [res | {"vs": fam, "vs_ratio": r["ratio"]} for fam in ("prune", "merge")]
    timings["matched_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    log(f"D2-MoE extras on {chosen} at {list(s.extras_ratios)}")
    extras = run_extras(model, calib, ref, blocks, s, chosen, cv, log)
    timings["extras_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    cal = []
    for n in s.calib_sizes:
        if n == s.calib_samples and 0.4 in s.ratios:
            res = next(r for r in d2 if r["variant"] == chosen and r["ratio"] == 0.4)
        else:
            e = {
                "id": f"d2cal_{n}",
                "family": "d2moe",
                "variant": chosen,
                "ratio": 0.4,
                "label": f"calibration {n}",
                "d2": cv | {"ratio": 0.4},
            }
            res = run_entry(e, model, calibration(blocks, n), ref, blocks, log)
        cal.append(res | {"calib_samples": n})
    timings["calibration_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    small = {
        ratio: compress_d2(model, calib, **(cv | {"ratio": ratio}))[0]
        for ratio in sorted(set(s.heal_ratios) | set(s.gen_ratios))
    }
    runs = [heal(small[ratio], blocks, s, f"D2-MoE {chosen} {_pct(ratio)}", ref, log) for ratio in s.heal_ratios]
    pruned = baselines.prune_experts(model, 0.4, calib).model
    runs.append(heal(pruned, blocks, s, f"{BASELINES['prune']} 40 %", ref, log))
    low = baselines.svd_experts(model, 0.4).model
    runs.append(heal(low, blocks, s, f"{BASELINES['svd']} 40 %", ref, log))
    runs.append(heal(model, blocks, s, "control: uncompressed MoE", ref, log))
    healing = {"runs": runs}
    timings["healing_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ders-d2moe-gen-") as tmp:
        arms = {"moe": Path(tmp) / "moe"}
        model.save_pretrained(arms["moe"], save_original_format=False)  # same loading path as the D2-MoE arms
        for ratio in s.gen_ratios:
            arms[f"d2moe_{ratio:g}"] = Path(tmp) / f"d2moe_{ratio:g}"
            # save_original_format=False: transformers' default reverse key mapping would write the compressed
            # experts under Mixtral's legacy names, which from_pretrained then does not map back (see the page)
            small[ratio].save_pretrained(arms[f"d2moe_{ratio:g}"], save_original_format=False)
        prompt = blocks["test"][0, : s.gen_prompt_len].tolist()
        log(f"generation: {list(arms)}")
        gen = generation(arms, prompt, s, in_process=args.quick, log=log)
    reference = {"moe": model} | {f"d2moe_{r:g}": small[r] for r in s.gen_ratios}
    for name, a in gen.items():  # the reloaded arm must generate what the in-memory model generates
        a["same_tokens_as_in_memory"] = a["generated"] == greedy(reference[name], prompt, s.gen_new_tokens)
    for name, a in gen.items():
        log(f"  {name:<12} {a['tokens_per_s']:7.1f} tokens/s, model peak {a['model_peak_generating_mib']} MiB")
    timings["generation_seconds"] = time.perf_counter() - t

    result = {
        "command": "python benchmarks/d2moe.py" + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "machine": _common.machine_note(),
        "threads": args.threads,
        "settings": asdict(s),
        "moe": moe_info,
        "data": data_info,
        "uncompressed": ref,
        "sanity": sanity,
        "d2": d2,
        "baselines": base,
        "chosen_variant": chosen,
        "matched": matched,
        "extras": extras,
        "calibration_sensitivity": cal,
        "healing": healing,
        "generation": {"prompt": prompt, "arms": gen},
        "timings": timings,
        "wall_seconds_total": time.perf_counter() - t0,
    }
    result["goals"] = goals(result)
    write_outputs(result, out)
    for g in result["goals"]:
        log(f"goal {'MET    ' if g['met'] else 'NOT MET'} {g['goal']}: {g['value']}")
    log(f"wrote {out / 'd2moe.json'}, .md, .png")
    return result


if __name__ == "__main__":
    main()
