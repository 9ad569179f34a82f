"""The embedded default dataset: procedurally drawn shapes with captions.

Each 64 px image holds 1-3 objects on a 3x3 grid (at most one per cell); each
object is one of 8 shapes x 8 colours x 2 sizes x 9 cells, so almost every
image is unique (instance-level retrieval needs colour, size and position),
while the multi-hot labels are the shapes present (category-level retrieval).
With shapes drawn independently, two random images share a shape about 38%
of the time, so chance mAP is far below a trained model's.

Every image is generated from its own RNG seeded by (seed, split, index):
the same seed gives byte-identical shards regardless of how the work is split.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

from . import card as cardlib
from .fsutil import remove_tree, tmp_sibling
from .shapes_draw import COLOURS, GRID, SHAPES, SIZES, png_bytes, render
from .shapes_text import captions_for
from .shards import shard_name, write_shard
from .tokenizer import train_wordpiece
from .workers import Workers

GENERATOR_VERSION = 2  # bump when records change for the same seed (2: json "index")
CAPTIONS_PER_IMAGE = 5
MAX_OBJECTS = 3
PARALLEL_FROM = 4000  # images; below this a build runs in one process


CELLS = [(r, c) for r in range(GRID) for c in range(GRID)]


def sample_object(rng: random.Random, cell: tuple[int, int]) -> dict:
    size = rng.choice(list(SIZES))
    wiggle = max(0.0, 0.47 - SIZES[size])  # keeps the object inside its cell
    return {
        "shape": rng.choice(SHAPES),
        "colour": rng.choice(list(COLOURS)),
        "size": size,
        "cell": cell,
        "offset": (rng.uniform(-wiggle, wiggle), rng.uniform(-wiggle, wiggle)),
        "tint": tuple(rng.randint(-12, 12) for _ in range(3)),
    }


def _background(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(225, 250) for _ in range(3))


def sample_scene(rng: random.Random) -> dict:
    cells = rng.sample(CELLS, rng.randint(1, MAX_OBJECTS))
    objects = [sample_object(rng, cell) for cell in cells]
    return {"background": _background(rng), "objects": objects}


def single_object_scene(rng: random.Random) -> dict:
    obj = sample_object(rng, rng.choice(CELLS))
    return {"background": _background(rng), "objects": [obj]}


def single_object_images(count: int, image_size: int, namespace: str) -> tuple[list, list[int]]:
    """`count` images of one object anywhere and the index of its shape in SHAPES: what the shapes image
    backbone is pretrained on (pipeline/training/backbone.py). `namespace` seeds them; give one that no
    retrieval split uses, so that the images are disjoint from the dataset's."""
    rng = random.Random(namespace)
    scenes = [single_object_scene(rng) for _ in range(count)]
    return [render(s, image_size) for s in scenes], [SHAPES.index(s["objects"][0]["shape"]) for s in scenes]


def shape_labels(objects: list[dict]) -> list[int]:
    return sorted({SHAPES.index(o["shape"]) for o in objects})


def make_record(seed: int, split: str, index: int, image_size: int) -> dict:
    rng = random.Random(f"shapes/{seed}/{split}/{index}")  # str seeds hash with sha512: stable
    scene = sample_scene(rng)
    key = f"shapes_{split}_{index:06d}"
    meta = {
        "id": key,
        "captions": captions_for(scene["objects"], rng, CAPTIONS_PER_IMAGE),
        "labels": shape_labels(scene["objects"]),
        "split": split,
        "index": index,  # position in the split: per-item state (UCCH's memory bank) and eval ids
    }
    return {"__key__": key, "png": png_bytes(render(scene, image_size)), "json": meta}


def _made_with(seed, sizes, image_size, shard_size) -> dict:
    return {"command": "shapes", "seed": seed, "image_size": image_size, **sizes,
            "shard_size": shard_size, "objects_per_image": [1, MAX_OBJECTS],
            "captions_per_image": CAPTIONS_PER_IMAGE, "generator_version": GENERATOR_VERSION}


