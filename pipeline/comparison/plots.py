"""The report's figures (matplotlib, an optional dependency: without it the report says so and skips them)."""
from __future__ import annotations

import sys
from pathlib import Path


def available() -> bool:
    try:
        import matplotlib  # noqa: F401  (is it installed?)
    except ImportError:
        print("matplotlib is not installed (pip install '.[plots]'): the report has no figures", file=sys.stderr)
        return False
    return True


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_quality_vs_time(hybrid: list[dict], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    galleries = sorted({r["gallery"] for r in hybrid}, key=lambda s: int(s.replace(",", "")))
    biggest = galleries[-1] if galleries else None
    for ax, direction in zip(axes, ("i2t", "t2i")):
        rows = [r for r in hybrid if r["direction"] == direction and r["gallery"] == biggest]
        for r in rows:
            if r["method"] == "fine-grained exhaustive":
                ax.scatter(r["ms_per_query"], r["R@10"], marker="*" if r["screener"] == "mm+topk" else "P", s=150,
                           color="k", zorder=3, label=f"fine-grained exhaustive ({r['screener']})")
        screeners = sorted({r["screener"] for r in rows if r["method"] != "fine-grained exhaustive"})
        for idx, name in enumerate(screeners):
            color = f"C{idx}"
            h = [r for r in rows if r["screener"] == name and r["method"] == "hybrid"]
            h.sort(key=lambda r: r["K"])
            ax.plot([r["ms_per_query"] for r in h], [r["R@10"] for r in h], "-o", color=color, ms=4,
                    label=f"hybrid: {name} screen + fine-grained re-rank")
            for r in h:
                ax.annotate(f"K={r['K']}", (r["ms_per_query"], r["R@10"]), fontsize=7, color=color,
                            xytext=(3, -9), textcoords="offset points")
            for r in rows:
                if r["screener"] == name and r["method"] == "hash only":
                    ax.scatter(r["ms_per_query"], r["R@10"], marker="s", color=color, s=40,
                               label=f"{name} alone")
        ax.set_xscale("log")
        ax.set_xlabel("query time per query (ms, log)")
        ax.set_ylabel("R@10 (%)")
        ax.set_title(f"{direction}: gallery {biggest} items per side")
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Quality against query time (hybrid curves run over K)")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quality_vs_bytes(quality: list[dict], storage: list[dict], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (metric, label) in zip(axes, ((("i2t_R@10", "t2i_R@10"), "R@10 (%), mean of i2t and t2i"),
                                          (("i2t_mAP@N", "t2i_mAP@N"), "mAP@N, mean of i2t and t2i"))):
        for idx, q in enumerate(quality):
            y = (q[metric[0]] + q[metric[1]]) / 2
            st = [s for s in storage if s["model"] == q["model"]]
            ours = st[0]["bytes_per_item"]
            ax.scatter(ours, y, color=f"C{idx}", s=60, label=f"{q['model']} ({q['representation']})")
            if len(st) > 1 and q["family"] == "hash":  # the paper's one byte per bit
                ax.scatter(st[1]["bytes_per_item"], y, facecolors="none", edgecolors=f"C{idx}", s=60)
                ax.annotate("", xy=(ours, y), xytext=(st[1]["bytes_per_item"], y),
                            arrowprops={"arrowstyle": "->", "color": f"C{idx}", "alpha": 0.6})
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes per item (log2); hollow = the paper's one byte per bit")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle("Quality against storage (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_time_vs_gallery(rows: list[dict], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    keys = sorted({(r["model"], r["method"]) for r in rows})
    for ax, direction in zip(axes, ("i2t", "t2i")):
        for idx, key in enumerate(keys):
            labelled = False  # one legend entry per method (token rows exist for duplicated galleries only)
            for kind, style in (("distinct", "-"), ("duplicated", ":")):
                pts = sorted((r["gallery_items"], r["ms_per_query"]) for r in rows
                             if (r["model"], r["method"]) == key and r["gallery"] == kind
                             and r["direction"] == direction)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", ms=3, color=f"C{idx % 10}",
                            label=None if labelled else f"{key[0]}: {key[1]}")
                    labelled = True
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("gallery items (log)")
        ax.set_title(f"{direction} (solid: distinct items, dotted: duplicated test set)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("ms per query (log)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_curves(runs) -> dict:
    """{run name: its test_curves.json} for the runs that wrote one (docs/protocol.md, "Curves")."""
    import json

    found = {}
    for run in runs:
        path = Path(run.path) / "test_curves.json"
        if path.is_file():
            found[run.name] = json.loads(path.read_text())
    return found


def plot_curves(curves: dict, path: Path) -> None:
    """One row per direction, one column per curve (P@K over K, PR11, radius PR), one line per run."""
    plt = _plt()
    kinds = [k for k in ("p_at_k", "pr11", "radius_pr") if any(k in c.get("i2t", {}) for c in curves.values())]
    fig, axes = plt.subplots(2, len(kinds), figsize=(5 * len(kinds), 8), squeeze=False)
    titles = {"p_at_k": ("K", "P@K", "precision at K"), "pr11": ("recall", "interpolated precision", "11-point PR"),
              "radius_pr": ("recall", "precision", "PR by Hamming radius")}
    for row, direction in enumerate(("i2t", "t2i")):
        for col, kind in enumerate(kinds):
            ax = axes[row][col]
            for name, own in curves.items():
                curve = own.get(direction, {}).get(kind)
                if curve:
                    x = curve["k"] if kind == "p_at_k" else curve["recall"]
                    ax.plot(x, curve["precision"], marker="." if kind != "p_at_k" else None, label=name)
            xlabel, ylabel, title = titles[kind]
            ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{direction}: {title}")
            if kind == "p_at_k":
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
