"""The comparison report as one W&B run: every table and plot of `python -m pipeline.report`."""
from __future__ import annotations

from pathlib import Path

from pipeline.comparison.writers import csv_value
from pipeline.inference.runs import Run
from pipeline.training.trainer import wandb_mode


def log_wandb(runs: list[Run], out: Path, tables: dict, images: dict, info: dict, mode: str | None) -> str | None:
    """One W&B run holding every table and plot; returns its directory (None when W&B is missing)."""
    try:
        import wandb
    except ImportError:
        return None
    cfg = runs[0].cfg
    run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, dir=str(out), job_type="report",
                     mode=mode or wandb_mode(cfg.logger.mode), name=f"report-{'-'.join(r.name for r in runs)}"[:120],
                     config={"runs": [str(r.path) for r in runs], **info}, reinit="finish_previous")
    for name, (columns, rows) in tables.items():
        run.log({f"report/{name}": wandb.Table(columns=list(columns),
                                               data=[[csv_value(r.get(c)) for c in columns] for r in rows])})
    for name, path in images.items():
        run.log({f"report/{name}": wandb.Image(str(path))})
    run.summary.update({f"report/{q['model']}/rsum": q["rsum"] for q in tables["quality"][1]})
    directory = run.dir
    run.finish()
    wandb.teardown()  # stops the W&B service and clears WANDB_SERVICE, which a train.py started later would
    return directory  # inherit and attach to (a resumed run's id is then "in use" there)
