"""Wall-time and pre-emption signals under SLURM: checkpoint, requeue, exit, without the DDP deadlock.

slurm/train.sbatch asks SLURM for SIGUSR1 90 s before the time limit. Lightning's own auto-requeue
handles that signal *inside* the signal handler: it saves the checkpoint, which ends in a barrier. A
rank that gets the signal while it loads data enters that barrier at once, while another rank
sits in the step's all_gather and runs its handler only when that returns, which it never does:
with 2 CPU ranks the job hung here until it was killed, never requeued. So the handler here only
sets a flag; the ranks agree on it at the end of each training step (one all-reduce of one
number, as Lightning already does for SIGTERM), then all save hpc_ckpt_N.ckpt together, rank 0
requeues the job, and every rank exits. The requeued job resumes from that checkpoint
(pipeline.training.run_dir.resume_checkpoint) in the same run directory and W&B run.
"""
from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


def slurm_preemption(job_tag: str | None) -> tuple[list[L.Callback], list]:
    """(callbacks, plugins) for the Trainer: under srun, SlurmRequeue and Lightning's SLURM environment
    with its own auto-requeue turned off; elsewhere nothing."""
    if not job_tag or not SLURMEnvironment.detect():
        return [], []
    return [SlurmRequeue(job_tag)], [SLURMEnvironment(auto_requeue=False)]


def next_hpc_checkpoint(folder: Path) -> Path:
    """hpc_ckpt_<N+1>.ckpt, Lightning's name for a checkpoint written before a requeue."""
    names = (re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name) for p in folder.glob("hpc_ckpt_*.ckpt"))
    numbers = [int(m.group(1)) for m in names if m]
    return folder / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def finish_wandb() -> None:
    """Flush and close the W&B run before the requeue SIGTERMs its service process (which would lose
    what it had not written yet); the restart continues the same run id."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.run.finish()
        wandb.teardown()  # and the service connection, else its exit hook fails noisily once SIGTERMed


class SlurmRequeue(L.Callback):
    """On the requeue signal: at the next step end, on all ranks together, save hpc_ckpt_N.ckpt in the run
    directory; rank 0 finishes the W&B run and requeues the job; every rank exits."""

    def __init__(self, job_tag: str, signum: int = signal.SIGUSR1):
        self.job_tag, self.signum, self.requested = job_tag, signum, False

    def setup(self, trainer, pl_module, stage):
        if stage == "fit":
            signal.signal(self.signum, self._on_signal)

    def _on_signal(self, signum, frame):
        self.requested = True  # nothing else here: no I/O, no collectives (see the module docstring)

    def _all_agree(self, trainer, pl_module) -> bool:
        flag = torch.tensor([int(self.requested)], device=pl_module.device)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # any rank that got the signal stops them all
        return bool(flag.item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self._all_agree(trainer, pl_module):
            return
        folder = Path(trainer.default_root_dir)
        path = next_hpc_checkpoint(folder)
        trainer.save_checkpoint(path)  # every rank calls it (it ends in a barrier); rank 0 writes
        # The requeue SIGTERMs this job while it exits; Lightning's SIGTERM handler would then broadcast
        # to ranks that are already gone. Nothing is left to save: let the exit finish undisturbed.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if not trainer.is_global_zero:
            leave()
        for old in folder.glob("hpc_ckpt_*.ckpt"):  # the newest one is all a restart needs
            if old != path:
                old.unlink(missing_ok=True)
        finish_wandb()
        done = subprocess.run(["scontrol", "requeue", self.job_tag], capture_output=True, text=True)
        if done.returncode != 0:
            log.error("saved %s at step %d but `scontrol requeue %s` failed (%s): resubmit with run.id=%s to resume",
                      path, trainer.global_step, self.job_tag, done.stderr.strip(), folder.name)
            leave(1)
        log.warning("SLURM signal %d: saved %s at step %d and requeued job %s", self.signum, path,
                    trainer.global_step, self.job_tag)
        leave()


def leave(code: int = 0):
    """Ends this training process. Without destroying the process group first, the exit of a gloo rank
    hung here until SLURM killed it (5 s later, its KillWait)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    raise SystemExit(code)
