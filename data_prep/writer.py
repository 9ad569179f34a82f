"""Entries -> shards + tokenizer + card: checked, planned, written in parallel, resumable.

1. Check: every image is decoded once (in parallel); bad ones are skipped by
   reason. The rest get their dense `index` within the split (0..n-1), which
   the pipeline uses for per-item state and evaluation ids.
2. Plan: each split is cut into shards whose size aims at `shard_mb`
   (estimated from its first images). The plan, and so every shard's bytes,
   depends only on the inputs and options, never on the number of workers.
3. Write: shards are independent tasks for a process pool. A shard is written
   under a temporary name and renamed when complete; then a stats file in
   `_progress/` marks it done. A re-run with the same inputs skips done shards;
   a half-built folder from other inputs is refused rather than mixed in.
4. Finish: the tokenizer is built from the training captions; per-split counts
   and skip reasons go into `dataset.json`, written last and atomically (a
   folder with a card is a complete dataset); `_progress/` is removed.
Resuming assumes the raw files did not change in between.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from . import card as cardlib
from .entries import Entry, InputError, SkipLog, log, split_sort_key
from .fsutil import TMP_MARK, atomic_write_bytes, remove_tree
from .images import IMAGE_KEY, BadImage, ImageOptions, check_image, encode_image
from .shards import shard_name, write_shard
from .tokenizer import DEFAULT_VOCAB_SIZE, train_wordpiece
from .workers import Workers

PROGRESS_DIR = "_progress"
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


def _progress_bar(total: int, desc: str, enabled: bool, done: int = 0):
    try:
        from tqdm import tqdm  # comes with transformers (huggingface_hub), not declared by us
    except ImportError:
        enabled, tqdm = False, None
    if not enabled:
        return contextlib.nullcontext(_NoBar())
    return tqdm(total=total, initial=done, unit="img", desc=desc, file=sys.stderr, dynamic_ncols=True)


class _NoBar:
    def update(self, n: int) -> None:
        pass


# ---- 1. check --------------------------------------------------------------------

def _check_chunk(paths: list[tuple[str, str]]) -> list[list[str]]:
    bad = []
    for key, path in paths:
        try:
            check_image(path)
        except BadImage as e:
            bad.append([key, e.reason, str(e)])
    return bad


def find_bad_images(entries: list[Entry], out_dir: Path, workers: Workers, opts: BuildOptions) -> dict:
    """key -> [reason, detail] for every image that cannot be used; cached for resuming."""
    cache = out_dir / PROGRESS_DIR / "check.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    jobs = [[(e.key, str(e.image)) for e in entries[i:i + CHECK_CHUNK]]
            for i in range(0, len(entries), CHECK_CHUNK)]
    bad = {}
    with _progress_bar(len(entries), "check", opts.progress) as bar:
        for job, found in zip(jobs, workers.map(_check_chunk, jobs)):
            bad.update({key: [reason, detail] for key, reason, detail in found})
            bar.update(len(job))
    atomic_write_bytes(cache, json.dumps(bad).encode())
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
    """Write one shard; returns its stats (also saved as its done-marker)."""
    def records():
        for entry in task.entries:
            try:
                data = encode_image(entry.image, image)
            except BadImage as e:  # it passed the check: the file changed under us
                raise InputError(f"{e} changed while the dataset was being built; "
                                 f"delete {out_dir} and run again") from None
            yield _record(entry, data)

    write_shard(records(), out_dir / task.name)
    stats = {"name": task.name, "records": len(task.entries),
             "captions": sum(len(e.captions) for e in task.entries),
             "without_labels": sum(1 for e in task.entries if not e.labels)}
    atomic_write_bytes(_marker(out_dir, task), json.dumps(stats).encode())
    return stats


def _write_task_star(args) -> dict:
    return write_task(*args)


def _marker(out_dir: Path, task: ShardTask) -> Path:
    return out_dir / PROGRESS_DIR / f"{task.name}.json"


def _start_or_resume(out_dir: Path, fp: str) -> None:
    """Check a half-built folder belongs to these inputs; clear temp files a killed run left."""
    plan_file = out_dir / PROGRESS_DIR / "plan.json"
    if plan_file.is_file():
        old = json.loads(plan_file.read_text()).get("fingerprint")
        if old != fp:
            raise InputError(f"{out_dir} holds a partial build from other inputs or options "
                             f"(fingerprint {old}, now {fp}): delete it or choose another --out")
        log.info("resuming the partial build in %s", out_dir)
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir} is not empty and holds no dataset build: choose another --out")
    plan_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(plan_file, json.dumps({"fingerprint": fp}).encode())
    for stale in [p for p in out_dir.iterdir() if TMP_MARK in p.name]:
        stale.unlink()


def write_shards(tasks: list[ShardTask], out_dir: Path, workers: Workers, opts: BuildOptions) -> None:
    todo = [t for t in tasks if not _marker(out_dir, t).is_file()]
    if len(todo) < len(tasks):
        log.info("%d of %d shards already written", len(tasks) - len(todo), len(tasks))
    total, left = (sum(len(t.entries) for t in ts) for ts in (tasks, todo))
    sizes = {t.name: len(t.entries) for t in todo}
    with _progress_bar(total, "write", opts.progress, done=total - left) as bar:
        for stats in workers.map(_write_task_star, [(t, opts.image, out_dir) for t in todo], ordered=False):
            bar.update(sizes[stats["name"]])


# ---- 4. finish ---------------------------------------------------------------------

def split_summary(tasks: list[ShardTask], out_dir: Path) -> dict:
    splits: dict[str, dict] = {}
    for task in tasks:
        stats = json.loads(_marker(out_dir, task).read_text())
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
    out_dir = Path(out_dir)
    fp = fingerprint(entries, opts)
    made_with = {**made_with, **opts.shaping(), "fingerprint": fp}
    if (out_dir / cardlib.CARD_NAME).is_file():
        return _already_built(out_dir, fp)
    _start_or_resume(out_dir, fp)
    with Workers(opts.workers) as workers:
        good = usable(entries, find_bad_images(entries, out_dir, workers, opts), skips)
        if not good:
            remove_tree(out_dir / PROGRESS_DIR)  # nothing worth resuming; a fixed re-run starts fresh
            raise NothingWritten(f"no usable image for {out_dir}; skipped: {dict(skips.counts)}")
        tasks = plan(good, opts)
        write_shards(tasks, out_dir, workers, opts)
    splits = split_summary(tasks, out_dir)
    train_captions = [c for e in good if e.split == "train" for c in e.captions]
    vocab = None
    if train_captions:
        vocab = train_wordpiece(train_captions, out_dir / "tokenizer.json", opts.vocab_size)
    else:
        log.warning("no train split: no tokenizer.json (configure a pretrained tokenizer instead)")
    card = cardlib.make_card(name, categories, IMAGE_KEY, splits, made_with, dict(skips.counts),
                             tokenizer="tokenizer.json" if vocab else None, tokenizer_vocab_size=vocab)
    cardlib.write_card(out_dir, card)
    remove_tree(out_dir / PROGRESS_DIR)
    return card


def _already_built(out_dir: Path, fp: str) -> dict:
    card = cardlib.read_card(out_dir)
    if card.get("made_with", {}).get("fingerprint") != fp:
        raise InputError(f"{out_dir} already holds a dataset made from other inputs or options: "
                         "delete it or choose another --out")
    log.info("%s is already complete; nothing to do", out_dir)
    return card
