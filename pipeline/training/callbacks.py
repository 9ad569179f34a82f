"""Trainer callbacks: throughput and data-wait, skipped-record counts, the epoch for data workers,
bounded collectives, and an atomic checkpoint writer."""
from __future__ import annotations

import json
import logging
import resource
import statistics
import sys
import time
from collections import Counter, deque
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.profilers import Profiler

from data_prep import atomic_open, atomic_write_bytes
from pipeline.training.heartbeat import stop_all as stop_heartbeats
from pipeline.training.peers import bound_collectives

log = logging.getLogger(__name__)


class FetchTimer(Profiler):
    """The Trainer's profiler, timing one action only: the training loop's wait for its next batch (the
    fetch from the data loader, workers' start-up at an epoch's first batch excluded). Checkpoint writes and
    logging between steps are not data waits, which is why this is not the gap between two steps."""

    ACTION = "train_dataloader_next"  # Lightning's name: "[_TrainingEpochLoop].train_dataloader_next"

    def __init__(self):
        super().__init__()
        self.total, self._began = 0.0, None

    def start(self, action_name):
        if action_name.endswith(self.ACTION):
            self._began = time.perf_counter()

    def stop(self, action_name):
        if action_name.endswith(self.ACTION) and self._began is not None:
            self.total += time.perf_counter() - self._began
            self._began = None


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(GiB, what was measured): on a GPU, CUDA's peak allocated memory there; else the training process's peak
    resident memory (its data workers are processes of their own, not counted)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20), "process_max_rss"


class ThroughputMonitor(L.Callback):
    """After every training step, over the last `trainer.log_every_n_steps` steps (so that whatever step Lightning
    writes to the logger, the figures cover the steps before it): samples/s of all ranks together, the step
    time, the share of it spent waiting for data, and peak memory; in the progress bar too. At the end of fit,
    rank 0 writes throughput.json in the run folder: medians over the run's steps and totals.
    Rank 0's clock and memory stand for all ranks (no collective to gather them)."""

    SUMMARY = "throughput.json"

    def __init__(self):
        self.fetches = FetchTimer()  # the Trainer's profiler (build_trainer passes it)
        self._steps: list[tuple[float, float, int]] = []  # (step time, data wait, samples) of every step
        self._window: deque = deque()
        self._fetched = 0.0  # the fetch timer's total at the end of the previous step
        self._last_end = None  # when the previous step ended; None: the next step starts at its batch

    def on_train_start(self, trainer, pl_module):  # also on a resume in mid-epoch (no epoch start then)
        self._window = deque(maxlen=trainer.log_every_n_steps)
        self._last_end = None

    def on_train_epoch_start(self, trainer, pl_module):
        self._last_end = None  # the first step of an epoch starts at its batch, not after validation
        self._window.clear()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        wait = self.fetches.total - self._fetched
        self._fetched = self.fetches.total
        took = now - (self._last_end if self._last_end is not None else self._start - wait)
        self._last_end = now
        samples = len(batch["image_ids"]) * trainer.world_size  # images may be a dict (token feature shards)
        self._steps.append((took, wait, samples))
        self._window.append((took, wait, samples))
        took, wait, samples = (sum(x) for x in zip(*self._window))
        memory, _ = peak_memory(pl_module.device)
        speed, frac = samples / max(took, 1e-9), min(wait / max(took, 1e-9), 1.0)
        pl_module.log_dict({"train/samples_per_sec": speed, "train/step_time_s": took / len(self._window),
                            "train/data_wait_s": wait / len(self._window), "train/data_wait_frac": frac,
                            "train/peak_mem_gib": memory}, rank_zero_only=True)
        # the same under short names in the progress bar (the long ones are cut off there)
        pl_module.log_dict({"samples/s": speed, "step_s": took / len(self._window), "data_wait": frac,
                            "peak_GiB": memory}, prog_bar=True, logger=False, rank_zero_only=True)

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero and self._steps:
            text = json.dumps(self.summary(trainer.world_size, pl_module.device), indent=2) + "\n"
            atomic_write_bytes(Path(trainer.default_root_dir) / self.SUMMARY, text.encode())

    def summary(self, world_size: int, device: torch.device) -> dict:
        took, wait, samples = (list(x) for x in zip(*self._steps))
        memory, kind = peak_memory(device)
        return {"steps": len(took), "samples": sum(samples), "seconds": sum(took), "world_size": world_size,
                "samples_per_sec": sum(samples) / max(sum(took), 1e-9),
                "median_samples_per_sec": statistics.median(n / max(t, 1e-9) for n, t in zip(samples, took)),
                "median_step_time_s": statistics.median(took), "median_data_wait_s": statistics.median(wait),
                "data_wait_frac": min(sum(wait) / max(sum(took), 1e-9), 1.0),
                "median_data_wait_frac": statistics.median(min(w / max(t, 1e-9), 1.0) for w, t in zip(wait, took)),
                "peak_mem_gib": memory, "peak_mem_kind": kind}


class DataHealthMonitor(L.Callback):
    """Adds up the skipped-record counts that ride along with each batch and logs them as
    `data/skipped_<reason>` (cumulative per stage); a summary line at the end of each stage."""

    def __init__(self):
        self.counts = {"train": Counter(), "val": Counter(), "test": Counter()}

    def _add(self, stage, pl_module, batch):
        skipped = batch.get("skipped") if isinstance(batch, dict) else None
        if skipped:
            self.counts[stage].update(skipped)
            pl_module.log_dict({f"data/{stage}_skipped_{k}": float(v) for k, v in self.counts[stage].items()},
                               reduce_fx="sum", sync_dist=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._add("train", pl_module, batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._add("val", pl_module, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._add("test", pl_module, batch)

    def on_validation_epoch_start(self, trainer, pl_module):
        self.counts["val"].clear()  # each validation reads the split afresh

    def _report(self, stage):
        if self.counts[stage]:
            log.warning("%s: skipped records on this rank: %s", stage, dict(self.counts[stage]))

    def on_train_end(self, trainer, pl_module):
        self._report("train")

    def on_test_end(self, trainer, pl_module):
        self._report("test")


class DataEpoch(L.Callback):
    """Pushes the epoch into the data workers (Lightning only does this for samplers)."""

    def on_train_epoch_start(self, trainer, pl_module):
        trainer.datamodule.set_epoch(trainer.current_epoch)


class BoundedCollectives(L.Callback):
    """Lightning calls `setup` right after making the process group (with the long start-up wait): from then
    on every collective waits at most trainer.collective_timeout for its peers, and with more than two ranks
    each one beats (pipeline/training/peers.py, heartbeat.py) until `teardown`."""

    def __init__(self, timeout):
        self.timeout = timeout

    def setup(self, trainer, pl_module, stage):
        bound_collectives(self.timeout)

    def teardown(self, trainer, pl_module, stage):
        stop_heartbeats()


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the same folder, fsync, then rename: a kill at any moment
    leaves either the old checkpoint or the new one under the name that resume reads, never half
    of one. (Lightning's own transaction may stage the file in /tmp and *copy* it across devices.)"""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as f:
            torch.save(checkpoint, f)
