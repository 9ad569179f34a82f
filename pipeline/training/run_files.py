"""What a run folder holds, besides its config and weights, so that it is used without its dataset.

    model.json     {"format", "categories", "tokenizer", "dataset"}: the category names, which tokenizer
                   the text side takes ("wordpiece": the dataset's, copied; "pretrained": data.tokenizer's
                   files, saved; "open_clip": the text tower's own, in the open_clip package; "none":
                   feature shards) and the name of the dataset it was trained on
    tokenizer/     the tokenizer's files (wordpiece: tokenizer.json; pretrained: save_pretrained's)

Written by rank 0 when a run starts (so that an unfinished run's last.ckpt is usable too) and copied
by `python -m pipeline.export`. `read_inputs` is their one reader.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from data_prep import atomic_write_bytes, remove_tree, tmp_sibling
from pipeline.data import NoTokenizer, image_transform, tokenize, wordpiece_tokenizer
from pipeline.models import openclip

MODEL_FILE = "model.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = 1


@dataclass
class RunInputs:
    """What turns images and texts into a trained module's inputs, as its run saw them."""

    tokenizer: object
    categories: list[str]
    transform: Callable  # PIL image -> normalised tensor (evaluation's preprocessing)
    max_text_len: int
    tokenizer_kind: str

    def tokenize(self, texts: list[str]) -> dict:
        return tokenize(self.tokenizer, list(texts), self.max_text_len)

    @property
    def takes_pixels(self) -> bool:
        """False for runs trained on feature shards (their encoders take features, not images)."""
        return self.tokenizer_kind != "none"


def tokenizer_kind(cfg, card, tokenizer) -> str:
    if card.features:
        return "none"
    if isinstance(tokenizer, openclip.OpenClipTokenizer):
        return "open_clip"
    return "pretrained" if cfg.data.tokenizer else "wordpiece"


def save_inputs(run_dir: Path, cfg, card, tokenizer) -> None:
    """model.json and tokenizer/ of a run (rank 0, at the start)."""
    kind = tokenizer_kind(cfg, card, tokenizer)
    if kind in ("wordpiece", "pretrained"):
        staged = tmp_sibling(run_dir / TOKENIZER_DIR)
        staged.mkdir(parents=True)
        if kind == "wordpiece":
            (staged / "tokenizer.json").write_bytes(card.file_bytes(card.tokenizer))  # on disk or on a server
        else:
            tokenizer.save_pretrained(str(staged))
        remove_tree(run_dir / TOKENIZER_DIR)
        staged.rename(run_dir / TOKENIZER_DIR)
    meta = {"format": FORMAT, "categories": list(card.categories), "tokenizer": kind, "dataset": card.name}
    atomic_write_bytes(run_dir / MODEL_FILE, (json.dumps(meta, indent=2) + "\n").encode())


def has_inputs(folder: Path) -> bool:
    return (Path(folder) / MODEL_FILE).is_file()


def read_inputs(folder: Path, cfg) -> RunInputs:
    """The inputs of the run (or export) in `folder`, from its own files: no dataset needed."""
    folder = Path(folder)
    meta = json.loads((folder / MODEL_FILE).read_text())
    kind = meta["tokenizer"]
    if kind == "wordpiece":
        tokenizer = wordpiece_tokenizer(folder / TOKENIZER_DIR / "tokenizer.json")
    elif kind == "pretrained":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder / TOKENIZER_DIR))
    elif kind == "open_clip":
        tokenizer = openclip.OpenClipTokenizer(cfg.model.text_encoder.name)
    else:
        tokenizer = NoTokenizer()
    return RunInputs(tokenizer, list(meta["categories"]), image_transform(cfg.data.image_size, cfg.data.mean,
                                                                             cfg.data.std),
                     cfg.data.max_text_len, kind)


def inputs_of(cfg, card, tokenizer) -> RunInputs:
    """The same from a dataset (runs made before run folders held their inputs)."""
    return RunInputs(tokenizer, list(card.categories), image_transform(cfg.data.image_size, cfg.data.mean,
                                                                          cfg.data.std),
                     cfg.data.max_text_len, "none" if card.features else "dataset")


def copy_inputs(src: Path, dst: Path) -> None:
    """model.json and tokenizer/ of a run into an export folder."""
    shutil.copyfile(Path(src) / MODEL_FILE, Path(dst) / MODEL_FILE)
    if (Path(src) / TOKENIZER_DIR).is_dir():
        shutil.copytree(Path(src) / TOKENIZER_DIR, Path(dst) / TOKENIZER_DIR)
