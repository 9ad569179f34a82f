"""The Trainer of a run: its logger (W&B or CSV), checkpointing, callbacks and pre-emption handling."""
from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from pipeline.config import to_dict, trainer_devices
from pipeline.training.callbacks import (AtomicCheckpointIO, BoundedCollectives, DataEpoch, DataHealthMonitor,
                                         ThroughputMonitor)
from pipeline.training.peers import build_strategy, collective_timeout, set_auto_timeout
from pipeline.training.provenance import read as read_provenance
from pipeline.training.requeue import slurm_preemption
from pipeline.training.run_dir import slurm_job_tag, wandb_run_id

log = logging.getLogger(__name__)


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
                       id=wandb_run_id(run_dir), save_dir=str(run_dir), resume="allow", mode=mode,
                       tags=list(cfg.logger.tags), config=to_dict(cfg))


def build_trainer(cfg, run_dir: Path, monitor: str, extra_callbacks=()) -> L.Trainer:
    ckpt_dir = run_dir / "checkpoints"
    throughput = ThroughputMonitor()
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode="max",
                        save_top_k=1, save_last=True, auto_insert_metric_name=False, enable_version_counter=False),
        throughput, DataHealthMonitor(), DataEpoch(), BoundedCollectives(collective_timeout(cfg)),
        *extra_callbacks,
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
    strategy = build_strategy(cfg)  # with our wait for a stopped peer (pipeline/training/peers.py)
    t = cfg.trainer
    trainer = L.Trainer(
        default_root_dir=str(run_dir), max_epochs=t.max_epochs, max_steps=t.max_steps, accelerator=t.accelerator,
        devices=trainer_devices(cfg), num_nodes=t.num_nodes, strategy=strategy, precision=t.precision, logger=logger,
        callbacks=callbacks, log_every_n_steps=t.log_every_n_steps, num_sanity_val_steps=0,
        # with optim.accum_steps > 1 the module steps the optimizer itself and clips there
        gradient_clip_val=(cfg.optim.grad_clip or None) if cfg.optim.accum_steps == 1 else None, use_distributed_sampler=False,
        limit_val_batches=t.limit_val_batches, limit_test_batches=t.limit_test_batches,
        plugins=[AtomicCheckpointIO(), *cluster_plugins], profiler=throughput.fetches)
    set_auto_timeout(trainer, cfg)  # bounded waits for a stopped peer (pipeline/training/peers.py)
    return trainer


def upload_best_checkpoint(cfg, run_dir: Path, results: dict) -> bool:
    """`logger.log_model`: best.ckpt as a W&B model artifact of the run (aliases best, latest), with the
    test metrics and the run's provenance as metadata. Online runs only: an offline run's artifact would
    wait in the local folder for a `wandb sync` nobody asked for. Returns whether it was logged."""
    best = run_dir / "checkpoints" / "best.ckpt"
    if not (cfg.logger.wandb and cfg.logger.log_model):
        return False
    if wandb_mode(cfg.logger.mode) != "online" or not best.is_file():
        log.warning("logger.log_model: not uploading %s (%s)", best,
                    "the run is not online" if best.is_file() else "no best checkpoint")
        return False
    import wandb

    artifact = wandb.Artifact(f"model-{wandb_run_id(run_dir)}", type="model",
                              metadata={"test": results, "provenance": read_provenance(run_dir)})
    artifact.add_file(str(best), name="best.ckpt")
    wandb.log_artifact(artifact, aliases=["best", "latest"])
    return True
