"""Image-text shards made by others, read where they are: `python -m data_prep wds --train GLOB [--val
GLOB] [--test GLOB] --out DIR`. A GLOB may use webdataset's braces (`train-{00000..00099}.tar`).

The common layout (img2dataset's, open_clip's): one record per key, `{key}.jpg` (or png / webp) and a
caption in `{key}.txt` or in `{key}.json`'s `caption` field. The shards are scanned once, headers only
but for the small caption members (the images are skipped over), and the card written under --out
points at them where they are: nothing is written into the shard folders, nothing re-packed. The card
says `"layout": "wds"`; per split `shards` (absolute paths), `shard_sizes` (records per shard, as the
reader groups them) and `first_index` (the index of each shard's first record): a record's index in its
split is its shard's first index plus its position in the shard, assigned by this scan (the shards
have none). There are no labels (category-level metrics need them; instance-level ones do not). The
WordPiece tokenizer is built from the training captions, as for our own shards.

A record without an image, without a caption, or whose image is of another type than the split's most
common one is counted (and skipped again by the reader); a damaged tar counts what it holds up to the
damage.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import re
import tarfile
from collections import Counter
from pathlib import Path

from .card import CARD_NAME, make_card, write_card
from .entries import InputError
from .schema import IMAGE_KEYS
from .tokenizer import DEFAULT_VOCAB_SIZE, count_words, train_wordpiece

log = logging.getLogger("data_prep")

LAYOUT = "wds"
IMAGE_EXTENSIONS = (*IMAGE_KEYS, "jpeg")
CAPTION_MEMBERS = ("txt", "json")


def split_key(name: str) -> tuple[str, str]:
    """webdataset's grouping: the key is the member name up to the first dot after the last slash."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name[:dot], name[dot + 1:].lower()) if dot >= 0 else (name, "")


def caption_of(members: dict[str, bytes]) -> str | None:
    """The record's caption: its `txt`, else its json's `caption` (None when neither holds text)."""
    text = members.get("txt")
    if text is not None:
        caption = text.decode("utf-8", errors="replace").strip()
        return caption or None
    if "json" in members:
        try:
            caption = json.loads(members["json"]).get("caption")
        except (ValueError, AttributeError):
            return None
        return (caption.strip() or None) if isinstance(caption, str) else None
    return None


def scan_shard(path: str) -> tuple[list[tuple[str | None, str | None]], str | None]:
    """[(image extension, caption) per record, in order], and the damage met (None for a whole tar)."""
    records: list[tuple[str | None, str | None]] = []
    key, image, members = None, None, {}

    def close():
        if key is not None:
            records.append((image, caption_of(members)))

    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                this, ext = split_key(member.name)
                if this != key:
                    close()
                    key, image, members = this, None, {}
                if ext in IMAGE_EXTENSIONS and image is None:
                    image = "jpg" if ext == "jpeg" else ext
                elif ext in CAPTION_MEMBERS:
                    members[ext] = tar.extractfile(member).read()
            close()
    except (tarfile.TarError, OSError) as e:
        close()
        return records, f"{e.__class__.__name__}: {e}"
    return records, None


BRACE = re.compile(r"\{([^{}]*)\}")
RANGE = re.compile(r"(\d+)\.\.(\d+)")


def braces(pattern: str) -> list[str]:
    """webdataset's shard notation, which glob does not know: `{00000..00009}` (a range, zero-padded as
    written), `{a,b}` (alternatives); a brace holding a glob (`train-{*}.tar`) is that glob."""
    match = BRACE.search(pattern)
    if not match:
        return [pattern]
    body, rest = match.group(1), braces(pattern[match.end():])
    numbers = RANGE.fullmatch(body)
    if numbers:
        a, b = numbers.groups()
        width = max(len(a), len(b)) if (a[0] == "0" and len(a) > 1) or (b[0] == "0" and len(b) > 1) else 0
        step = 1 if int(b) >= int(a) else -1
        choices = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    else:
        choices = body.split(",")
    return [pattern[:match.start()] + c + r for c in choices for r in rest]


