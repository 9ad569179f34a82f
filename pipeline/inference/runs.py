"""A trained run back in memory: its resolved config, its module with the checkpoint's weights, its data.

    run = load_run("runs/hash_64bit")             # config.yaml + checkpoints/best.ckpt

Modules take their encoders injected, so a run is rebuilt from its own resolved config with
``build_module`` and the checkpoint's ``state_dict`` is loaded into it (strictly: a mismatch is an
error, never a silently half-loaded model). Checkpoints load as plain data only (weights_only).
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import ConfigError, load_config
from pipeline.data import DataError, RetrievalDataModule
from pipeline.training.build import build_module


class RunError(ValueError):
    """A run directory that cannot be used, explained in one line."""


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
        return f"{self.dim}-bit codes" if self.family == "hash" else f"{self.dim}-d fp32"

    def test_metrics(self) -> dict | None:
        path = self.path / "test_metrics.json"
        return json.loads(path.read_text()) if path.is_file() else None


def load_run(run_dir, data_root: str | None = None, num_workers: int | None = None,
             checkpoint: str = "best") -> Run:
    """Rebuild a run's module from ``config.yaml`` and load ``checkpoints/<checkpoint>.ckpt``
    (``best``, falling back to ``last``). ``data_root`` overrides the dataset folder (moved data)."""
    path = Path(run_dir)
    if not (path / "config.yaml").is_file():
        raise RunError(f"{path}: no config.yaml (not a run directory written by train.py)")
    overrides = [f"data.root={data_root}"] if data_root else []
    if num_workers is not None:
        overrides.append(f"data.num_workers={num_workers}")
    try:
        cfg = load_config(str(path / "config.yaml"), overrides)
        dm = RetrievalDataModule(cfg.data, seed=cfg.run.seed)
    except (ConfigError, DataError) as e:
        raise RunError(f"{path}: {e}") from None
    ckpt = next((p for p in (path / "checkpoints" / f"{name}.ckpt" for name in (checkpoint, "last"))
                 if p.is_file()), None)
    if ckpt is None:
        raise RunError(f"{path}: no checkpoints/{checkpoint}.ckpt or last.ckpt")
    tok = dm.tokenizer
    module = build_module(cfg, dm.card.num_images("train"), len(tok), tok.pad_token_id or 0, load_init=False)
    module.load_state_dict(load_checkpoint(ckpt)["state_dict"], strict=True)
    module.eval()
    return Run(path, cfg.run.name or path.name, cfg, module, dm, ckpt)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint as plain data: tensors, dicts, lists, strings and numbers only (weights_only), so that a
    run folder from someone else cannot run code here; anything else is refused in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = str(e).split("Unsupported global: ")[-1].split(" was not")[0].strip()[:120]
        raise RunError(f"{path}: refused: it holds Python objects beyond tensors and plain data ({what}), and "
                       f"unpickling them could run code; only load such a file if you trust where it came "
                       f"from") from None
