"""What made a run: the code version, the dataset, the library versions, the seed and the machine.

`provenance.json` in the run folder (its own file: it is not part of the config a resume compares):

    {"code": {"commit", "dirty"}, "dataset": {"name", "card_sha256"}, "versions": {"torch", "lightning",
     "transformers", "webdataset", ...}, "seed", "machine": {"hostname", "accelerator", "devices",
     "num_nodes", "world_size", "device_names", "cpu_count"}, "started"}

The first start of a run is the record; a resumed run adds its own start under "resumed". Every start
also puts it in the W&B config (`provenance`). The export's model card repeats it.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path

import lightning as L
import torch

from data_prep import CARD_NAME, DatasetCard, atomic_write_bytes

PROVENANCE_FILE = "provenance.json"
PACKAGES = ("fico-pipeline", "torch", "lightning", "transformers", "tokenizers", "webdataset", "numpy",
            "open_clip_torch", "wandb")
CODE_ROOT = Path(__file__).resolve().parents[2]  # the checkout that holds pipeline/


def code_version(root: Path = CODE_ROOT) -> dict:
    """The git commit of the code and whether its tracked or new files differ from it; nulls when the code
    is not a git checkout (an installed wheel: its package version says what it is)."""
    def git(*args) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top.strip()).resolve() != root:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain")
    return {"commit": (git("rev-parse", "HEAD") or "").strip() or None,
            "dirty": None if status is None else bool(status.strip())}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def card_hash(card) -> str:
    """The sha256 of a dataset card as it was read (a DatasetCard: from its folder or its server), or of
    the dataset.json in a folder."""
    data = card.source if isinstance(card, DatasetCard) else (Path(card) / CARD_NAME).read_bytes()
    return hashlib.sha256(data).hexdigest()


def machine(trainer) -> dict:
    cuda = torch.cuda.is_available() and type(trainer.accelerator).__name__ == "CUDAAccelerator"
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "accelerator": type(trainer.accelerator).__name__.removesuffix("Accelerator").lower(),
            "devices": trainer.num_devices, "num_nodes": trainer.num_nodes, "world_size": trainer.world_size,
            "device_names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []}


def provenance(cfg, card, trainer) -> dict:
    return {"code": code_version(), "dataset": {"name": card.name, "card_sha256": card_hash(card)},
            "versions": versions(), "seed": int(cfg.run.seed), "machine": machine(trainer),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def record(run_dir: Path, this_start: dict) -> dict:
    """provenance.json with this start: the record of a new run, or a resume added to it."""
    path = Path(run_dir) / PROVENANCE_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        saved.setdefault("resumed", []).append(this_start)
    else:
        saved = this_start
    atomic_write_bytes(path, (json.dumps(saved, indent=2) + "\n").encode())
    return saved


def read(folder: Path) -> dict | None:
    path = Path(folder) / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


class RecordProvenance(L.Callback):
    """Writes provenance.json and puts it in the logger's config once the ranks are known (setup), once
    per start, on rank 0."""

    def __init__(self, run_dir: Path, cfg, card):
        self.run_dir, self.cfg, self.card, self.done = Path(run_dir), cfg, card, False

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.done or not trainer.is_global_zero:
            return
        self.done = True
        this_start = provenance(self.cfg, self.card, trainer)
        record(self.run_dir, this_start)
        if trainer.logger is not None:
            trainer.logger.log_hyperparams({"provenance": this_start})
