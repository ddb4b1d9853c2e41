"""Speed and memory of one training step: dense, LoRA, vanilla upcycling, Mixtral and DeRS arms of one Llama shape.

Three parts, every timing a median of interleaved repetitions after warm-up (arms round-robin, so load drifts on the
shared machine hit all arms alike):

1. ``layer``: one FFN layer alone, forward + backward (dense LlamaMLP, DeRS-LM fast path, DeRS-LM generic
   stacked-and-masked path, a factorised per-expert loop, vanilla DeRS "full", transformers' Mixtral block in its
   eager per-expert loop and its default experts implementation).
2. ``step``: whole-model forward + backward + AdamW step, in two groups (each with the dense arm as reference).
3. ``memory``: each arm in its own subprocess; peak RSS growth (``ru_maxrss``) from before the model is built to
   after three training steps, and from the built model to after the steps.

Usage: ``python benchmarks/train_step.py [--quick] [--out-dir DIR] [--threads 1]``. Writes
``benchmarks_train_step.json``, ``benchmarks_train_step_tables.md`` and ``benchmarks_train_step.png`` into the
output directory (default ``docs/``; ``--quick`` without ``--out-dir``: a new temporary folder).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import ders_peft  # noqa: E402
from ders_peft import functional  # noqa: E402
from ders_peft.layer import DeRSLayer  # noqa: E402
from ders_peft.routing import route  # noqa: E402

transformers.logging.set_verbosity_error()


@dataclass(frozen=True)
class Shape:
    hidden: int = 512
    intermediate: int = 1408
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 2048
    seq: int = 256
    batch: int = 4
    layer_tokens: int = 2048


QUICK_SHAPE = Shape(
    hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=256, seq=32, batch=2, layer_tokens=128
)


@dataclass(frozen=True)
class Arm:
    """One configuration: ``kind`` in dense / lora / ders / mixtral, with its settings."""

    name: str
    kind: str
    num_experts: int = 4
    top_k: int = 2
    delta_type: str = "lowrank"
    rank: int = 4
    sparse_rate: float = 0.9999
    shared_expert: bool = False
    train_base: bool = True
    lora_rank: int = 0
    cpu_kernels: bool = False  # ders_peft's compiled CPU kernels on (ders_peft.enable_cpu_kernels)
    extra: dict = field(default_factory=dict, hash=False, compare=False)


def ders_arm(delta_type: str, n: int = 4, k: int = 2, rank: int = 4, rate: float = 0.9999, shared: bool = False,
             train_base: bool = True, cpu_kernels: bool = False) -> Arm:  # fmt: skip
    tag = {"lowrank": f"lm_r{rank}", "sparse": f"sm_{rate}", "full": "full"}[delta_type]
    name = f"ders_{tag}_N{n}k{k}" + ("_shared" if shared else "") + ("" if train_base else "_frozenbase")
    name += "_cpukernel" if cpu_kernels else ""
    return Arm(name, "ders", n, k, delta_type, rank, rate, shared, train_base, cpu_kernels=cpu_kernels)


def mixtral_arm(n: int = 4, k: int = 2, eager: bool = False) -> Arm:
    return Arm(f"mixtral_N{n}k{k}" + ("_eager" if eager else ""), "mixtral", n, k, "full", extra={"eager": eager})


def main_group(lora_rank: int) -> list[Arm]:
    return [
        Arm("dense_full_ft", "dense"),
        Arm(f"dense_lora_r{lora_rank}", "lora", lora_rank=lora_rank),
        Arm("dense_lora_r16", "lora", lora_rank=16),
        ders_arm("full"),
        mixtral_arm(),
        mixtral_arm(eager=True),
        *[ders_arm("lowrank", rank=r) for r in (1, 4, 16)],
        ders_arm("lowrank", rank=4, cpu_kernels=True),
        ders_arm("lowrank", rank=4, train_base=False),
        *[ders_arm("sparse", rate=p) for p in (0.9999, 0.999, 0.9)],
    ]


def grid_group() -> list[Arm]:
    arms = [Arm("dense_full_ft", "dense")]
    for n in (4, 8):
        for k in (1, 2):
            arms += [ders_arm("lowrank", n, k), ders_arm("lowrank", n, k, shared=True), ders_arm("full", n, k)]
            arms.append(mixtral_arm(n, k))
    return arms


def quick_groups(lora_rank: int) -> tuple[list[Arm], list[Arm]]:
    main = [
        Arm("dense_full_ft", "dense"),
        Arm(f"dense_lora_r{lora_rank}", "lora", lora_rank=lora_rank),
        ders_arm("full"),
        mixtral_arm(),
        ders_arm("lowrank", rank=4),
        ders_arm("lowrank", rank=4, cpu_kernels=True),
        ders_arm("sparse", rate=0.999),
    ]
    return main, [Arm("dense_full_ft", "dense"), ders_arm("lowrank", 4, 1, shared=True)]


# ---------------------------------------------------------------------------------------------------- model building
def llama_config(shape: Shape) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.seq,
        tie_word_embeddings=False,
    )


def mixtral_config(shape: Shape, n: int, k: int, experts_impl: str | None = None) -> transformers.MixtralConfig:
    """Mixtral of the same shape; ``experts_impl`` None keeps transformers' default experts implementation."""
    cfg = transformers.MixtralConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.seq,
        tie_word_embeddings=False,
        num_local_experts=n,
        num_experts_per_tok=k,
    )
    if experts_impl is not None:
        cfg._experts_implementation = experts_impl
    return cfg


