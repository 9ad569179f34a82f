"""Reading a Karpathy split file (dataset_coco.json, dataset_flickr30k.json).

Format: {"dataset": ..., "images": [{"filename", "filepath" (COCO only), "split"
("train" | "val" | "test" | "restval"), "sentences": [{"raw", "tokens", ...}],
"imgid", "cocoid" (COCO only), ...}]}. The file's image order is kept: label
files (.npy/.mat) are aligned to it.
"""
from __future__ import annotations

import json
from pathlib import Path

from .entries import InputError, SkipLog


def read_karpathy(path) -> list:
    """The file's image entries, all of them, in order (label files align to it)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"Karpathy split file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read Karpathy split file {path}: {e}") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise InputError(f"{path} has no 'images' list: is it a Karpathy split file (dataset_*.json)?")
    return images


def usable_entry(image, position: int, skips: SkipLog) -> bool:
    """An entry needs at least a file name; others are skipped, not fatal."""
    if isinstance(image, dict) and isinstance(image.get("filename"), str):
        return True
    skips.skip("bad_karpathy_entry", f"images[{position}] has no 'filename'")
    return False


def raw_captions(image: dict) -> list:
    """The sentences' raw text (tokens joined when a file has no 'raw')."""
    out = []
    for sentence in image.get("sentences") or []:
        if isinstance(sentence, dict):
            out.append(sentence.get("raw") or " ".join(sentence.get("tokens") or []))
        else:
            out.append(sentence)
    return out
