"""Entries -> shards + tokenizer + card: checked, planned, written in parallel, resumable.

1. Check: every image is decoded once (in parallel); bad ones are skipped by
   reason. The rest get their dense `index` within the split (0..n-1), which
   the pipeline uses for per-item state and evaluation ids.
2. Plan: each split is cut into shards whose size aims at `shard_mb`
   (estimated from its first images). The plan, and so every shard's bytes,
   depends only on the inputs and options, never on the number of workers.
3. Write: shards are independent tasks for a process pool. A shard is written
   under a temporary name and renamed when complete, then marked done
   (data_prep/build.py: a re-run with the same inputs skips done shards; a
   half-built folder from other inputs is refused rather than mixed in).
4. Finish: the tokenizer is built from the training captions; per-split counts
   and skip reasons go into `dataset.json`, written last and atomically.
Resuming assumes the raw files did not change in between.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from . import card as cardlib
from .build import ResumableBuild
from .entries import Entry, InputError, SkipLog, log, split_sort_key
from .images import IMAGE_KEY, BadImage, ImageOptions, check_image, encode_image
from .progress import progress_bar
from .shards import shard_name, write_shard
from .tokenizer import DEFAULT_VOCAB_SIZE, train_wordpiece
from .workers import Workers

CHECK_CHUNK = 64        # images per check job
TAR_OVERHEAD = 3 * 512  # member headers and padding per record (approximate)


@dataclass
class BuildOptions:
    image: ImageOptions = ImageOptions()
    workers: int = 1
    shard_mb: float = 128.0          # size target per shard
    min_shards: int = 8              # per split (capped by its image count): enough for ranks x workers
    shard_size: int | None = None    # records per shard; overrides the size target
    vocab_size: int = DEFAULT_VOCAB_SIZE
    progress: bool = True

    def shaping(self) -> dict:
        """The options that change the output (not workers or the progress bar)."""
        return {"image_options": asdict(self.image), "shard_mb": self.shard_mb,
                "min_shards": self.min_shards, "shard_size": self.shard_size, "vocab_size": self.vocab_size}


@dataclass
class ShardTask:
    split: str
    index: int
    entries: list[Entry]

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)


class NothingWritten(Exception):
    """Every input was skipped."""


def fingerprint(entries: list[Entry], opts: BuildOptions) -> str:
    """Changes whenever the inputs or the output-shaping options change."""
    h = hashlib.sha256(json.dumps(opts.shaping(), sort_keys=True).encode())
    for e in entries:
        h.update(json.dumps([e.key, e.split, os.path.abspath(e.image), e.captions, e.labels]).encode())
    return h.hexdigest()[:16]


# ---- 1. check --------------------------------------------------------------------

def _check_chunk(paths: list[tuple[str, str]]) -> list[list[str]]:
    bad = []
    for key, path in paths:
        try:
            check_image(path)
        except BadImage as e:
            bad.append([key, e.reason, str(e)])
    return bad


def find_bad_images(entries: list[Entry], build: ResumableBuild, workers: Workers, opts: BuildOptions) -> dict:
    """key -> [reason, detail] for every image that cannot be used; cached for resuming."""
    if build.is_done("check"):
        return build.stats("check")
    jobs = [[(e.key, str(e.image)) for e in entries[i:i + CHECK_CHUNK]]
            for i in range(0, len(entries), CHECK_CHUNK)]
    bad = {}
    with progress_bar(len(entries), "check", opts.progress, "img") as bar:
        for job, found in zip(jobs, workers.map(_check_chunk, jobs)):
            bad.update({key: [reason, detail] for key, reason, detail in found})
            bar.update(len(job))
    build.mark_done("check", bad)
    return bad


def usable(entries: list[Entry], bad: dict, skips: SkipLog) -> list[Entry]:
    """Entries with good images, each with its dense index in its split."""
    next_index: Counter = Counter()
    out = []
    for entry in entries:
        if entry.key in bad:
            reason, detail = bad[entry.key]
            skips.skip(reason, detail)
            continue
        out.append(dataclasses.replace(entry, index=next_index[entry.split]))
        next_index[entry.split] += 1
    return out


# ---- 2. plan -----------------------------------------------------------------------

def estimate_record_bytes(entries: list[Entry], image: ImageOptions, sample: int = 16) -> float:
    head = entries[:sample]
    mean_image = sum(len(encode_image(e.image, image)) for e in head) / max(1, len(head))
    mean_text = sum(len(json.dumps(e.captions)) for e in head) / max(1, len(head))
    return mean_image + mean_text + TAR_OVERHEAD


def plan_split(split: str, entries: list[Entry], opts: BuildOptions) -> list[ShardTask]:
    n = len(entries)
    if opts.shard_size:
        per = opts.shard_size
    else:
        by_size = math.ceil(n * estimate_record_bytes(entries, opts.image) / (opts.shard_mb * 1e6))
        per = math.ceil(n / max(by_size, min(opts.min_shards, n), 1))
    return [ShardTask(split, i, entries[start:start + per]) for i, start in enumerate(range(0, n, per))]


def plan(entries: list[Entry], opts: BuildOptions) -> list[ShardTask]:
    by_split: dict[str, list[Entry]] = {}
    for entry in entries:
        by_split.setdefault(entry.split, []).append(entry)
    tasks = []
    for split in sorted(by_split, key=split_sort_key):
        tasks += plan_split(split, by_split[split], opts)
    return tasks


# ---- 3. write ----------------------------------------------------------------------

def _record(entry: Entry, image_bytes: bytes) -> dict:
    meta = {"id": entry.key, "index": entry.index, "captions": entry.captions,
            "labels": entry.labels or [], "split": entry.split}
    return {"__key__": entry.key, IMAGE_KEY: image_bytes, "json": meta}


def write_task(task: ShardTask, image: ImageOptions, out_dir: Path) -> dict:
    """Write one shard; returns its stats (the caller marks the piece done)."""
    def records():
        for entry in task.entries:
            try:
                data = encode_image(entry.image, image)
            except BadImage as e:  # it passed the check: the file changed under us
                raise InputError(f"{e} changed while the dataset was being built; "
                                 f"delete {out_dir} and run again") from None
            yield _record(entry, data)

    write_shard(records(), out_dir / task.name)
    return {"name": task.name, "records": len(task.entries),
            "captions": sum(len(e.captions) for e in task.entries),
            "without_labels": sum(1 for e in task.entries if not e.labels)}


def _write_task_star(args) -> dict:
    return write_task(*args)


def write_shards(tasks: list[ShardTask], build: ResumableBuild, workers: Workers, opts: BuildOptions) -> None:
    todo = [t for t in tasks if not build.is_done(t.name)]
    if len(todo) < len(tasks):
        log.info("%d of %d shards already written", len(tasks) - len(todo), len(tasks))
    total, left = (sum(len(t.entries) for t in ts) for ts in (tasks, todo))
    with progress_bar(total, "write", opts.progress, "img", initial=total - left) as bar:
        for stats in workers.map(_write_task_star, [(t, opts.image, build.out) for t in todo], ordered=False):
            build.mark_done(stats["name"], stats)
            bar.update(stats["records"])


# ---- 4. finish ---------------------------------------------------------------------

def split_summary(tasks: list[ShardTask], build: ResumableBuild) -> dict:
    splits: dict[str, dict] = {}
    for task in tasks:
        stats = build.stats(task.name)
        entry = splits.setdefault(task.split, cardlib.split_entry([], 0, 0))
        entry.setdefault("num_without_labels", 0)
        entry["shards"].append(task.name)
        entry["shard_sizes"].append(stats["records"])
        entry["num_images"] += stats["records"]
        entry["num_captions"] += stats["captions"]
        entry["num_without_labels"] += stats["without_labels"]
    return splits


def build_dataset(out_dir, name: str, categories: list[str], entries: list[Entry],
                  made_with: dict, opts: BuildOptions, skips: SkipLog) -> dict:
    """Write (or finish, or confirm) the dataset in `out_dir`; returns its card."""
    fp = fingerprint(entries, opts)
    build = ResumableBuild(out_dir, fp)
    made_with = {**made_with, **opts.shaping(), "fingerprint": fp}
    if (card := build.finished()) is not None:
        return card
    build.start()
    with Workers(opts.workers) as workers:
        good = usable(entries, find_bad_images(entries, build, workers, opts), skips)
        if not good:
            build.abandon()
            raise NothingWritten(f"no usable image for {out_dir}; skipped: {dict(skips.counts)}")
        tasks = plan(good, opts)
        write_shards(tasks, build, workers, opts)
    splits = split_summary(tasks, build)
    train_captions = [c for e in good if e.split == "train" for c in e.captions]
    vocab = None
    if train_captions:
        vocab = train_wordpiece(train_captions, build.out / "tokenizer.json", opts.vocab_size)
    else:
        log.warning("no train split: no tokenizer.json (configure a pretrained tokenizer instead)")
    return build.finish(cardlib.make_card(name, categories, IMAGE_KEY, splits, made_with, dict(skips.counts),
                                          tokenizer="tokenizer.json" if vocab else None, tokenizer_vocab_size=vocab))
