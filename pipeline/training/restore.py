"""A trained module back from its folder: a run folder (`train.py`'s) or an export folder (`python -m
pipeline.export`'s), the one place that knows how to rebuild one. The folder's own resolved config
rebuilds the encoders and heads (injected, as in training); its own tokenizer and category names
(run_files.py) stand in for the dataset, which is not needed; the weights go in strictly, except the
state only training needs (UCCH's memory bank), which is neither needed nor checked. Checkpoints load
as plain data only (weights_only) and exports are safetensors: a folder from someone else cannot run
code here. Used by the inference tools, and by training where one run learns from another (a teacher).

    cfg, module, inputs, weights = restore_module("runs/hash_64bit")
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import NamedTuple

import torch

from pipeline.config import ConfigError, load_config
from pipeline.data import DataError, RetrievalDataModule
from pipeline.training.build import build_module, complete_config, model_tokenizer
from pipeline.training.run_dir import FINISHED
from pipeline.training.run_files import RunInputs, has_inputs, inputs_of, read_inputs

log = logging.getLogger(__name__)

EXPORT_WEIGHTS = "model.safetensors"


class RunError(ValueError):
    """A run directory that cannot be used, explained in one line."""


class Restored(NamedTuple):
    cfg: object  # the folder's resolved config (with `overrides` applied)
    module: torch.nn.Module  # in eval mode, on the CPU
    inputs: RunInputs  # its tokenizer, image preprocessing and category names
    weights: Path  # the file the weights came from: a checkpoint, or an export's model.safetensors


def restore_module(run_dir, overrides: list[str] = (), checkpoint: str = "best") -> Restored:
    """The module of the run or export in `run_dir`. A run's weights: `checkpoints/<checkpoint>.ckpt`,
    falling back to `last.ckpt`; an export's: model.safetensors. `overrides` apply to the saved config
    (e.g. data.root=... for a run made before run folders held their tokenizer, whose data moved)."""
    path = Path(run_dir)
    if not (path / "config.yaml").is_file():
        raise RunError(f"{path}: no config.yaml (not a run directory written by train.py, nor an export)")
    try:
        cfg = complete_config(load_config(str(path / "config.yaml"), list(overrides)))
        inputs = read_inputs(path, cfg) if has_inputs(path) else _inputs_from_dataset(path, cfg)
    except (ConfigError, DataError, OSError) as e:
        raise RunError(f"{path}: {str(e).splitlines()[0]}") from None
    weights = weights_file(path, checkpoint)
    state = read_weights(weights)
    tok = inputs.tokenizer
    module = build_module(cfg, 1, len(tok), tok.pad_token_id or 0, load_init=False)  # the bank: training only
    try:
        module.load_inference_state(state)
    except RuntimeError as e:
        raise RunError(f"{weights}: {str(e).splitlines()[0]}") from None
    return Restored(cfg, module.eval(), inputs, weights)


def _inputs_from_dataset(path: Path, cfg) -> RunInputs:
    """A run made before run folders held their inputs: its dataset's tokenizer and categories."""
    log.warning("%s holds no model.json: reading its tokenizer and categories from its dataset", path)
    dm = RetrievalDataModule(cfg.data, seed=cfg.run.seed, tokenizer=model_tokenizer(cfg))
    return inputs_of(cfg, dm.card, dm.tokenizer)


def weights_file(path: Path, checkpoint: str = "best") -> Path:
    if (path / EXPORT_WEIGHTS).is_file() and not (path / "checkpoints").is_dir():
        return path / EXPORT_WEIGHTS
    names = (checkpoint, "last") if checkpoint == "best" else (checkpoint,)  # only best falls back to last
    found = next((p for p in (path / "checkpoints" / f"{name}.ckpt" for name in names) if p.is_file()), None)
    if found is None:
        has = sorted(p.stem for p in (path / "checkpoints").glob("*.ckpt"))
        raise RunError(f"{path}: no checkpoints/{' or '.join(f'{n}.ckpt' for n in names)} (has: "
                       f"{', '.join(has) or 'none'}), and no {EXPORT_WEIGHTS}; the checkpoint is best or last")
    if checkpoint == "best" and found.name == "last.ckpt" and (path / FINISHED).is_file():
        log.warning("%s: no best.ckpt; using last.ckpt", path)
    return found


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint (plain data only) or a safetensors file."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise RunError(f"{path}: not a readable safetensors file ({e})") from None
    return load_checkpoint(path)["state_dict"]


def load_checkpoint(path: Path) -> dict:
    """A checkpoint as plain data: tensors, dicts, lists, strings and numbers only (weights_only), so that a
    run folder from someone else cannot run code here; anything else is refused in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError) as e:  # e.g. a copy cut short: the zip archive has no central directory
        raise RunError(f"{path}: not a readable checkpoint (truncated or damaged: "
                       f"{str(e).splitlines()[0].split('. ')[0]})") from None
    except pickle.UnpicklingError as e:
        what = str(e).split("Unsupported global: ")[-1].split(" was not")[0].strip()[:120]
        raise RunError(f"{path}: refused: it holds Python objects beyond tensors and plain data ({what}), and "
                       f"unpickling them could run code; only load such a file if you trust where it came "
                       f"from") from None
