"""The two crossovers behind the training paths' switch constants, measured on one thread.

1. ``functional.STACKED_MAX_COLUMNS``: low-rank deltas whose stacked factors have at most that many columns (experts x
   rank) take the stacked-and-masked path (``lowrank_routed_ffn``), wider ones the path grouped by expert
   (``grouped_path.grouped_routed_ffn``). Measured: one DeRS FFN layer (SwiGLU, trainable base copy), forward +
   backward, for several (experts, rank), each path forced, relative to the dense FFN layer's forward + backward.
2. ``grouped_path.GATHER_DENSITY`` and ``grouped_path.DENSE_DENSITY``: up to the first a sparse delta's products
   gather/``index_add``, up to the second they run as CSR products, above it on one expert's transient dense matrix.
   Measured: one expert's three training products (``add_product``, ``grad_input``, ``add_grad_params`` of
   ``SparseOp``) on ``rows x in -> out`` in the three modes, for several densities, next to the same three products
   with a prebuilt dense matrix (reference).

Every arm of one comparison is timed in interleaved rounds (``_common.round_robin``), so a change of load on the
shared machine hits all arms alike; the reported time is the median. The arms of each comparison are first checked to
compute the same outputs and gradients.

    python benchmarks/thresholds.py            # writes docs/benchmarks_thresholds.{json,md} (about 2-3 min)
    python benchmarks/thresholds.py --quick    # tiny shapes, seconds, for CI (writes into a temporary folder)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import ders_peft  # noqa: E402
from ders_peft import functional, grouped_path  # noqa: E402
from ders_peft.deltas import SparseDelta  # noqa: E402
from ders_peft.grouped_path import SparseOp  # noqa: E402
from ders_peft.layer import DeRSLayer  # noqa: E402

FULL = {
    "hidden": 512,
    "intermediate": 1408,
    "tokens": 2048,
    "top_k": 2,
    "lowrank": [(4, 4), (8, 4), (16, 4), (4, 16), (8, 16), (16, 16)],  # (experts, rank)
    "rows": 1024,
    "densities": [0.0005, 0.001, 0.002, 0.004, 0.01, 0.02, 0.05, 0.1, 0.2],
    "reps": 7,
}
QUICK = {
    "hidden": 64,
    "intermediate": 176,
    "tokens": 128,
    "top_k": 2,
    "lowrank": [(4, 4), (16, 8)],
    "rows": 64,
    "densities": [0.002, 0.05, 0.2],
    "reps": 2,
}


# --------------------------------------------------------------------------------------- stacked vs grouped
def _layer(settings: dict, experts: int, rank: int) -> DeRSLayer:
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=settings["hidden"],
        intermediate_size=settings["intermediate"],
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    torch.manual_seed(0)
    ders_cfg = ders_peft.DeRSConfig(target_modules=["mlp"], num_experts=experts, top_k=settings["top_k"], rank=rank)
    import peft

    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), ders_cfg)
    layer = next(m for m in model.modules() if isinstance(m, DeRSLayer)).train()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # non-zero deltas, so both paths compute something real
        for p in layer.ders_delta.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return layer


def _forced(fn, stacked: bool):
    """Call ``fn`` with the low-rank layer forced onto the stacked path (its width limit lifted) or the grouped one."""

    def run():
        saved_fast, saved_max = functional._lowrank_fast_path, functional.STACKED_MAX_COLUMNS
        if stacked:
            functional.STACKED_MAX_COLUMNS = 1 << 30
        else:
            functional._lowrank_fast_path = lambda *a: False
        try:
            return fn()
        finally:
            functional._lowrank_fast_path, functional.STACKED_MAX_COLUMNS = saved_fast, saved_max

    return run


def _fwd_bwd(module: torch.nn.Module, x: torch.Tensor):
    def run():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).float().pow(2).mean().backward()
        return [x.grad] + [p.grad for p in module.parameters() if p.requires_grad]

    return run


def _max_diff(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> float:
    return max(float((u - v).abs().max()) for u, v in zip(a, b, strict=True) if u is not None)


def lowrank_part(settings: dict, log) -> dict:
    x = torch.randn(settings["tokens"], settings["hidden"], generator=torch.Generator().manual_seed(3))
    x.requires_grad_()
    torch.manual_seed(0)
    dense_cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=settings["hidden"],
        intermediate_size=settings["intermediate"],
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    dense = transformers.LlamaForCausalLM(dense_cfg).model.layers[0].mlp.train()
    rows = []
    for experts, rank in settings["lowrank"]:
        layer = _layer(settings, experts, rank)
        arms = {
            "dense": _fwd_bwd(dense, x),
            "stacked": _forced(_fwd_bwd(layer, x), stacked=True),
            "grouped": _forced(_fwd_bwd(layer, x), stacked=False),
        }
        diff = _max_diff(arms["stacked"](), arms["grouped"]())
        scale = max(float(g.abs().max()) for g in arms["grouped"]() if g is not None)
        if diff > 1e-4 * max(scale, 1.0):
            raise RuntimeError(f"E={experts}, r={rank}: the stacked and grouped paths differ by {diff:.3g}")
        log(f"E={experts} r={rank} (E*r={experts * rank}): paths agree to {diff:.2e}")
        times = _common.round_robin(arms, settings["reps"], warmup=1, log=log)
        med = {name: _common.median(t) for name, t in times.items()}
        rows.append(
            {
                "experts": experts,
                "rank": rank,
                "columns": experts * rank,
                "max_abs_diff": diff,
                "times_s": times,
                "median_s": med,
                "stacked_x_dense": med["stacked"] / med["dense"],
                "grouped_x_dense": med["grouped"] / med["dense"],
                "faster": "stacked" if med["stacked"] < med["grouped"] else "grouped",
                "grouped_over_stacked": med["grouped"] / med["stacked"],
                "stacked_won_rounds": _rounds_won(times, "stacked", "grouped"),
            }
        )
    return {"rows": rows, **_crossover(rows, "columns", "stacked", "grouped")}


# --------------------------------------------------------------------------------------- gather vs CSR
def _sparse_arm(op: SparseOp, params: tuple, inp: torch.Tensor, grad: torch.Tensor, out_features: int):
    def run():
        out = inp.new_zeros(inp.shape[0], out_features)
        op.add_product(0, inp, params, out)
        g_in = op.grad_input(0, grad, params)
        grads = [torch.zeros_like(params[0])]
        op.add_grad_params(0, grad, inp, params, grads)
        return [out, g_in, grads[0]]

    return run


def _op(delta: SparseDelta, mode: str) -> SparseOp:
    """The op of ``delta`` in ``mode`` (gather, csr, dense), whatever its density."""
    saved = grouped_path.GATHER_DENSITY, grouped_path.DENSE_DENSITY
    grouped_path.GATHER_DENSITY = 2.0 if mode == "gather" else -1.0
    grouped_path.DENSE_DENSITY = -1.0 if mode == "dense" else 2.0
    try:
        return SparseOp.of(delta)
    finally:
        grouped_path.GATHER_DENSITY, grouped_path.DENSE_DENSITY = saved


def sparse_part(settings: dict, log) -> dict:
    hidden, inter, n = settings["hidden"], settings["intermediate"], settings["rows"]
    gen = torch.Generator().manual_seed(4)
    inp = torch.randn(n, hidden, generator=gen)
    grad = torch.randn(n, inter, generator=gen)
    rows = []
    for density in settings["densities"]:
        delta = SparseDelta(1, inter, hidden, sparse_rate=1.0 - density, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            delta.weight.normal_(generator=gen)
        params = (delta.weight.detach(),)
        matrix = delta.materialize().detach()[0]  # (inter, hidden), for the dense reference

        positions = delta.positions()

        def dense_run(matrix=matrix, positions=positions):
            out = inp @ matrix.t()
            g_in = grad @ matrix
            full = grad.t() @ inp
            return [out, g_in, full[positions[0][0], positions[1][0]]]

        arms = {
            "gather": _sparse_arm(_op(delta, "gather"), params, inp, grad, inter),
            "csr": _sparse_arm(_op(delta, "csr"), params, inp, grad, inter),
            "dense_mode": _sparse_arm(_op(delta, "dense"), params, inp, grad, inter),
            "dense": dense_run,
        }
        ref = arms["dense"]()
        diff = max(_max_diff(arms[m](), ref) for m in ("gather", "csr", "dense_mode"))
        scale = max(float(t.abs().max()) for t in ref)
        if diff > 1e-4 * max(scale, 1.0):
            raise RuntimeError(f"density {density}: gather / CSR / dense-mode / dense products differ by {diff:.3g}")
        log(f"density {density:g} (nnz {delta.nnz}): modes agree to {diff:.2e}")
        times = _common.round_robin(arms, settings["reps"], warmup=1, log=log)
        med = {name: _common.median(t) for name, t in times.items()}
        rows.append(
            {
                "density": density,
                "nnz": delta.nnz,
                "max_abs_diff": diff,
                "times_s": times,
                "median_s": med,
                "faster": "gather" if med["gather"] < med["csr"] else "csr",
                "csr_over_gather": med["csr"] / med["gather"],
                "gather_won_rounds": _rounds_won(times, "gather", "csr"),
                "faster_csr_dense": "csr" if med["csr"] < med["dense_mode"] else "dense_mode",
                "dense_mode_over_csr": med["dense_mode"] / med["csr"],
                "csr_won_rounds": _rounds_won(times, "csr", "dense_mode"),
            }
        )
    dense_rows = [{"density": r["density"], "faster": r["faster_csr_dense"]} for r in rows]
    return {
        "rows": rows,
        **_crossover(rows, "density", "gather", "csr"),
        "csr_vs_dense": _crossover(dense_rows, "density", "csr", "dense_mode"),
    }


def _rounds_won(times: dict[str, list[float]], arm: str, other: str) -> int:
    """In how many of the interleaved rounds ``arm`` took less time than ``other`` (paired by round, so a load change
    between rounds does not count)."""
    return sum(1 for a, b in zip(times[arm], times[other], strict=True) if a < b)


def _crossover(rows: list[dict], key: str, low: str, high: str) -> dict:
    """Where the arm that wins at small ``key`` (``low``) stops winning: the largest ``key`` up to which ``low`` wins
    every measured point, and the smallest ``key`` above it (where ``high`` wins); ``consistent`` is False when the
    winners alternate (then the bracket is the first change)."""
    ordered = sorted(rows, key=lambda r: r[key])
    winners = [r["faster"] for r in ordered]
    last_low = None
    for r in ordered:
        if r["faster"] != low:
            break
        last_low = r[key]
    first_high = next(
        (r[key] for r in ordered if r["faster"] == high and (last_low is None or r[key] > last_low)), None
    )
    changes = sum(1 for a, b in zip(winners, winners[1:], strict=False) if a != b)
    return {f"{low}_wins_up_to": last_low, f"{high}_wins_from": first_high, "consistent": changes <= 1}


# --------------------------------------------------------------------------------------- report
def _pages(result: dict) -> str:
    lr, sp = result["lowrank"], result["sparse"]
    s = result["settings"]
    cur_cols, cur_density = result["constants"]["STACKED_MAX_COLUMNS"], result["constants"]["GATHER_DENSITY"]
    cur_dense = result["constants"]["DENSE_DENSITY"]
    lr_rows = [
        [
            r["experts"],
            r["rank"],
            r["columns"],
            f"{r['stacked_x_dense']:.2f}",
            f"{r['grouped_x_dense']:.2f}",
            f"{r['median_s']['dense'] * 1e3:.0f}",
            f"{r['grouped_over_stacked']:.2f}",
            f"{r['stacked_won_rounds']} / {s['reps']}",
            r["faster"],
        ]
        for r in lr["rows"]
    ]
    sp_rows = [
        [
            f"{r['density']:g}",
            r["nnz"],
            f"{r['median_s']['gather'] * 1e3:.2f}",
            f"{r['median_s']['csr'] * 1e3:.2f}",
            f"{r['median_s']['dense_mode'] * 1e3:.2f}",
            f"{r['median_s']['dense'] * 1e3:.2f}",
            f"{r['csr_over_gather']:.2f}",
            f"{r['gather_won_rounds']} / {s['reps']}",
            f"{r['dense_mode_over_csr']:.2f}",
            f"{r['csr_won_rounds']} / {s['reps']}",
            min(("gather", "csr", "dense_mode"), key=lambda m: r["median_s"][m]),
        ]
        for r in sp["rows"]
    ]

    def verdict(low, high, up_to, from_, constant, name, unit=""):
        if up_to is None and from_ is None:
            return f"no crossover measured for `{name}`."
        if up_to is None:
            bracket = f"{high} is faster from the smallest point measured ({from_:g}{unit})"
        elif from_ is None:
            bracket = f"{low} is faster at every point measured (up to {up_to:g}{unit})"
        else:
            bracket = f"{low} is faster up to {up_to:g}{unit}, {high} from {from_:g}{unit}"
        inside = (up_to is None or constant >= up_to) and (from_ is None or constant < from_)
        where = "lies in that bracket" if inside else "lies OUTSIDE that bracket"
        return f"{bracket}; `{name}` = {constant:g}{unit} {where}."

    lines = [
        "# Crossovers behind STACKED_MAX_COLUMNS, GATHER_DENSITY and DENSE_DENSITY",
        "",
        "Generated by `python benchmarks/thresholds.py` (numbers in "
        "[benchmarks_thresholds.json](benchmarks_thresholds.json)). "
        + _common.provenance_line(result)
        + (
            f" Load average at the end: {' / '.join(f'{v:g}' for v in result['loadavg_1_5_15_end'])}."
            if result.get("loadavg_1_5_15_end")
            else ""
        )
        + f" One torch thread; medians of {s['reps']} interleaved rounds after one warm-up round; wall time "
        f"{result['wall_seconds']:.0f} s.",
        "",
        "## Stacked-and-masked vs grouped low-rank path (`functional.STACKED_MAX_COLUMNS`)",
        "",
        f"One DeRS FFN layer (SwiGLU, trainable base copy, random non-zero deltas), hidden {s['hidden']}, "
        f"intermediate {s['intermediate']}, {s['tokens']} tokens, top-{s['top_k']}, forward + backward, each path "
        "forced; times relative to the dense FFN layer's forward + backward, timed in the same rounds. The two "
        "paths' outputs and gradients agree (largest difference in the JSON). "
        "Rounds stacked faster: in how many of the interleaved rounds the stacked path took less time than the "
        "grouped one (paired by round, so a load change between rounds does not count); near half is a tie.",
        "",
        _common.markdown_table(
            [
                "experts",
                "rank",
                "E x r",
                "stacked x dense",
                "grouped x dense",
                "dense (ms)",
                "grouped / stacked",
                "rounds stacked faster",
                "faster",
            ],
            lr_rows,
        ),
        "",
        "Crossover: "
        + verdict(
            "stacked",
            "grouped",
            lr["stacked_wins_up_to"],
            lr["grouped_wins_from"],
            cur_cols,
            "STACKED_MAX_COLUMNS",
            " columns",
        )
        + ("" if lr["consistent"] else " The winners alternate along E x r (within the timing noise)."),
        "",
        "## Gather/index_add vs CSR vs transient dense sparse products (`grouped_path.GATHER_DENSITY`, "
        "`DENSE_DENSITY`)",
        "",
        f"One expert's three training products (`SparseOp.add_product`, `grad_input`, `add_grad_params`) on "
        f"{s['rows']} slot rows, {s['hidden']} -> {s['intermediate']}, in gather mode, CSR mode and dense mode (the "
        "expert's values scattered into a transient dense matrix for each product, its value gradient read from the "
        "dense `grad^T inp`), next to the same three products with a prebuilt dense matrix (reference). Times in ms "
        "for the three together; rounds won counted as above.",
        "",
        _common.markdown_table(
            [
                "density",
                "nnz",
                "gather (ms)",
                "CSR (ms)",
                "dense mode (ms)",
                "prebuilt dense (ms)",
                "CSR / gather",
                "rounds gather faster than CSR",
                "dense mode / CSR",
                "rounds CSR faster than dense mode",
                "fastest",
            ],
            sp_rows,
        ),
        "",
        "Crossover: "
        + verdict("gather", "CSR", sp["gather_wins_up_to"], sp["csr_wins_from"], cur_density, "GATHER_DENSITY")
        + ("" if sp["consistent"] else " The winners alternate along the density (within the timing noise)."),
        "",
        "Crossover: "
        + verdict(
            "CSR",
            "dense mode",
            sp["csr_vs_dense"]["csr_wins_up_to"],
            sp["csr_vs_dense"]["dense_mode_wins_from"],
            cur_dense,
            "DENSE_DENSITY",
        )
        + ("" if sp["csr_vs_dense"]["consistent"] else " The winners alternate along the density."),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repetition pair, for CI")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds per comparison (default 7; --quick 2)")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="folder for benchmarks_thresholds.{json,md} (default docs/; --quick: a new temporary folder)",
    )
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    if args.reps is not None:
        if args.reps < 1:
            parser.error(f"--reps must be a positive integer, got {args.reps}")
        settings["reps"] = args.reps
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    result = {
        "command": _common.command_line("thresholds.py", argv),
        "machine": _common.machine_note(),
        "commit": _common.git_commit(),
        "ders_peft_imported_from": str(Path(ders_peft.__file__).parent),
        "settings": settings,
        "constants": {
            "STACKED_MAX_COLUMNS": functional.STACKED_MAX_COLUMNS,
            "GATHER_DENSITY": grouped_path.GATHER_DENSITY,
            "DENSE_DENSITY": grouped_path.DENSE_DENSITY,
        },
    }
    try:
        log("stacked vs grouped low-rank path")
        result["lowrank"] = lowrank_part(settings, log)
        log("gather vs CSR sparse products")
        result["sparse"] = sparse_part(settings, log)
    finally:
        torch.set_num_threads(threads)
    result["wall_seconds"] = round(time.time() - t0, 1)
    try:
        import os

        result["loadavg_1_5_15_end"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        result["loadavg_1_5_15_end"] = None
    out = _common.output_dir(args.out_dir, args.quick)
    _common.write_json(out / "benchmarks_thresholds.json", result)
    (out / "benchmarks_thresholds.md").write_text(_pages(result), encoding="utf-8")
    log(f"wrote {out / 'benchmarks_thresholds.json'} and {out / 'benchmarks_thresholds.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
