"""The run directory: where a run lives (stable, never time-stamped, so that a requeued job finds it),
whether a run there may be resumed, its W&B id, and the metric that picks its best checkpoint."""
from __future__ import annotations

import json
import os
import re
import secrets
import time
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from data_prep import tmp_sibling
from pipeline.config import Config, ConfigError, flat, to_dict
from pipeline.training.build import module_class
from pipeline.training.provenance import card_hash
from pipeline.training.provenance import read as read_provenance

RUN_DIR_ENV = "FICO_RUN_DIR"  # set by rank 0 so that processes Lightning launches use the same folder
FINISHED = "test_metrics.json"
WANDB_ID_FILE = "wandb_run_id"


def slurm_job_tag() -> str | None:
    """ARRAYJOB_TASK for array tasks, else the job id; survives `scontrol requeue`."""
    env = os.environ
    if env.get("SLURM_JOB_NAME") in ("bash", "interactive"):  # an interactive shell, not a batch job
        return None
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def resolve_run_dir(cfg) -> Path:
    """A stable folder (never time-stamped, so that a requeued job finds its checkpoints):
    run.id if given; under SLURM `<name>-<job>`; locally `<name>`, which an unfinished run resumes
    and a finished run never gets overwritten in (the next free `<name>-2`, `-3`, ...)."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    root = Path(cfg.run.root)
    if cfg.run.id:
        return root / cfg.run.id
    job = slurm_job_tag()
    if job:
        return root / f"{cfg.run.name}-{job}"
    candidate, n = root / cfg.run.name, 1
    while (candidate / FINISHED).exists():
        n += 1
        candidate = root / f"{cfg.run.name}-{n}"
    return candidate


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run directory: made once when the directory is new (a W&B sweep agent's
    WANDB_RUN_ID when it set one, with its WANDB_SWEEP_ID, else random), then read back, so that a resumed
    or requeued job continues its run while a deleted and re-made directory starts a new one. Every rank
    calls this; the first to create the file wins (hard link of a complete file: never half-written), the
    others read it."""
    path = run_dir / WANDB_ID_FILE
    if not path.is_file():
        # a sweep agent sets both; WANDB_RUN_ID alone is likely left over in the shell, and would join
        # every fresh run folder into one W&B run
        agent = os.environ.get("WANDB_RUN_ID") if os.environ.get("WANDB_SWEEP_ID") else None
        new = agent or f"{re.sub(r'[^A-Za-z0-9_-]', '-', run_dir.name)[:40]}-{secrets.token_hex(4)}"
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = tmp_sibling(path)
        tmp.write_text(new + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another rank was first: its id is the run's
        finally:
            tmp.unlink()
    return path.read_text().strip()


def resume_checkpoint(run_dir: Path) -> str | None:
    """The newest of SLURM's hpc_ckpt_*.ckpt (written on the requeue signal) and last.ckpt."""
    last = run_dir / "checkpoints" / "last.ckpt"
    candidates = list(run_dir.glob("hpc_ckpt_*.ckpt")) + ([last] if last.is_file() else [])
    return str(max(candidates, key=lambda p: p.stat().st_mtime)) if candidates else None


def schema_defaults() -> dict:
    """Every config key's default, dotted."""
    return flat(to_dict(OmegaConf.structured(Config)))


# Keys that do not change what a run learns: a resume may change them freely (where the data or the
# run folder now live, how fast data loads, how the run is logged and checkpointed, whether activations
# are recomputed or the encoders compiled).
MAY_CHANGE_ON_RESUME = ("data.root", "data.shapes_dir", "data.num_workers", "data.eval_batch_size", "logger.",
                        "data.shard_url_command", "data.shard_retries", "data.shard_retry_wait", "data.shard_timeout",
                        "trainer.ckpt_every_n_steps", "trainer.log_every_n_steps", "trainer.collective_timeout",
                        "run.root", "run.name", "run.id", "run.allow_changes", "model.image_encoder.grad_checkpointing",
                        "model.text_encoder.grad_checkpointing", "trainer.compile")


def config_changes(saved: dict, new: dict, allowed=()) -> dict[str, tuple]:
    """{key: (saved value, new value)} for every key that changes the result, except `allowed` ones. A key
    the saved config lacks (added to the schema since the run started) had its default's effect then: it
    counts as changed only when the new value differs from that default."""
    old, cur = {**schema_defaults(), **flat(saved)}, flat(new)
    free = MAY_CHANGE_ON_RESUME + tuple(allowed)
    return {k: (old.get(k), cur.get(k)) for k in sorted(set(old) | set(cur))
            if old.get(k) != cur.get(k) and not any(k == f or (f.endswith(".") and k.startswith(f)) for f in free)}


def dataset_change(run_dir: Path, card) -> tuple[str, str] | None:
    """(recorded, current) dataset card hashes when the run's latest start trained on another card. The
    card, not data.root, says which dataset it is: the folder may move (data.root may change)."""
    saved = read_provenance(run_dir)
    if not saved:
        return None
    old = ((saved.get("resumed") or [saved])[-1].get("dataset") or {}).get("card_sha256")
    new = card_hash(card)
    return (old, new) if old and old != new else None


def check_resume(run_dir: Path, cfg, card=None) -> dict[str, tuple]:
    """Raises ConfigError (one line, both ways out) when the unfinished run in `run_dir` was started with
    settings that change the result, or on another dataset card than `card`; returns the changes
    `run.allow_changes` lets through (another dataset: `data.root`)."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"{run_dir} holds checkpoints but no config.yaml, so what they were trained with is "
                          f"unknown: train a new run with run.name=<another name>, or delete {run_dir}")
    saved = yaml.safe_load(saved_path.read_text()) or {}
    changes = config_changes(saved, to_dict(cfg), cfg.run.allow_changes)
    if changes:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
        raise ConfigError(f"{run_dir} holds an unfinished run trained with other settings ({listed}): train a new "
                          f"run with run.name=<another name>, or resume this one anyway with "
                          f"run.allow_changes=[{','.join(changes)}]")
    dataset = dataset_change(run_dir, card) if card is not None else None
    if dataset and "data.root" not in cfg.run.allow_changes:
        raise ConfigError(f"{run_dir} holds an unfinished run trained on another dataset (its card's sha256 "
                          f"{dataset[0][:12]}..., {card.root}'s {dataset[1][:12]}...): resume with the dataset it was "
                          f"trained on, train a new run with run.name=<another name>, or resume onto this dataset "
                          f"anyway with run.allow_changes=[data.root]")
    return {**config_changes(saved, to_dict(cfg)), **({"dataset.card_sha256": dataset} if dataset else {})}


def record_resume(run_dir: Path, checkpoint: str, changes: dict[str, tuple]) -> None:
    """One line per resume in resumes.jsonl, with the changes allowed through: the run's own history."""
    line = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "checkpoint": checkpoint,
            "changes": {k: list(v) for k, v in changes.items()}}
    with open(run_dir / "resumes.jsonl", "a") as f:
        f.write(json.dumps(line, default=str) + "\n")


