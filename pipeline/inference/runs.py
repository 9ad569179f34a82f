"""A trained run back in memory: its resolved config, its module with the checkpoint's weights, its data.

    run = load_run("runs/hash_64bit")             # config.yaml + checkpoints/best.ckpt

The module is rebuilt by ``pipeline.training.restore`` from the run's own resolved config and its
checkpoint (plain data only).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.training.restore import RunError, load_checkpoint, restore_module

__all__ = ["Run", "RunError", "load_checkpoint", "load_run"]


@dataclass
class Run:
    path: Path
    name: str
    cfg: object
    module: torch.nn.Module
    datamodule: object
    checkpoint: Path

    @property
    def family(self) -> str:
        return "hash" if self.cfg.model.kind == "hash" else "fine_grained"

    @property
    def measure(self) -> str:
        return self.module.measure

    @property
    def ks(self) -> tuple[int, ...]:
        return tuple(self.module.ks)

    @property
    def dim(self) -> int:
        return int(self.cfg.model.bits if self.family == "hash" else self.cfg.model.embed_dim)

    @property
    def representation(self) -> str:
        if self.family != "hash":
            return f"{self.dim}-d fp32"
        prefixes = self.module.prefixes
        return f"{self.dim}-bit codes" + (f", nested {'/'.join(map(str, prefixes))}" if prefixes else "")

    def test_metrics(self) -> dict | None:
        path = self.path / "test_metrics.json"
        return json.loads(path.read_text()) if path.is_file() else None


def load_run(run_dir, data_root: str | None = None, num_workers: int | None = None,
             checkpoint: str = "best") -> Run:
    """The run in ``run_dir`` with ``checkpoints/<checkpoint>.ckpt`` (``best``, falling back to ``last``).
    ``data_root`` overrides the dataset folder (moved data)."""
    overrides = [f"data.root={data_root}"] if data_root else []
    if num_workers is not None:
        overrides.append(f"data.num_workers={num_workers}")
    cfg, module, dm, ckpt = restore_module(run_dir, overrides, checkpoint)
    path = Path(run_dir)
    return Run(path, cfg.run.name or path.name, cfg, module, dm, ckpt)