def dense_param_count(shape: Shape) -> int:
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(llama_config(shape))
    return sum(p.numel() for p in model.parameters())


def build(arm: Arm, shape: Shape) -> tuple[torch.nn.Module, list[torch.nn.Parameter], int]:
    """Model of ``arm`` (train mode), its trainable parameters and the parameters it adds to the dense model."""
    torch.manual_seed(0)
    if arm.kind == "mixtral":
        impl = "eager" if arm.extra.get("eager") else None
        model = transformers.MixtralForCausalLM(mixtral_config(shape, arm.num_experts, arm.top_k, impl))
        for name, p in model.named_parameters():  # like DeRS "full": experts and router train, the rest is frozen
            p.requires_grad_(".mlp." in name)
        added = sum(p.numel() for p in model.parameters()) - dense_param_count(shape)
    else:
        model = transformers.LlamaForCausalLM(llama_config(shape))
        added = 0
        if arm.kind == "lora":
            import peft

            targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            cfg = peft.LoraConfig(r=arm.lora_rank, lora_alpha=arm.lora_rank, target_modules=targets)
            model = peft.get_peft_model(model, cfg)
            added = sum(p.numel() for p in model.parameters() if p.requires_grad)
        elif arm.kind == "ders":
            cfg = ders_peft.DeRSConfig(
                target_modules=["mlp"],
                num_experts=arm.num_experts,
                top_k=arm.top_k,
                delta_type=arm.delta_type,
                rank=arm.rank,
                sparse_rate=arm.sparse_rate,
                shared_expert=arm.shared_expert,
                train_base=arm.train_base,
            )
            model = _peft(model, cfg)
            added = ders_peft.parameter_report(model).added_params
    model.train()
    model.ders_cpu_kernels = arm.cpu_kernels
    return model, [p for p in model.parameters() if p.requires_grad], added


def use_cpu_kernels(on: bool) -> None:
    """Switch ders_peft's compiled CPU kernels on or off (arms of one process alternate)."""
    if on:
        ders_peft.enable_cpu_kernels(verbose=False)
    else:
        ders_peft.disable_cpu_kernels()


def _peft(model, cfg):
    import peft

    return peft.get_peft_model(model, cfg)