def choose_monitor(cfg, card, metric_names: list[str]) -> tuple[str, str | None]:
    """The validation metric that selects best.ckpt, decided before any training from the dataset card:
    (name, a note to log when it is not what the config asked for). By default the family's own
    (`monitor` of its module class: category-level mAP for hashing, R@K's rsum for fine-grained and
    instance-level hashing). A mAP metric needs labels on the validation split (without them it is
    absent, or 0 every epoch and "best" stays at epoch 1): then val/rsum."""
    names = [f"val/{n}" for n in metric_names]
    labelled = card.labelled("val")
    if cfg.run.monitor:
        if cfg.run.monitor not in names:
            raise ConfigError(f"config key 'run.monitor' is {cfg.run.monitor!r}, which this model does not log; "
                              f"allowed: {', '.join(names)}")
        if "mAP" in cfg.run.monitor and not labelled:
            raise ConfigError(f"config key 'run.monitor' is {cfg.run.monitor} but the validation split of "
                              f"{card.root} has no labels; monitor val/rsum instead")
        return cfg.run.monitor, None
    preferred = module_class(cfg).monitor
    if "mAP" in preferred and not labelled:
        return "val/rsum", (f"the validation split of {card.root} has no labels: best.ckpt is chosen by val/rsum "
                            f"(instance-level) instead of {preferred}")
    return preferred, None
