"""Flickr30K with the Karpathy splits; category labels optional, from a label file.

Flickr30K has no categories of its own; the FiCo-ITR files hold multi-hot
rows in the 80-class COCO taxonomy, made by a classifier. Rows follow the
Karpathy file's image order, either over all images (`labels_split="all"`)
or over one split only (e.g. the test-only `flickr30k-karpathy-test-lall.mat`);
images of other splits then get no labels.
"""
from __future__ import annotations

from pathlib import Path

from .coco_names import COCO_80
from .entries import SPLITS, Entry, InputError, SkipLog, clean_captions, image_under, safe_key, validated
from .karpathy import raw_captions, read_karpathy, usable_entry
from .labels_file import load_labels, row_to_indices


def read_category_names(path) -> list[str]:
    try:
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except OSError as e:
        raise InputError(f"cannot read category names {path}: {e}") from None
    return [n for n in names if n]


def default_names(n_classes: int) -> list[str]:
    return list(COCO_80) if n_classes == 80 else [f"class_{i}" for i in range(n_classes)]


def _label_rows(images, labels, labels_split, labels_var, categories):
    """Per Karpathy image: a label index list, or None when the file does not cover it."""
    splits = {im.get("split") for im in images if isinstance(im, dict)}
    if labels_split != "all" and labels_split not in splits:
        raise InputError(f"--labels-split {labels_split!r}: the Karpathy file has splits {sorted(splits)}")
    covered = [i for i, im in enumerate(images)
               if labels_split == "all" or (isinstance(im, dict) and im.get("split") == labels_split)]
    matrix = load_labels(labels, len(covered), labels_var)
    if categories and matrix.shape[1] != len(categories):
        raise InputError(f"labels in {labels} have {matrix.shape[1]} columns but {len(categories)} "
                         f"category names were given")
    rows: list = [None] * len(images)
    for row, i in zip(matrix, covered):
        rows[i] = row_to_indices(row)
    return rows, matrix.shape[1]


def flickr30k_entries(karpathy, images_dir, labels=None, labels_split: str = "all",
                      labels_var: str = "LAll", categories_file=None,
                      skips: SkipLog | None = None) -> tuple[list[str], list[Entry]]:
    skips = skips or SkipLog()
    images = read_karpathy(karpathy)
    categories = read_category_names(categories_file) if categories_file else []
    rows = [None] * len(images)
    if labels:
        rows, n_classes = _label_rows(images, labels, labels_split, labels_var, categories)
        categories = categories or default_names(n_classes)
    entries = []
    for position, (image, row) in enumerate(zip(images, rows)):
        if not usable_entry(image, position, skips):
            continue
        key = "flickr30k_" + safe_key(Path(image["filename"]).stem)
        captions = clean_captions(raw_captions(image), key, skips)
        path = image_under(images_dir, image["filename"], skips, f"{karpathy}: images[{position}]")
        entries.append(Entry(key, image.get("split", "train"), path, captions, row))
    return categories, validated(entries, skips, SPLITS)
