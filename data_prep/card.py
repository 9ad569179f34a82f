"""The dataset card: `dataset.json` next to the shards.

Field names are a contract with `pipeline.data` (see DESIGN.md):
name, version, categories, image_key, tokenizer, splits{shards, shard_sizes,
num_images, num_captions, num_without_labels}, made_with, skipped. Shard paths are relative to the card's folder.
"""
from __future__ import annotations

import json
from pathlib import Path

from .fsutil import atomic_write_bytes

CARD_NAME = "dataset.json"
CARD_VERSION = 1


def split_entry(shards: list[str], num_images: int, num_captions: int, shard_sizes: list[int] | None = None) -> dict:
    """One split of the card; `shard_sizes` (records per shard, in shard order) lets training cut an epoch
    into equal runs without reading the shards first."""
    return {"shards": list(shards), "num_images": int(num_images), "num_captions": int(num_captions),
            "shard_sizes": [int(n) for n in shard_sizes or []]}


def make_card(name: str, categories: list[str], image_key: str, splits: dict,
              made_with: dict, skipped: dict | None = None,
              tokenizer: str = "tokenizer.json", **extra) -> dict:
    card = {
        "name": name,
        "version": CARD_VERSION,
        "categories": list(categories),
        "image_key": image_key,
        "tokenizer": tokenizer,
        "splits": splits,
        "made_with": made_with,
        "skipped": dict(skipped or {}),
    }
    card.update(extra)
    return card


def write_card(out_dir, card: dict) -> Path:
    """Write `out_dir/dataset.json` atomically; returns its path."""
    path = Path(out_dir) / CARD_NAME
    text = json.dumps(card, indent=2, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def read_card(out_dir) -> dict:
    return json.loads((Path(out_dir) / CARD_NAME).read_text(encoding="utf-8"))
