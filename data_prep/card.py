"""The dataset card: `dataset.json` next to the shards, written here and read by the pipeline.

Fields: name, version, categories, image_key, tokenizer, splits{shards, shard_sizes,
num_images, num_captions, num_without_labels}, made_with, skipped; feature shards add
`features` (see data_prep/schema.py). Shard paths are relative to the card's folder.
`DatasetCard` is how the training side reads it: the one reader of the contract, from a folder or
from an http(s) URL of one (data_prep/urls.py). A card names files, never commands.
"""
from __future__ import annotations

import json
import logging
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from .fsutil import atomic_write_bytes
from .urls import describe_error, fetch, folder_url, is_url, url_in

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

    root: Path | str  # a folder, or the URL of one (with its trailing slash)
    name: str
    categories: list[str]
    image_key: str
    tokenizer: str | None
    splits: dict
    features: dict | None = None  # feature shards: {"image_dim", "text_dim", "source_config", ...}
    layout: str = "fico"  # "wds": shards made by others, read where they are (data_prep/wds.py)
    source: bytes = field(default=b"", repr=False)  # the card's own bytes (what provenance hashes)

    @classmethod
    def read(cls, root: str | Path) -> "DatasetCard":
        if is_url(root):
            root = folder_url(str(root))
            try:
                source = fetch(root + CARD_NAME)
            except OSError as e:
                raise DataError(f"cannot fetch {root}{CARD_NAME} ({describe_error(e)}): point data.root at a folder "
                                f"on a server that holds a dataset made by `python -m data_prep ...`") from None
        else:
            root = Path(root)
            if not (root / CARD_NAME).is_file():
                raise DataError(f"no dataset card at {root / CARD_NAME}: point data.root at a folder made by "
                                f"`python -m data_prep ...`, or leave data.root empty for the shapes default")
            source = (root / CARD_NAME).read_bytes()
        try:
            raw = json.loads(source.decode("utf-8"))
            return cls(root, raw["name"], list(raw["categories"]), raw.get("image_key", "png"),
                       raw.get("tokenizer"), raw["splits"], raw.get("features"), raw.get("layout", "fico"), source)
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{cls.where(root)} is not a dataset card ({type(e).__name__}: {e}): re-make it with "
                            f"`python -m data_prep ...`") from None

    @staticmethod
    def where(root, name: str = CARD_NAME) -> str:
        return f"{root}{name}" if is_url(root) else str(Path(root) / name)

    @property
    def remote(self) -> bool:
        return is_url(self.root)

    def shard_names(self, split: str) -> list[str]:
        """The split's shard names as the card gives them (relative to its folder)."""
        if split not in self.splits:
            raise DataError(f"{self.where(self.root)} has no '{split}' split (has: {', '.join(self.splits)})")
        return [str(s) for s in self.splits[split]["shards"]]

    def shards(self, split: str) -> list[str]:
        """Where the split's shards are read: paths in the folder (checked), or URLs inside the card's
        folder URL (a name that leads out of it is refused: the card may come from anyone)."""
        names = self.shard_names(split)
        if self.remote:
            urls = [url_in(self.root, n) for n in names]
            outside = [n for n, u in zip(names, urls) if u is None]
            if outside:
                raise DataError(f"{self.where(self.root)} names shard {outside[0]!r} of split '{split}', which is "
                                f"not a file inside {self.root}: only names relative to the card's folder are read")
            return urls
        paths = [str(self.root / s) for s in names]
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise DataError(f"{len(missing)} shard(s) of split '{split}' are missing, e.g. {missing[0]}: "
                            f"re-run data_prep into {self.root}")
        return paths

    def file_bytes(self, name: str) -> bytes:
        """A file of the dataset's folder (its tokenizer.json), from the disk or the server."""
        if not self.remote:
            return (Path(self.root) / name).read_bytes()
        url = url_in(self.root, name)
        if url is None:
            raise DataError(f"{self.where(self.root)} names {name!r}, which is not a file inside {self.root}")
        try:
            return fetch(url)
        except OSError as e:
            raise DataError(f"cannot fetch {url} ({describe_error(e)})") from None

    def first_index(self, split: str) -> list[int]:
        """wds layout: the split index of each shard's first record, in shard order (records carry none)."""
        return [int(i) for i in self.splits[split]["first_index"]]

    def num_images(self, split: str) -> int:
        return int(self.splits[split]["num_images"])

    def shard_sizes(self, split: str) -> dict[str, int]:
        """Records per shard (path -> count), from the card, or counted in the tars for older local cards."""
        return dict(zip(self.shards(split), self.record_counts(split)))

    def record_counts(self, split: str) -> list[int]:
        """Records per shard in shard order, from the card; an older card without them is counted in its
        folder's tars, which a card on a server (or whose shards a command reads) cannot be: counting would
        read every shard before the first step."""
        sizes = self.splits[split].get("shard_sizes")
        if sizes is None or len(sizes) != len(self.shard_names(split)):
            if self.remote or not all((Path(self.root) / n).is_file() for n in self.shard_names(split)):
                raise DataError(f"{self.where(self.root)} gives no shard_sizes for split '{split}' (an older "
                                f"data_prep made it): re-make the card with `python -m data_prep ...`, or train "
                                f"from a copy of the folder with its shards on disk")
            sizes = [count_records(u) for u in self.shards(split)]
            self.splits[split]["shard_sizes"] = sizes  # once per process
        return [int(n) for n in sizes]

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
