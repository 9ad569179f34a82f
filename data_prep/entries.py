"""What every raw-dataset reader produces: one `Entry` per image, plus a log of what was skipped.

Readers (coco, flickr30k, manifest) turn their input formats into entries and
drop bad inputs here, each with a reason; the shard writer never sees them.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("data_prep")

SPLIT_ORDER = ["train", "restval", "val", "test"]
SPLITS = ("train", "val", "test")  # what a dataset may hold (COCO's restval too, when kept apart)


@dataclass
class Entry:
    key: str                 # unique in the dataset; becomes __key__ and json["id"]
    split: str
    image: Path | None       # None: refused by image_under (outside the images folder)
    captions: list[str]
    labels: list[int] | None = None  # category indices; None = unknown (written as [])
    index: int = -1          # dense position in its split, set once bad images are known


class InputError(Exception):
    """The inputs cannot be read at all (missing file, bad JSON, label matrix of the wrong shape)."""


@dataclass
class SkipLog:
    """Counts skipped inputs by reason and logs the first few of each reason."""

    show_per_reason: int = 5
    counts: Counter = field(default_factory=Counter)

    def skip(self, reason: str, what: str) -> None:
        self.counts[reason] += 1
        n = self.counts[reason]
        if n <= self.show_per_reason:
            log.warning("skipped (%s): %s", reason, what)
        elif n == self.show_per_reason + 1:
            log.warning("more inputs skipped for %s; the total is in the summary", reason)


def safe_key(text: str) -> str:
    """A webdataset-safe key: no '.' or '/' (they would split the member names)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")


def clean_captions(captions, key: str, skips: SkipLog) -> list[str]:
    """Stripped, non-empty captions; each dropped one is counted."""
    out = []
    for caption in captions or []:
        text = caption.strip() if isinstance(caption, str) else ""
        if text:
            out.append(" ".join(text.split()))
        else:
            skips.skip("empty_caption", f"{key}: {caption!r}")
    return out


def image_under(root, relative, skips: SkipLog, what: str) -> Path | None:
    """`root/relative` with links followed, when that is a path inside `root`; else None, counted as
    `outside_images`. An index file (manifest, Karpathy JSON) comes from someone else: a name like
    `../../x.jpg`, an absolute path or a link out of the folder must not pack another file of this
    machine into the shards."""
    base = Path(root).resolve()
    text = str(relative or "")
    if "\0" in text:  # no file name holds a NUL (the OS refuses it): a broken line, not an escape
        skips.skip("bad_path", f"{what}: {text!r} holds a NUL byte")
        return None
    if text and not Path(text).is_absolute():
        path = (base / text).resolve()
        if path.is_relative_to(base) and path != base:
            return path
    skips.skip("outside_images", f"{what}: {text!r} is not a path inside {root}")
    return None


def validated(entries, skips: SkipLog, splits=SPLITS) -> list[Entry]:
    """Drop entries without an image inside the images folder, with a split not in `splits` (a split
    names shard files: '../x' would write outside the output folder), without captions, and repeated
    keys (the first one wins)."""
    seen: set[str] = set()
    kept = []
    for entry in entries:
        if entry.image is None:
            continue  # counted by image_under
        if entry.split not in splits:
            skips.skip("bad_split", f"{entry.key}: split {entry.split!r} (allowed: {', '.join(splits)})")
        elif not entry.captions:
            skips.skip("no_captions", f"{entry.key} ({entry.image})")
        elif entry.key in seen:
            skips.skip("duplicate_id", f"{entry.key} ({entry.image})")
        else:
            seen.add(entry.key)
            kept.append(entry)
    return kept


def split_sort_key(split: str) -> tuple:
    return (SPLIT_ORDER.index(split), "") if split in SPLIT_ORDER else (len(SPLIT_ORDER), split)