def expand(pattern: str, option: str) -> list[str]:
    found = {p for each in braces(str(Path(pattern).expanduser())) for p in glob.glob(each, recursive=True)}
    paths = sorted({str(Path(p).resolve()) for p in found if Path(p).is_file()})
    if not paths:
        raise InputError(f"{option} {pattern}: no file matches")
    return paths


def scan_split(paths: list[str], split: str, words: Counter | None) -> tuple[dict, str, Counter]:
    """The card's entry of one split, its image key, and its skip counts; adds the training captions'
    words to `words`."""
    shard_records = [scan_shard(p) for p in paths]
    kinds = Counter(image for records, _ in shard_records for image, _ in records if image)
    if not kinds:
        raise InputError(f"--{split}: no record with an image (jpg, png or webp) in {len(paths)} shard(s)")
    image_key = kinds.most_common(1)[0][0]
    skipped, sizes, first, captions, start = Counter(), [], [], 0, 0
    for path, (records, damage) in zip(paths, shard_records):
        if damage:
            skipped["damaged_shard"] += 1
            log.warning("%s: %s (counted the %d records before it)", path, damage, len(records))
        texts = []
        for image, caption in records:
            if image is None:
                skipped["no_image"] += 1
            elif image != image_key:
                skipped["other_image_type"] += 1
            elif caption is None:
                skipped["no_caption"] += 1
            else:
                texts.append(caption)
        if words is not None:
            words.update(count_words(texts))
        captions += len(texts)
        sizes.append(len(records))
        first.append(start)
        start += len(records)
    entry = {"shards": paths, "shard_sizes": sizes, "first_index": first, "num_images": start,
             "num_captions": captions, "num_without_labels": start}
    return entry, image_key, skipped


def build_wds_card(globs: dict[str, str], out: Path, name: str | None = None,
                   vocab_size: int = DEFAULT_VOCAB_SIZE) -> dict:
    """Scans the shards each split's glob matches and writes `out/dataset.json` and `out/tokenizer.json`."""
    if "train" not in globs:
        raise InputError("--train is required (the tokenizer is built from its captions)")
    out = Path(out)
    if (out / CARD_NAME).exists():
        raise InputError(f"--out {out} holds a dataset already: give a new folder")
    paths = {split: expand(pattern, f"--{split}") for split, pattern in globs.items()}
    shard_dirs = {Path(p).parent for ps in paths.values() for p in ps}
    inside = [d for d in shard_dirs if out.resolve().is_relative_to(d)]  # the folder itself, or one below it
    if inside:
        raise InputError(f"--out {out} is in a shard folder ({inside[0]}): nothing is written there, the card "
                         f"goes into a folder of its own")
    words: Counter = Counter()
    splits, keys, skipped = {}, {}, Counter()
    for split, shard_paths in paths.items():
        splits[split], keys[split], skips = scan_split(shard_paths, split, words if split == "train" else None)
        skipped.update(skips)
    image_key = keys["train"]
    for split, key in keys.items():
        if key != image_key:
            raise InputError(f"--{split} holds {key} images and --train {image_key} images: one type per dataset")
    out.mkdir(parents=True, exist_ok=True)
    train_wordpiece([], out / "tokenizer.json", vocab_size, counts=words)
    fingerprint = hashlib.sha256(json.dumps({s: [(p, Path(p).stat().st_size) for p in ps] for s, ps in
                                             paths.items()}, sort_keys=True).encode()).hexdigest()[:16]
    made_with = {"command": "wds", "globs": globs, "fingerprint": fingerprint}
    card = make_card(name or out.resolve().name, [], image_key, splits, made_with, dict(skipped), layout=LAYOUT)
    write_card(out, card)
    return card
