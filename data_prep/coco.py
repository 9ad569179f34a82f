"""MS-COCO with the Karpathy splits and multi-hot labels from the instance annotations.

Captions come from the Karpathy file (every caption of an image; the 5K test
split has 25,010); labels from `instances_*2014.json` (category ids mapped to
0..79 in ascending id order, the official order). `restval` joins `train`
unless asked to stay apart. An image with no instance annotation keeps an
empty label list (counted per split as `num_without_labels` in the card).
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from .entries import SPLITS, Entry, InputError, SkipLog, clean_captions, image_under, log, validated
from .karpathy import raw_captions, read_karpathy, usable_entry


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"instances file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read instances file {path}: {e}") from None


def load_instances(paths, skips: SkipLog) -> tuple[list[str], dict[int, set[int]]]:
    """Category names (by ascending id) and image id -> category indices, over all files."""
    categories, labels = None, defaultdict(set)
    for path in paths:
        data = _read_json(path)
        if not all(k in data for k in ("categories", "annotations")):
            raise InputError(f"{path} is not a COCO instances file (needs 'categories' and 'annotations')")
        cats = sorted((c["id"], c["name"]) for c in data["categories"])
        if categories is not None and cats != categories:
            raise InputError(f"{path} lists other categories than {paths[0]}")
        categories = cats
        index = {cat_id: i for i, (cat_id, _) in enumerate(cats)}
        for ann in data["annotations"]:
            if ann.get("category_id") in index and "image_id" in ann:
                labels[ann["image_id"]].add(index[ann["category_id"]])
            else:
                skips.skip("bad_annotation", f"{path}: annotation {ann.get('id')} has an unknown "
                           f"category_id {ann.get('category_id')!r} or no image_id")
    return [name for _, name in categories or []], labels


def coco_id(image: dict) -> int | None:
    """The image's COCO id: `cocoid`, else the number in its file name."""
    if isinstance(image.get("cocoid"), int):
        return image["cocoid"]
    digits = re.findall(r"\d+", image["filename"])
    return int(digits[-1]) if digits else None


def coco_entries(karpathy, images_root, instances=(), keep_restval: bool = False,
                 skips: SkipLog | None = None) -> tuple[list[str], list[Entry]]:
    skips = skips or SkipLog()
    categories, labels = load_instances(instances, skips) if instances else ([], {})
    entries = []
    for position, image in enumerate(read_karpathy(karpathy)):
        if not usable_entry(image, position, skips):
            continue
        cid = coco_id(image)
        if cid is None:
            skips.skip("bad_karpathy_entry", f"{image['filename']}: no cocoid")
            continue
        key = f"coco_{cid:012d}"
        split = image.get("split", "train")
        if split == "restval" and not keep_restval:
            split = "train"
        relative = Path(str(image.get("filepath") or "")) / image["filename"]
        path = image_under(images_root, relative, skips, f"{karpathy}: images[{position}]")
        captions = clean_captions(raw_captions(image), key, skips)
        entries.append(Entry(key, split, path, captions, sorted(labels.get(cid, ())) if instances else None))
    if instances:
        unlabelled = sum(1 for e in entries if not e.labels)
        log.info("%d of %d images have no instance annotation (empty label list)", unlabelled, len(entries))
    return categories, validated(entries, skips, SPLITS + ("restval",))

