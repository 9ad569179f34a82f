"""`python -m pipeline.sweep --collect DIR`: every finished run under DIR -> DIR/results.csv, results.md
and results.png (the plot needs matplotlib; without it the tables are still written)."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import yaml

from pipeline.config import flat

TRIALS_FILE = "trials.json"
FINISHED = "test_metrics.json"  # written by train.py when a run has been tested
TABLE_METRICS = ("i2t_R@1", "t2i_R@1", "i2t_mAP@N", "t2i_mAP@N", "rsum")
PLOT_METRICS = ("mAP@N", "R@1")


def find_runs(root: Path) -> list[dict]:
    """Every finished run under `root`: its folder, resolved config (flat) and test metrics."""
    runs = []
    for metrics in sorted(root.rglob(FINISHED)):
        config = metrics.parent / "config.yaml"
        cfg = flat(yaml.safe_load(config.read_text())) if config.exists() else {}
        runs.append({"run": metrics.parent.name, "config": cfg, "metrics": json.loads(metrics.read_text())})
    return runs


def swept_keys(root: Path, runs: list[dict]) -> list[str]:
    """The sweep's parameters (from trials.json), else the config keys whose values differ."""
    trials = root / TRIALS_FILE
    if trials.exists():
        keys = {k for t in json.loads(trials.read_text()) for k in t["params"]}
        values = {k: {json.dumps(r["config"].get(k)) for r in runs} for k in keys}
        return [k for k in dict.fromkeys(k for t in json.loads(trials.read_text()) for k in t["params"])
                if len(values[k]) > 1 or len(runs) == 1]
    keys = sorted({k for r in runs for k in r["config"]})
    return [k for k in keys if not k.startswith(("run.", "logger."))
            and len({json.dumps(r["config"].get(k)) for r in runs}) > 1]


def write_table(root: Path, runs: list[dict], params: list[str]) -> tuple[Path, Path]:
    metric_names = list(dict.fromkeys(m for r in runs for m in r["metrics"]))
    rows = [{"run": r["run"], **{p: r["config"].get(p) for p in params}, **r["metrics"]} for r in runs]
    csv_path = root / "results.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["run", *params, *metric_names])
        writer.writeheader()
        writer.writerows(rows)
    shown = [m for m in TABLE_METRICS if m in metric_names]
    lines = ["| run | " + " | ".join(params + shown) + " |", "|---" * (1 + len(params) + len(shown)) + "|"]
    for row in rows:
        cells = [str(row[p]) for p in params] + [_fmt(m, row.get(m)) for m in shown]
        lines.append(f"| {row['run']} | " + " | ".join(cells) + " |")
    md_path = root / "results.md"
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def _fmt(name: str, value) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if "mAP" in name else f"{value:.2f}"


def plot(root: Path, runs: list[dict], params: list[str]) -> Path | None:
    """mAP@N and R@1 (both directions) against model.bits, or the first numeric parameter;
    one line per value of the other parameters."""
    numeric = [p for p in params if all(isinstance(r["config"].get(p), (int, float)) for r in runs)]
    if not numeric:
        return None
    x = "model.bits" if "model.bits" in numeric else numeric[0]
    others = [p for p in params if p != x]
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install '.[plots]'): no results.png", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOT_METRICS), figsize=(5 * len(PLOT_METRICS), 4))
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(r["config"].get(p) for p in others), []).append(r)
    for ax, metric in zip(axes, PLOT_METRICS):
        for key, members in groups.items():
            members = sorted(members, key=lambda r: r["config"][x])
            for direction in ("i2t", "t2i"):
                label = ", ".join([direction] + [f"{p}={v}" for p, v in zip(others, key)])
                ax.plot([r["config"][x] for r in members],
                        [r["metrics"].get(f"{direction}_{metric}") for r in members], marker="o", label=label)
        ax.set_xlabel(x)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    xs = sorted({r["config"][x] for r in runs})
    for ax in axes:
        if x == "model.bits":
            ax.set_xscale("log", base=2)  # 16, 32, 64, 128 evenly spaced
            ax.minorticks_off()
        ax.set_xticks(xs, [str(v) for v in xs])
    fig.suptitle(root.name)
    fig.tight_layout()
    path = root / "results.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def collect(root: Path) -> int:
    runs = find_runs(root)
    if not runs:
        print(f"error: no finished runs ({FINISHED}) under {root}", file=sys.stderr)
        return 2
    params = swept_keys(root, runs)
    csv_path, md_path = write_table(root, runs, params)
    png = plot(root, runs, params)
    trials = root / TRIALS_FILE
    if trials.exists():
        done = {r["run"] for r in runs}
        missing = [t["id"] for t in json.loads(trials.read_text()) if t["id"] not in done]
        if missing:
            print(f"[sweep] {len(missing)} trial(s) not finished: {', '.join(missing)}")
    print(md_path.read_text())
    print(f"wrote {csv_path}, {md_path}" + (f", {png}" if png else ""))
    return 0
