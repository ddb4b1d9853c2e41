"""PNG plots of the diagnostics (matplotlib, Agg backend): similarity heatmaps, router load, delta spectrum."""

from __future__ import annotations

import io
import math


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return max(1, math.ceil(n / cols)), max(1, cols)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def similarity_png(similarity: dict[str, dict]) -> bytes:
    """One heatmap per layer: cosine of the whole FFN between base and experts (row/column 0 is the base)."""
    plt = _pyplot()
    rows, cols = _grid(len(similarity))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(similarity) :]:
        ax.axis("off")
    for ax, (name, layer) in zip(axes.flat, similarity.items(), strict=False):
        sim = layer["projections"]["ffn"]
        mat = [[1.0, *sim["to_base"]]] + [[b, *row] for b, row in zip(sim["to_base"], sim["pairwise"], strict=True)]
        labels = ["base"] + [n.replace("expert_", "e") for n in layer["experts"]]
        im = ax.imshow(mat, vmin=min(min(r) for r in mat), vmax=1.0, cmap="viridis")
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=90)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(name, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("cosine similarity of expert weights (flattened FFN)")
    return _png(fig)


def router_load_png(load: dict[str, dict]) -> bytes:
    """Heatmap of the token share per layer (rows) and expert (columns), balance and entropy in the row labels."""
    plt = _pyplot()
    names = list(load)
    width = max(len(v["share"]) for v in load.values())
    mat = [v["share"] + [math.nan] * (width - len(v["share"])) for v in load.values()]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * width + 3.0, 0.8 + 0.35 * len(names)))
    im = ax.imshow(mat, aspect="auto", cmap="magma", vmin=0.0)
    ax.set_xticks(range(width), [f"e{e}" for e in range(width)], fontsize=7)
    labels = [f"{n}  bal {v['balance']:.2f}  H {v['normalized_entropy']:.2f}" for n, v in load.items()]
    ax.set_yticks(range(len(names)), labels, fontsize=7)
    ax.set_title("router token share (bal = N sum share^2, H = entropy / log N)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _png(fig)


def spectrum_png(spectrum: dict[str, dict]) -> bytes:
    """Cumulative singular-value energy of the deltas (mean over experts), one panel per projection."""
    plt = _pyplot()
    projs = list(dict.fromkeys(p for layer in spectrum.values() for p in layer["projections"]))
    fig, axes = plt.subplots(1, len(projs), figsize=(4.0 * len(projs), 3.2), squeeze=False)
    for ax, proj in zip(axes.flat, projs, strict=True):
        for name, layer in spectrum.items():
            entry = layer["projections"].get(proj)
            if entry is not None:
                ax.plot(entry["energy_curve"]["rank"], entry["energy_curve"]["energy"], label=name, lw=1)
        for frac in (0.9, 0.99):
            ax.axhline(frac, color="grey", lw=0.6, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("rank")
        ax.set_ylabel("energy kept")
        ax.set_title(proj, fontsize=9)
    if len(spectrum) <= 12:
        axes.flat[0].legend(fontsize=6)
    fig.suptitle("singular-value energy of Delta_e = W_e - W_base")
    return _png(fig)
