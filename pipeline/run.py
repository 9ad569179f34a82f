"""Everything around the training step: the run directory, the logger, callbacks and the Trainer."""
from __future__ import annotations

import hashlib
import netrc
import os
import re
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from pipeline.callbacks import AtomicCheckpointIO, DataEpoch, DataHealthMonitor, ThroughputMonitor
from pipeline.config import to_dict
from pipeline.requeue import slurm_preemption

RUN_DIR_ENV = "FICO_RUN_DIR"  # set by rank 0 so that processes Lightning launches use the same folder
FINISHED = "test_metrics.json"


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


def run_id(run_dir: Path) -> str:
    """W&B run id: readable and stable for the folder, so that a resumed job continues the same run."""
    digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9_-]", "-", run_dir.name)[:48] + "-" + digest


def resume_checkpoint(run_dir: Path) -> str | None:
    """The newest of SLURM's hpc_ckpt_*.ckpt (written on the requeue signal) and last.ckpt."""
    last = run_dir / "checkpoints" / "last.ckpt"
    candidates = list(run_dir.glob("hpc_ckpt_*.ckpt")) + ([last] if last.is_file() else [])
    return str(max(candidates, key=lambda p: p.stat().st_mtime)) if candidates else None


def wandb_mode(configured: str | None) -> str:
    """WANDB_MODE wins, then the config; otherwise online only when this machine is logged in."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if configured:
        return configured
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"


def build_logger(cfg, run_dir: Path):
    if not cfg.logger.wandb:
        return CSVLogger(save_dir=str(run_dir), name="", version="csv")
    mode = wandb_mode(cfg.logger.mode)
    return WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity, name=run_dir.name,
                       id=run_id(run_dir), save_dir=str(run_dir), resume="allow", mode=mode,
                       tags=list(cfg.logger.tags), config=to_dict(cfg))


def default_monitor(cfg) -> str:
    return cfg.run.monitor or ("val/i2t_mAP@N" if cfg.model.kind == "hash" else "val/rsum")


def build_trainer(cfg, run_dir: Path) -> L.Trainer:
    ckpt_dir = run_dir / "checkpoints"
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=default_monitor(cfg), mode="max",
                        save_top_k=1, save_last=True, auto_insert_metric_name=False, enable_version_counter=False),
        ThroughputMonitor(), DataHealthMonitor(), DataEpoch(),
    ]
    if cfg.trainer.ckpt_every_n_steps:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=0, save_last=True,
                                         every_n_train_steps=cfg.trainer.ckpt_every_n_steps,
                                         enable_version_counter=False))  # both write the one last.ckpt
    # under SLURM: checkpoint + requeue on the wall-time signal without Lightning's DDP deadlock (pipeline/requeue.py)
    requeue_callbacks, cluster_plugins = slurm_preemption(slurm_job_tag())
    callbacks += requeue_callbacks
    logger = build_logger(cfg, run_dir)
    if cfg.logger.wandb:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    strategy = cfg.trainer.strategy
    if strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # The hash memory bank is updated identically on every rank: no need to broadcast it each step.
        strategy = DDPStrategy(broadcast_buffers=False)
    t = cfg.trainer
    return L.Trainer(
        default_root_dir=str(run_dir), max_epochs=t.max_epochs, max_steps=t.max_steps, accelerator=t.accelerator,
        devices=t.devices, num_nodes=t.num_nodes, strategy=strategy, precision=t.precision, logger=logger,
        callbacks=callbacks, log_every_n_steps=t.log_every_n_steps, num_sanity_val_steps=0,
        gradient_clip_val=cfg.optim.grad_clip or None, use_distributed_sampler=False,
        limit_val_batches=t.limit_val_batches, limit_test_batches=t.limit_test_batches,
        plugins=[AtomicCheckpointIO(), *cluster_plugins])
