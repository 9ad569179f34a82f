"""Any other dataset, described by a JSON-lines manifest (one line per image).

    {"path": "img/0001.jpg", "captions": ["...", ...], "labels": [3, 7], "split": "train", "id": "0001"}

Only `path` and `captions` are required; captions may number anything from
one up. `path` is relative to the images folder: an absolute path, or one that
leads outside it (`..`, a link), is skipped and counted as `outside_images`, one with a NUL byte as `bad_path`;
`split` is train, val or test (anything else is skipped as `bad_split`). Labels are category indices, or names from `--categories`, or with
`label_format="multihot"` 0/1 rows as wide as the category list. Images
without a `split` are shuffled with `seed` and cut by `fractions`
(train, val, test), so the assignment does not depend on the line order.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from .entries import SPLITS, Entry, InputError, SkipLog, clean_captions, image_under, safe_key, validated
from .flickr30k import read_category_names


def _read_lines(path: Path, skips: SkipLog) -> list[tuple[int, dict]]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InputError(f"cannot read manifest {path}: {e}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            skips.skip("bad_manifest_line", f"{path}:{number}: needs a JSON object with a 'path'")
            continue
        rows.append((number, row))
    if not rows:
        raise InputError(f"{path} holds no usable manifest line")
    return rows


class _Labels:
    """Turns a manifest `labels` value into category indices, or a skip reason."""

    def __init__(self, categories: list[str], label_format: str):
        self.categories, self.format = categories, label_format
        self.index = {name: i for i, name in enumerate(categories)}

    def parse(self, value) -> tuple[list[int] | None, str | None]:
        if value is None:
            return None, None
        if not isinstance(value, list):
            return None, "bad_labels"
        if self.format == "multihot":
            if len(value) != len(self.categories):
                return None, "label_width"
            return [i for i, v in enumerate(value) if v], None
        out = []
        for v in value:
            i = self.index.get(v) if isinstance(v, str) else v
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(self.categories):
                return None, "label_out_of_range"
            out.append(i)
        return sorted(set(out)), None


def _infer_categories(rows, label_format: str) -> list[str]:
    """class_0.. names when no --categories file is given."""
    width = 0
    for _, row in rows:
        labels = row.get("labels")
        if isinstance(labels, list) and labels:
            if label_format == "multihot":
                return [f"class_{i}" for i in range(len(labels))]  # the first row sets the width
            width = max([width] + [v + 1 for v in labels if isinstance(v, int) and v >= 0])
    return [f"class_{i}" for i in range(width)]


def assign_splits(entries: list[Entry], fractions, seed: int) -> None:
    """Seeded split of the entries that came without one, by exact fractions."""
    loose = sorted((e for e in entries if not e.split), key=lambda e: e.key)
    random.Random(seed).shuffle(loose)
    total = sum(fractions)
    n_train = round(len(loose) * fractions[0] / total)
    n_val = round(len(loose) * fractions[1] / total)
    for i, entry in enumerate(loose):
        entry.split = "train" if i < n_train else "val" if i < n_train + n_val else "test"


def manifest_entries(jsonl, images_dir, categories_file=None, fractions=(0.8, 0.1, 0.1), seed: int = 0,
                     label_format: str = "indices", name: str = "manifest",
                     skips: SkipLog | None = None) -> tuple[list[str], list[Entry]]:
    skips = skips or SkipLog()
    rows = _read_lines(Path(jsonl), skips)
    categories = read_category_names(categories_file) if categories_file else _infer_categories(rows, label_format)
    labeller = _Labels(categories, label_format)
    entries = []
    for number, row in rows:
        given = row.get("id")
        key = safe_key(str(given)) if given is not None else safe_key(f"{name}_{Path(row['path']).with_suffix('')}")
        if not key:
            skips.skip("bad_id", f"{jsonl}:{number}: id {row.get('id')!r} has no usable character")
            continue
        labels, problem = labeller.parse(row.get("labels"))
        if problem:
            skips.skip(problem, f"{jsonl}:{number} ({key}): labels {row.get('labels')!r}")
            continue
        captions = row.get("captions")
        captions = [captions] if isinstance(captions, str) else captions
        image = image_under(images_dir, row["path"], skips, f"{jsonl}:{number} ({key})")
        entries.append(Entry(key, row.get("split") or "", image, clean_captions(captions, key, skips), labels))
    entries = validated(entries, skips, SPLITS + ("",))  # "": no split given, assigned below
    assign_splits(entries, fractions, seed)
    return categories, entries