def lora_rank_matching(shape: Shape, target: int) -> int:
    """LoRA rank (on all seven linear projections) whose trainable count is closest to ``target``."""
    kv_dim = shape.hidden * shape.kv_heads // shape.heads
    per_layer = 2 * (2 * shape.hidden) + 2 * (shape.hidden + kv_dim) + 3 * (shape.hidden + shape.intermediate)
    per_rank = per_layer * shape.layers
    return max(1, min(shape.hidden, round(target / per_rank)))


SM_MATCHED = ders_arm("sparse", rate=0.9)
"""The DeRS arm the memory part also compares with a LoRA of its own trainable count."""


def trainable_of(arm: Arm, shape: Shape) -> int:
    """Trainable parameters of ``arm``'s model."""
    return sum(p.numel() for p in build(arm, shape)[1])


def make_step(model: torch.nn.Module, params: list[torch.nn.Parameter], shape: Shape):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen)
    opt = torch.optim.AdamW(params, lr=1e-4)
    cpu_kernels = getattr(model, "ders_cpu_kernels", False)

    def step() -> None:
        use_cpu_kernels(cpu_kernels)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


# ---------------------------------------------------------------------------------------------------- layer part
def factorised_loop_ffn(layer: DeRSLayer, x: torch.Tensor) -> torch.Tensor:
    """Alternative layout of the same low-rank SwiGLU layer: base projections once per token, then a loop over
    experts on the slots routed to each (gathered rows, per-expert ``(x A_e^T) B_e^T``, ``index_add`` back)."""
    adapter = layer.active_adapters[0]
    cfg = layer.ders_settings[adapter]
    deltas = layer.ders_delta[adapter]
    gate_d, up_d, down_d = deltas["gate_proj"], deltas["up_proj"], deltas["down_proj"]
    wg, wu, wd = (layer.base_weight(adapter, n) for n in ("gate_proj", "up_proj", "down_proj"))
    plan, _ = route(layer.ders_router[adapter](x), cfg.top_k, cfg.normalize_top_k, cfg.shared_expert)
    E, r, S = gate_d.num_experts, gate_d.rank, plan.num_slots
    order, _, counts = plan.sorted_slots()
    tokens = order // S
    slot_w = plan.weights.reshape(-1).index_select(0, order).to(x.dtype)
    gb, ub = x @ wg.t(), x @ wu.t()
    mixed = torch.zeros_like(gb)
    y = torch.zeros_like(x)

    def factors(d):
        return d.lora_a.weight.view(E, r, -1), d.lora_b.weight.view(d.out_features, E, r)

    (ag, bg), (au, bu), (ad, bd) = factors(gate_d), factors(up_d), factors(down_d)
    for e, (tok, w) in enumerate(zip(tokens.split(counts), slot_w.split(counts), strict=True)):
        if not counts[e]:
            continue
        xe = x.index_select(0, tok)
        g = gb.index_select(0, tok) + (xe @ ag[e].t()) @ bg[:, e].t()
        u = ub.index_select(0, tok) + (xe @ au[e].t()) @ bu[:, e].t()
        h = torch.nn.functional.silu(g) * u * w.unsqueeze(-1)
        mixed = mixed.index_add(0, tok, h)
        y = y.index_add(0, tok, (h @ ad[e].t()) @ bd[:, e].t())
    return y + mixed @ wd.t()


