"""Atomic file and directory writes: a reader never sees a half-written file.

Everything is first written under a hidden temporary name in the same folder
(same filesystem, so the final `os.replace`/`os.rename` is atomic) and only
then given its final name.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

TMP_MARK = ".tmp-"  # every temporary name contains this; tests look for leftovers by it


def tmp_sibling(path: Path) -> Path:
    """A unique hidden name next to `path` (unique across processes and threads)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