def _check_existing(out_dir: Path, made_with: dict) -> None:
    old = cardlib.read_card(out_dir).get("made_with", {})
    diff = {k: (old.get(k), v) for k, v in made_with.items() if old.get(k) != v}
    if diff:
        raise ValueError(f"{out_dir} already holds a shapes dataset made differently "
                         f"(field: (existing, requested)) {diff}; delete it or pick another out_dir")


def _publish(tmp: Path, out_dir: Path) -> None:
    """Give the finished build its final name; if another process won the race, keep theirs."""
    try:
        tmp.rename(out_dir)  # atomic; fails if out_dir exists and is not empty
    except OSError:
        if not (out_dir / cardlib.CARD_NAME).exists():
            raise FileExistsError(f"{out_dir} exists but holds no {cardlib.CARD_NAME}; "
                                  "remove it or pick another out_dir") from None


def write_shapes_shard(job: tuple) -> list[str]:
    """Write one shard of shapes records; returns their captions (for the card and tokenizer)."""
    folder, seed, split, shard_index, start, stop, image_size = job
    records = [make_record(seed, split, i, image_size) for i in range(start, stop)]
    write_shard(records, folder / shard_name(split, shard_index))
    return [c for r in records for c in r["json"]["captions"]]


def _jobs(folder: Path, seed: int, sizes: dict, image_size: int, shard_size: int) -> list[tuple]:
    return [(folder, seed, split, k, start, min(start + shard_size, count), image_size)
            for split, count in sizes.items()
            for k, start in enumerate(range(0, count, shard_size))]


def default_workers(total_images: int) -> int:
    """What the CLI uses: spawning a worker costs ~0.5 s, worth it only for big builds."""
    return min(os.cpu_count() or 1, 4) if total_images >= PARALLEL_FROM else 1


def build_shapes(out_dir, seed: int = 0, train: int = 10000, val: int = 1000, test: int = 1000,
                 image_size: int = 64, shard_size: int = 1000, workers: int = 1) -> Path:
    """Build the shapes dataset in `out_dir` (shards, tokenizer.json, dataset.json); returns the path.

    Idempotent: returns at once when `out_dir/dataset.json` exists (and raises if
    it was made with other parameters). Safe when several processes call it at
    once: each builds in a temporary sibling folder and renames it into place.
    `workers` > 1 writes shards in spawned processes (speed only, same bytes). It
    stays 1 by default because a spawned worker re-imports the caller's main
    module: from train.py that is torch and lightning, seconds per worker.
    """
    out_dir = Path(out_dir)
    sizes = {"train": train, "val": val, "test": test}
    made_with = _made_with(seed, sizes, image_size, shard_size)
    if (out_dir / cardlib.CARD_NAME).exists():
        _check_existing(out_dir, made_with)
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(out_dir)
    tmp.mkdir()
    try:
        splits = {split: cardlib.split_entry([], count, 0) for split, count in sizes.items()}
        train_captions = []
        jobs = _jobs(tmp, seed, sizes, image_size, shard_size)
        with Workers(workers) as pool:
            for job, captions in zip(jobs, pool.map(write_shapes_shard, jobs)):
                split = job[2]
                splits[split]["shards"].append(shard_name(split, job[3]))
                splits[split]["shard_sizes"].append(job[5] - job[4])
                splits[split]["num_captions"] += len(captions)
                if split == "train":
                    train_captions += captions
        vocab_size = train_wordpiece(train_captions, tmp / "tokenizer.json")
        card = cardlib.make_card("shapes", SHAPES, "png", splits, made_with, skipped={},
                                 tokenizer_vocab_size=vocab_size)
        cardlib.write_card(tmp, card)
        _publish(tmp, out_dir)
    finally:
        remove_tree(tmp)  # no-op after a successful rename
    return out_dir