def layer_part(shape: Shape, reps: int, warmup: int, log) -> dict:
    """One FFN layer alone, forward + backward, ``layer_tokens`` tokens, N=4, top-2, r=4."""
    cfg = llama_config(replace(shape, layers=1))
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(cfg).model.layers[0].mlp.train()
    lm_cfg = ders_peft.DeRSConfig(target_modules=["mlp"], num_experts=4, top_k=2, rank=4)
    ders_model = _peft(transformers.LlamaForCausalLM(cfg), lm_cfg)
    lm = next(m for m in ders_model.modules() if isinstance(m, DeRSLayer)).train()
    full_model = _peft(
        transformers.LlamaForCausalLM(cfg),
        ders_peft.DeRSConfig(target_modules=["mlp"], num_experts=4, top_k=2, delta_type="full"),
    )
    full = next(m for m in full_model.modules() if isinstance(m, DeRSLayer)).train()
    mix_default = transformers.MixtralForCausalLM(mixtral_config(replace(shape, layers=1), 4, 2))
    mix_default_impl = mix_default.config._experts_implementation
    mix_default = mix_default.model.layers[0].mlp.train()
    mix_eager = transformers.MixtralForCausalLM(mixtral_config(replace(shape, layers=1), 4, 2, "eager"))
    mix_eager = mix_eager.model.layers[0].mlp.train()
    with torch.no_grad():  # non-zero deltas, so every path computes something real
        gen = torch.Generator().manual_seed(2)
        for p in lm.ders_delta.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    x = torch.randn(shape.layer_tokens, shape.hidden, generator=torch.Generator().manual_seed(3), requires_grad=True)
    x3 = x.detach().view(1, -1, shape.hidden).requires_grad_()

    sparse = {}
    for rate in (0.9999, 0.9):
        sm_cfg = ders_peft.DeRSConfig(
            target_modules=["mlp"], num_experts=4, top_k=2, delta_type="sparse", sparse_rate=rate
        )
        layer = next(
            m for m in _peft(transformers.LlamaForCausalLM(cfg), sm_cfg).modules() if isinstance(m, DeRSLayer)
        )
        with torch.no_grad():
            for p in layer.ders_delta.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        sparse[rate] = layer.train()

    def with_paths(fn, stacked: bool = True, grouped: bool = True):
        """Call ``fn`` with the stacked low-rank and/or the grouped path switched off (the generic path instead)."""

        def run():
            saved = functional._lowrank_fast_path, functional.grouped_supports
            if not stacked:
                functional._lowrank_fast_path = lambda *a: False
            if not grouped:
                functional.grouped_supports = lambda deltas: False
            try:
                return fn()
            finally:
                functional._lowrank_fast_path, functional.grouped_supports = saved

        return run

    with torch.no_grad():  # the alternative layouts compute the same function
        ref = lm(x)
        generic = with_paths(lambda: lm(x), stacked=False, grouped=False)()
        grouped = with_paths(lambda: lm(x), stacked=False)()
        loop = factorised_loop_ffn(lm, x)
        use_cpu_kernels(True)
        compiled = lm(x)
        use_cpu_kernels(False)
    max_err = max(float((other - ref).abs().max()) for other in (generic, grouped, loop, compiled))
    log(f"layer paths agree to {max_err:.2e}")

    def fwd_bwd(fn, cpu_kernels: bool = False):
        def run():
            use_cpu_kernels(cpu_kernels)
            out = fn()
            out.float().pow(2).mean().backward()

        return run

    arms = {
        "dense_ffn": fwd_bwd(lambda: dense(x)),
        "ders_lm_fast": fwd_bwd(lambda: lm(x)),
        "ders_lm_fast_cpukernel": fwd_bwd(lambda: lm(x), cpu_kernels=True),
        "ders_lm_stacked_masked": fwd_bwd(with_paths(lambda: lm(x), stacked=False, grouped=False)),
        "ders_lm_grouped": fwd_bwd(with_paths(lambda: lm(x), stacked=False)),
        "ders_lm_factorised_loop": fwd_bwd(lambda: factorised_loop_ffn(lm, x)),
        "ders_sm_0.9999_grouped": fwd_bwd(lambda: sparse[0.9999](x)),
        "ders_sm_0.9_grouped": fwd_bwd(lambda: sparse[0.9](x)),
        "ders_full_loop": fwd_bwd(lambda: full(x)),
        f"mixtral_block_{mix_default_impl}": fwd_bwd(lambda: mix_default(x3)),
    }
    if mix_default_impl != "eager":
        arms["mixtral_block_eager"] = fwd_bwd(lambda: mix_eager(x3))
    times = _common.round_robin(arms, reps, warmup, log)
    base = _common.median(times["dense_ffn"])
    return {
        "tokens": shape.layer_tokens,
        "config": "N=4, top_k=2, r=4, train_base=True, SwiGLU",
        "max_abs_diff_between_lowrank_paths": max_err,
        "times_s": times,
        "median_s": {k: _common.median(v) for k, v in times.items()},
        "ratio_to_dense": {k: _common.median(v) / base for k, v in times.items()},
    }


