"""The dataset card: `dataset.json` next to the shards, written here and read by the pipeline.

Fields: name, version, categories, image_key, tokenizer, splits{shards, shard_sizes,
num_images, num_captions, num_without_labels}, made_with, skipped; feature shards add
`features` (see data_prep/schema.py). Shard paths are relative to the card's folder.
`DatasetCard` is how the training side reads it: the one reader of the contract.
"""
from __future__ import annotations

import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .fsutil import atomic_write_bytes

log = logging.getLogger("data_prep")

CARD_NAME = "dataset.json"
CARD_VERSION = 1


class DataError(ValueError):
    """A dataset that cannot be used, explained in one line (with the fix)."""


def split_entry(shards: list[str], num_images: int, num_captions: int, shard_sizes: list[int] | None = None) -> dict:
    """One split of the card; `shard_sizes` (records per shard, in shard order) lets training cut an epoch
    into equal runs without reading the shards first."""
    return {"shards": list(shards), "num_images": int(num_images), "num_captions": int(num_captions),
            "shard_sizes": [int(n) for n in shard_sizes or []]}


def make_card(name: str, categories: list[str], image_key: str, splits: dict,
              made_with: dict, skipped: dict | None = None,
              tokenizer: str | None = "tokenizer.json", **extra) -> dict:
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


@dataclass
class DatasetCard:
    """A dataset folder as training reads it: its card, with the shard paths checked."""

    root: Path
    name: str
    categories: list[str]
    image_key: str
    tokenizer: str | None
    splits: dict
    features: dict | None = None  # feature shards: {"image_dim", "text_dim", "source_config", ...}
    layout: str = "fico"  # "wds": shards made by others, read where they are (data_prep/wds.py)

    @classmethod
    def read(cls, root: str | Path) -> "DatasetCard":
        root = Path(root)
        if not (root / CARD_NAME).is_file():
            raise DataError(f"no dataset card at {root / CARD_NAME}: point data.root at a folder made by "
                            f"`python -m data_prep ...`, or leave data.root empty for the shapes default")
        raw = read_card(root)
        return cls(root, raw["name"], list(raw["categories"]), raw.get("image_key", "png"),
                   raw.get("tokenizer"), raw["splits"], raw.get("features"), raw.get("layout", "fico"))

    def shards(self, split: str) -> list[str]:
        if split not in self.splits:
            raise DataError(f"{self.root}/{CARD_NAME} has no '{split}' split (has: {', '.join(self.splits)})")
        paths = [str(self.root / s) for s in self.splits[split]["shards"]]
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise DataError(f"{len(missing)} shard(s) of split '{split}' are missing, e.g. {missing[0]}: "
                            f"re-run data_prep into {self.root}")
        return paths

    def first_index(self, split: str) -> dict[str, int]:
        """wds layout: shard path -> the split index of its first record (records carry no index)."""
        return dict(zip(self.shards(split), map(int, self.splits[split]["first_index"])))

    def num_images(self, split: str) -> int:
        return int(self.splits[split]["num_images"])

    def shard_sizes(self, split: str) -> dict[str, int]:
        """Records per shard (path -> count), from the card, or counted in the tars for older cards."""
        urls = self.shards(split)
        sizes = self.splits[split].get("shard_sizes")
        if sizes is None or len(sizes) != len(urls):
            sizes = [count_records(u) for u in urls]
            self.splits[split]["shard_sizes"] = sizes  # once per process
        return dict(zip(urls, map(int, sizes)))

    def labelled(self, split: str) -> bool:
        """Whether the split's records carry category labels (category-level mAP needs them)."""
        entry = self.splits.get(split, {})
        return bool(self.categories) and int(entry.get("num_without_labels", 0)) < int(entry.get("num_images", 0))


def count_records(tar_path: str) -> int:
    """Records in a shard: distinct keys of its members (webdataset's grouping; headers only, the data
    is skipped). A damaged tar counts what it holds up to the damage."""
    keys = set()
    try:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.isfile():  # key = the name up to the first dot after the last slash
                    dot = member.name.find(".", member.name.rfind("/") + 1)
                    keys.add(member.name[:dot] if dot >= 0 else member.name)
    except (tarfile.TarError, OSError) as e:
        log.warning("%s: counted %d records before %s", tar_path, len(keys), e)
    return len(keys)
