"""A trained module back from its run folder: the run's own resolved config rebuilds the encoders and
heads (injected, as in training), and the checkpoint's weights go in strictly (a mismatch is an error,
never a silently half-loaded model). Checkpoints load as plain data only (weights_only): a run folder
from someone else cannot run code here. Used by the inference tools, and by training where one run
learns from another (a teacher)."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from pipeline.config import ConfigError, load_config
from pipeline.data import DataError, RetrievalDataModule
from pipeline.training.build import build_module


class RunError(ValueError):
    """A run directory that cannot be used, explained in one line."""


def restore_module(run_dir, overrides: list[str] = (), checkpoint: str = "best"):
    """(config, module in eval mode, its datamodule, the checkpoint file) of the run in `run_dir`:
    `checkpoints/<checkpoint>.ckpt`, falling back to `last.ckpt`. `overrides` apply to the saved config
    (e.g. data.root=... when the data moved)."""
    path = Path(run_dir)
    if not (path / "config.yaml").is_file():
        raise RunError(f"{path}: no config.yaml (not a run directory written by train.py)")
    try:
        cfg = load_config(str(path / "config.yaml"), list(overrides))
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
    return cfg, module.eval(), dm, ckpt


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