# ---------------------------------------------------------------------------------------------------- step part
def step_part(groups: dict[str, list[Arm]], shape: Shape, reps: int, warmup: int, log) -> dict:
    out = {}
    for group, arms in groups.items():
        log(f"group {group}: {len(arms)} arms")
        built, info = {}, {}
        for arm in arms:
            model, params, added = build(arm, shape)
            built[arm.name] = make_step(model, params, shape)
            info[arm.name] = {
                "arm": asdict(arm),
                "added_params": added,
                "trainable_params": sum(p.numel() for p in params),
            }
        times = _common.round_robin(built, reps, warmup, log)
        base = _common.median(times["dense_full_ft"])
        for name in built:
            info[name].update(
                times_s=times[name],
                median_s=_common.median(times[name]),
                ratio_to_dense=_common.median(times[name]) / base,
            )
        out[group] = info
        del built
    return out


# ---------------------------------------------------------------------------------------------------- memory part
def memory_child(arm: Arm, shape: Shape, steps: int = 3) -> dict:
    """Run in a fresh process: resident set before building the model, then its peak while building and training.

    The kernel's peak-RSS counter (VmHWM) is reset just before building, so transient import-time peaks do not
    hide the training peak; without that facility ``ru_maxrss`` is used (then import peaks can mask small arms).
    """
    rss_start = _common.current_rss_mb()
    exact = _common.reset_peak_rss()
    model, params, _ = build(arm, shape)
    step = make_step(model, params, shape)
    rss_built = _common.current_rss_mb()
    for _ in range(steps):
        step()
    peak = _common.peak_rss_mb()
    return {
        "arm": arm.name,
        "rss_start_mb": rss_start,
        "peak_over_start_mb": peak - rss_start,
        "training_growth_mb": peak - rss_built,
        "model_mb": rss_built - rss_start,
        "peak_counter": "VmHWM reset before build" if exact else "ru_maxrss",
    }


def memory_part(arms: list[Arm], shape: Shape, threads: int, log, malloc: str = "fixed") -> dict:
    out = {}
    for arm in arms:
        args = [str(Path(__file__).resolve()), "--memory-arm", arm.name, "--threads", str(threads)]
        args += ["--shape", ",".join(f"{k}={v}" for k, v in asdict(shape).items())]
        res = _common.run_json_subprocess(args, env=_common.FIXED_MALLOC if malloc == "fixed" else None)
        res["malloc"] = malloc
        log(f"memory {arm.name}: peak over start {res['peak_over_start_mb']:.0f} MB")
        out[arm.name] = res
    return out


