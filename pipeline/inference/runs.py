"""A trained run back in memory: its resolved config, its module with the trained weights, its inputs.

    run = load_run("runs/hash_64bit")             # config.yaml + checkpoints/best.ckpt
    run = load_run("exports/hash_64bit")          # an export: config.yaml + model.safetensors

The module is rebuilt by ``pipeline.training.restore`` from the folder's own files (no dataset
needed). ``run.datamodule`` (the run's dataset, for encoding its splits) is opened on first use only.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from pipeline.data import DataError, RetrievalDataModule
from pipeline.training.restore import RunError, load_checkpoint, restore_module
from pipeline.training.run_files import RunInputs

__all__ = ["Run", "RunError", "load_checkpoint", "load_run", "weights_fingerprint"]


@dataclass
class Run:
    path: Path
    name: str
    cfg: object
    module: torch.nn.Module
    inputs: RunInputs
    checkpoint: Path  # the weights file: a checkpoint, or an export's model.safetensors

    @property
    def family(self) -> str:
        """The study's family: `hash` (binary codes) or `fine_grained` (continuous, token-level runs too:
        `tokens` says whether the run compares token sets, `representation` what it stores)."""
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
    def tokens(self) -> bool:
        """Whether the run compares token sets (its module has a token_scorer)."""
        return self.module.token_scorer is not None

    @property
    def scorer_name(self) -> str | None:
        """The token scorer and its direction, e.g. `LateInteraction (both)`; None without one."""
        scorer = self.module.token_scorer
        return None if scorer is None else scorer.name

    @property
    def representation(self) -> str:
        if self.tokens:
            return (f"{self.cfg.tokens.dim}-d fp32 token sets ({self.cfg.tokens.scorer}) + {self.dim}-d fp32 "
                    f"screen")
        if self.family != "hash":
            return f"{self.dim}-d fp32"
        prefixes = self.module.prefixes
        return f"{self.dim}-bit codes" + (f", nested {'/'.join(map(str, prefixes))}" if prefixes else "")

    @cached_property
    def datamodule(self) -> RetrievalDataModule:
        """The run's dataset (data.root of its config, or the override given to load_run)."""
        try:
            return RetrievalDataModule(self.cfg.data, seed=self.cfg.run.seed, tokenizer=self.inputs.tokenizer)
        except DataError as e:
            raise RunError(f"{self.path}: its dataset cannot be opened ({e}); pass data_root=... (--data-root)") \
                from None

    @cached_property
    def fingerprint(self) -> str:
        return weights_fingerprint(self.module)

    @property
    def test_scoring(self) -> dict:
        """How the run's test split was scored (test_scoring.json; else its config's test mode)."""
        path = self.path / "test_scoring.json"
        if path.is_file():
            return json.loads(path.read_text())
        mode = self.cfg.tokens.test_scoring if self.tokens else "exhaustive"
        return {"mode": mode, "screen_k": self.cfg.tokens.screen_k if mode == "screened" else None}

    def test_metrics(self) -> dict | None:
        path = self.path / "test_metrics.json"
        return json.loads(path.read_text()) if path.is_file() else None


def load_run(run_dir, data_root: str | None = None, num_workers: int | None = None,
             checkpoint: str = "best") -> Run:
    """The run (or export) in ``run_dir`` with ``checkpoints/<checkpoint>.ckpt`` (``best``, falling back
    to ``last``). ``data_root`` overrides the dataset folder (moved data) for encoding its splits."""
    overrides = [f"data.root={data_root}"] if data_root else []
    if num_workers is not None:
        overrides.append(f"data.num_workers={num_workers}")
    cfg, module, inputs, weights = restore_module(run_dir, overrides, checkpoint)
    path = Path(run_dir)
    return Run(path, cfg.run.name or path.name, cfg, module, inputs, weights)


def weights_fingerprint(module) -> str:
    """sha256 of the weights that encoding uses (names, dtypes, shapes, bytes), whatever file holds them:
    a run's checkpoint and its export give the same fingerprint."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.inference_state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
