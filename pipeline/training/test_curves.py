"""A run's test curves (docs/protocol.md, "Curves"): ``<run_dir>/test_curves.json`` and, when W&B is on,
one line plot per direction and curve (P@K over K, the 11-point interpolated PR, the radius PR of hash
codes). Written by rank 0 at the end of the test, beside test_metrics.json; absent without labels."""
from __future__ import annotations

import json
from pathlib import Path

from data_prep import atomic_write_bytes

CURVES_FILE = "test_curves.json"
_AXES = {"p_at_k": ("k", "precision"), "pr11": ("recall", "precision"), "radius_pr": ("recall", "precision")}


def write_curves(run_dir: Path, curves: dict) -> Path | None:
    """``{direction: {curve: {axis: [values]}}}`` as JSON in the run folder; nothing when empty."""
    if not any(curves.values()):
        return None
    path = Path(run_dir) / CURVES_FILE
    atomic_write_bytes(path, (json.dumps(curves, indent=1) + "\n").encode())
    return path


def log_curves_wandb(curves: dict) -> int:
    """One W&B line plot per direction and curve, in the active run (``test_curves/<dir>_<curve>``);
    returns how many were logged (0 without an active run)."""
    import wandb

    if wandb.run is None:
        return 0
    plots = {}
    for direction, own in curves.items():
        for name, curve in own.items():
            x, y = _AXES[name]
            table = wandb.Table(data=[list(p) for p in zip(curve[x], curve[y])], columns=[x, y])
            plots[f"test_curves/{direction}_{name}"] = wandb.plot.line(table, x, y, title=f"{direction} {name}")
    if plots:
        wandb.log(plots)
    return len(plots)