# ---------------------------------------------------------------------------------------------------- report
def targets(results: dict, lora_name: str, sm_lora_name: str | None = None) -> list[dict]:
    """Goal rows; ``sm_lora_name``: the LoRA arm whose trainable count matches DeRS-SM p=0.9's (memory only)."""
    main = results["step"]["main"]
    lm = "ders_lm_r4_N4k2"
    t = {name: d["median_s"] for name, d in main.items()}
    rows = [
        ("whole step: DeRS-LM N4 k2 r4 / dense full FT", t[lm] / t["dense_full_ft"], 1.3),
        ("whole step: DeRS-LM / DeRS full (vanilla)", t[lm] / t["ders_full_N4k2"], 0.8),
        ("whole step: DeRS-LM / MixtralForCausalLM", t[lm] / t["mixtral_N4k2"], 0.8),
        ("FFN layer: DeRS-LM fast / dense FFN", results["layer"]["ratio_to_dense"]["ders_lm_fast"], 1.4),
    ]
    ratios = results["layer"]["ratio_to_dense"]
    if "ders_lm_fast_cpukernel" in ratios:
        rows.append(("FFN layer: DeRS-LM + CPU kernel / dense FFN", ratios["ders_lm_fast_cpukernel"], 1.12))
    kernel_arm = lm + "_cpukernel"
    if kernel_arm in main:
        rows.append(("whole step: DeRS-LM + CPU kernel / dense full FT", t[kernel_arm] / t["dense_full_ft"], 1.3))
    mem = results.get("memory", {})
    if lm in mem and lora_name in mem and mem[lora_name]["peak_over_start_mb"] > 0:
        ref = mem[lora_name]["peak_over_start_mb"]
        rows.append(("peak memory: DeRS-LM (train_base) / dense+LoRA", mem[lm]["peak_over_start_mb"] / ref, 1.15))
        fb = lm + "_frozenbase"
        if fb in mem:
            rows.append(("peak memory: DeRS-LM (frozen base) / dense+LoRA", mem[fb]["peak_over_start_mb"] / ref, 1.15))
        for rate in ("0.9999", "0.999", "0.9"):
            sm = f"ders_sm_{rate}_N4k2"
            if sm in mem:
                rows.append((f"peak memory: DeRS-SM p={rate} / dense+LoRA", mem[sm]["peak_over_start_mb"] / ref, 1.15))
        sm = SM_MATCHED.name
        if sm in mem:  # issue 15's goal, against both LoRA arms
            peak = mem[sm]["peak_over_start_mb"]
            rows.append((f"peak memory: DeRS-SM p=0.9 / {lora_name} (issue 15)", peak / ref, 1.0))
            if sm_lora_name in mem:
                same = peak / mem[sm_lora_name]["peak_over_start_mb"]
                rows.append((f"peak memory: DeRS-SM p=0.9 / {sm_lora_name} (same trainable count)", same, 1.0))
    return [{"what": w, "measured": round(v, 3), "target": t, "met": v <= t} for w, v, t in rows]


def tables(results: dict) -> str:
    parts = []
    layer = results["layer"]
    parts.append(f"### FFN layer alone, forward + backward ({layer['tokens']} tokens, {layer['config']})\n")
    parts.append(
        _common.markdown_table(
            ["path", "median s", "x dense FFN"],
            [[k, f"{layer['median_s'][k]:.3f}", f"{layer['ratio_to_dense'][k]:.2f}"] for k in layer["median_s"]],
        )
    )
    mem = results.get("memory", {})
    for group, info in results["step"].items():
        parts.append(f"\n### Whole-model training step, group `{group}`\n")
        rows = []
        for name, d in info.items():
            m = mem.get(name)
            rows.append(
                [
                    name,
                    _common.fmt_params(d["added_params"]),
                    _common.fmt_params(d["trainable_params"]),
                    f"{d['median_s']:.3f}",
                    f"{d['ratio_to_dense']:.2f}",
                    f"{m['peak_over_start_mb']:.0f}" if m else "-",
                    f"{m['training_growth_mb']:.0f}" if m else "-",
                ]
            )
        header = ["arm", "added", "trainable", "median step s", "x dense", "peak MB", "train growth MB"]
        parts.append(_common.markdown_table(header, rows))
    parts.append("\n### Targets\n")
    parts.append(
        _common.markdown_table(
            ["ratio", "measured", "target", "met"],
            [[t["what"], t["measured"], f"<= {t['target']}", "yes" if t["met"] else "NO"] for t in results["targets"]],
        )
    )
    return "\n".join(parts) + "\n"


