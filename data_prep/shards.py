"""WebDataset tar shards: one record = one image.

A record is a dict in WebDataset's sample form:
    {"__key__": "shapes_train_000123", "png": b"...", "json": {"id": ..., "index": 123,
     "captions": [...], "labels": [...], "split": "train"}}
`index` is the record's dense position in its split (0..num_images-1, after
bad inputs were skipped): the pipeline keys per-item state and eval ids on it.
Tars are written with plain `tarfile` and fixed metadata (mtime 0, no owner),
so the same records always give byte-identical shards. Each shard is written
under a temporary name and renamed when complete: a file with a final shard
name is always a whole shard, which is also what makes resuming safe.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

from .fsutil import atomic_open

SHARD_PATTERN = "{split}-{index:06d}.tar"


def shard_name(split: str, index: int) -> str:
    return SHARD_PATTERN.format(split=split, index=index)


def record_members(record: dict) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) for each field of a record, in a fixed order."""
    key = record["__key__"]
    if "/" in key or "." in key:
        # webdataset splits member names at the first dot after the last slash.
        raise ValueError(f"record key {key!r} must not contain '/' or '.'")
    for field in sorted(k for k in record if not k.startswith("__")):
        value = record[field]
        if isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        if isinstance(value, str):
            value = value.encode("utf-8")
        yield f"{key}.{field}", bytes(value)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed metadata -> reproducible bytes
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def write_shard(records: Iterable[dict], path) -> int:
    """Write records into one tar at `path` atomically; returns the record count."""
    count = 0
    with atomic_open(path) as f, tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for record in records:
            for name, data in record_members(record):
                _add_member(tar, name, data)
            count += 1
    return count


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_split(records: Iterable[dict], out_dir, split: str, shard_size: int) -> list[str]:
    """Write a split's records as `{split}-{i:06d}.tar` shards of `shard_size` records.

    Returns the shard file names (relative to `out_dir`), in order.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for index, chunk in enumerate(_chunks(records, shard_size)):
        name = shard_name(split, index)
        write_shard(chunk, out_dir / name)
        names.append(name)
    return names
