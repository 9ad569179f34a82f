"""Atomic file and directory writes: a reader never sees a half-written file.

Everything is first written under a hidden temporary name in the same folder
(same filesystem, so the final `os.replace`/`os.rename` is atomic) and only
then given its final name.
"""
from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

TMP_MARK = ".tmp-"  # every temporary name contains this; tests look for leftovers by it


def tmp_sibling(path: Path) -> Path:
    """A unique hidden name next to `path` (unique across processes and threads)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_open(path: Path, permissions: int = 0o666) -> Iterator[BinaryIO]:
    """A binary file that appears under `path` only once the block ends without an error.
    `permissions` (before the umask) hold from the first byte: 0o600 for a file only its owner
    may read."""
    path = Path(path)
    tmp = tmp_sibling(path)
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, permissions), "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, permissions: int = 0o666) -> None:
    with atomic_open(path, permissions) as f:
        f.write(data)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