def _place_labels(ax, points: list[tuple[float, float, str]], fontsize: int = 7) -> None:
    """Annotate each ``(x, y, label)`` at the first nearby offset whose text overlaps no other label, no marker and
    stays inside the axes (a leader line marks the farther offsets). Call after the layout is final."""
    near = [(4, 3, "left"), (-4, 3, "right"), (4, -11, "left"), (-4, -11, "right")]
    near += [(0, 7, "center"), (0, -15, "center")]
    far = [(dx * s, dy * s, ha) for s in (3, 5) for dx, dy, ha in near[:4]]
    far += [(0, 7 * s, "center") for s in (3, 5)]
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    to_px = ax.transData.transform
    markers = [to_px((x, y)) for x, y, _ in points]
    pad = 4 * fig.dpi / 72
    placed: list = []
    for i, (x, y, label) in enumerate(points):
        for j, (dx, dy, ha) in enumerate(near + far):
            arrow = {"arrowstyle": "-", "lw": 0.5, "color": "0.5"} if j >= len(near) else None
            text = ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, fontsize=fontsize,
                               arrowprops=arrow)
            box = text.get_window_extent(renderer)
            hits_marker = any(
                k != i and box.x0 - pad < mx < box.x1 + pad and box.y0 - pad < my < box.y1 + pad
                for k, (mx, my) in enumerate(markers)
            )
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not hits_marker and not any(box.overlaps(other) for other in placed):
                placed.append(box)
                break
            text.remove()
        else:  # no free spot: the first one, flagged so that a reader can see it
            text = ax.annotate(label, (x, y), xytext=near[0][:2], textcoords="offset points", fontsize=fontsize)
            placed.append(text.get_window_extent(renderer))


def label_overlaps(ax) -> list[tuple[str, str]]:
    """Pairs of annotation texts of ``ax`` whose drawn boxes overlap (the plot test's check)."""
    renderer = ax.figure.canvas.get_renderer()
    texts = [t for t in ax.texts if t.get_visible()]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    return [(a, b) for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1 :] if ba.overlaps(bb)]


