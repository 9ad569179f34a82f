"""Trainer callbacks: throughput and data-wait, skipped-record counts, the epoch for data workers,
bounded collectives, and an atomic checkpoint writer."""
from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from data_prep import atomic_open
from pipeline.training.peers import bound_collectives

log = logging.getLogger(__name__)


class ThroughputMonitor(L.Callback):
    """Logs samples/s (all ranks together) and the time each step waited for its batch."""

    def __init__(self):
        self._batch_end = None
        self._window: list[tuple[float, float, int]] = []  # (data wait, step time, samples)

    def on_train_epoch_start(self, trainer, pl_module):
        self._batch_end = None  # the first batch of an epoch includes worker start-up: not a data wait

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        self._wait = now - self._batch_end if self._batch_end is not None else 0.0
        self._start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        samples = len(batch["image_ids"]) * trainer.world_size  # images may be a dict (token feature shards)
        self._window.append((self._wait, now - self._start + self._wait, samples))
        self._batch_end = now
        if len(self._window) >= trainer.log_every_n_steps:
            wait, total, n = (sum(x) for x in zip(*self._window))
            pl_module.log_dict({"train/samples_per_sec": n / max(total, 1e-9),
                                "train/data_wait_s": wait / len(self._window)}, rank_zero_only=True)
            self._window.clear()


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
    on every collective waits at most trainer.collective_timeout for its peers (pipeline/training/peers.py)."""

    def __init__(self, timeout):
        self.timeout = timeout

    def setup(self, trainer, pl_module, stage):
        bound_collectives(self.timeout)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the same folder, fsync, then rename: a kill at any moment
    leaves either the old checkpoint or the new one under the name that resume reads, never half
    of one. (Lightning's own transaction may stage the file in /tmp and *copy* it across devices.)"""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as f:
            torch.save(checkpoint, f)