def plot(results: dict, path: Path) -> list[tuple[str, str]]:
    """Median step time vs added parameters of the main arms; returns any overlapping label pairs (none expected)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    info = results["step"]["main"]
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"dense": "black", "lora": "tab:gray", "ders": "tab:blue", "mixtral": "tab:red"}
    points = []
    for name, d in info.items():
        kind = d["arm"]["kind"]
        color = "tab:orange" if d["arm"]["delta_type"] == "full" and kind == "ders" else colors[kind]
        x = max(d["added_params"], 1)
        ax.scatter(x, d["median_s"], color=color, zorder=3)
        points.append((x, d["median_s"], name))
    ax.set_xscale("log")
    ax.margins(x=0.12, y=0.12)
    ax.set_xlabel("added parameters (log; dense full FT plotted at 1)")
    ax.set_ylabel("median training step (s)")
    shape = results["shape"]
    ax.set_title(
        f"Training step vs added parameters (hidden {shape['hidden']}, {shape['layers']} blocks, "
        f"{shape['batch']}x{shape['seq']} tokens)",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    _place_labels(ax, sorted(points, key=lambda p: -p[1]))
    overlaps = label_overlaps(ax)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(path)  # never a half-written PNG in docs/
    return overlaps


def all_arms(groups: dict[str, list[Arm]]) -> dict[str, Arm]:
    return {a.name: a for arms in groups.values() for a in arms}


def parse_shape(text: str) -> Shape:
    kw = dict(item.split("=") for item in text.split(","))
    return Shape(**{k: int(v) for k, v in kw.items()})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shape, few arms, two repetitions (CI smoke run)")
    ap.add_argument(
        "--out-dir", type=Path, default=None, help="default: docs/ (full run), a new temporary folder (--quick)"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: see docs)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per arm (default 5, quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed interleaved rounds (default 1)")
    ap.add_argument("--parts", default="layer,step,memory", help="comma list of layer,step,memory")
    ap.add_argument(
        "--malloc",
        choices=["fixed", "default"],
        default="fixed",
        help="glibc thresholds of the memory children: fixed (reproducible, see _common.FIXED_MALLOC) or glibc's "
        "default",
    )
    ap.add_argument("--memory-arm", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.out_dir = _common.output_dir(args.out_dir, args.quick)
    torch.set_num_threads(args.threads)
    shape = parse_shape(args.shape) if args.shape else (QUICK_SHAPE if args.quick else Shape())

    lora_rank = 0 if args.memory_arm else lora_rank_matching(shape, trainable_of(ders_arm("lowrank"), shape))
    if args.memory_arm:  # child process of the memory part
        lora_rank = int(args.memory_arm.rsplit("_r", 1)[1]) if args.memory_arm.startswith("dense_lora_r") else 0
        groups = {"main": main_group(lora_rank), "grid": grid_group()}
        arms = all_arms(groups)
        arm = arms.get(args.memory_arm) or Arm(args.memory_arm, "lora", lora_rank=lora_rank)
        print(__import__("json").dumps(memory_child(arm, shape)))
        return 0

    if args.quick:
        main_arms, grid = quick_groups(lora_rank)
        groups = {"main": main_arms, "grid": grid}
    else:
        groups = {"main": main_group(lora_rank), "grid": grid_group()}
    reps = args.reps or (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else 1
    parts = set(args.parts.split(","))
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    results: dict = {
        "command": "python benchmarks/train_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine_start": _common.machine_note(),
        "shape": asdict(shape),
        "reps": reps,
        "warmup": warmup,
        "lora_rank_matched": lora_rank,
        "memory_method": (
            "each arm in a fresh subprocess; peak resident set (VmHWM, reset just before the model is built) over "
            "3 training steps, minus the resident set before building (= weights + grads + AdamW states + "
            "activations + allocator slack): peak_over_start; the same minus the resident set after building: "
            "training_growth"
            + (
                f"; glibc thresholds fixed ({_common.FIXED_MALLOC})"
                if args.malloc == "fixed"
                else "; glibc's default malloc"
            )
        ),
    }
    if "layer" in parts:
        log("layer part")
        results["layer"] = layer_part(shape, reps, warmup, log)
    if "step" in parts:
        log("step part")
        results["step"] = step_part(groups, shape, reps, warmup, log)
    if "memory" in parts:
        log("memory part")
        mem_arms = [a for a in all_arms(groups).values()]
        if args.quick:
            mem_arms = [a for a in mem_arms if a.name == "ders_lm_r4_N4k2"]  # one subprocess keeps CI short
        else:  # DeRS-SM p=0.9 trains more values than DeRS-LM: a LoRA with its own trainable count too
            results["lora_rank_matched_sm_0.9"] = sm_rank = lora_rank_matching(shape, trainable_of(SM_MATCHED, shape))
            mem_arms.append(Arm(f"dense_lora_r{sm_rank}", "lora", lora_rank=sm_rank))
        results["memory"] = memory_part(mem_arms, shape, args.threads, log, args.malloc)
    if {"layer", "step"} <= parts:
        sm_lora = results.get("lora_rank_matched_sm_0.9")
        results["targets"] = targets(results, f"dense_lora_r{lora_rank}", sm_lora and f"dense_lora_r{sm_lora}")
    results["machine_end"] = _common.machine_note()
    results["wall_s"] = time.time() - t0
    out = args.out_dir
    _common.write_json(out / "benchmarks_train_step.json", results)
    if {"layer", "step"} <= parts:
        (out / "benchmarks_train_step_tables.md").write_text(tables(results))
        plot(results, out / "benchmarks_train_step.png")
        print(tables(results))
    log(f"wrote {out / 'benchmarks_train_step.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
