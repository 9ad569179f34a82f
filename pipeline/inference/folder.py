"""A folder of image files as search reads it: every file under it, recursively, in sorted path order;
decoded in DataLoader workers with a run's own evaluation preprocessing.

Never read outside the folder: a link (to a file or a folder) that leads outside it is skipped as
`outside_folder`, and a linked folder inside it as `linked_folder` (its files are read where they
are). A FIFO, socket or device is `not_a_file` (reading one could wait forever). A file that cannot be
opened is `unreadable`, one that is not an image `not_an_image`, an image that fails to decode `corrupt`.
Skipped files are counted and listed, never fatal.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO, Callable

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except ValueError:
        return False


def _regular(path: Path) -> bool:
    """Whether `path` (a link followed) is a regular file; one that cannot be looked at counts as one, for
    load_image to say what is wrong with it."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return True


def scan_images(folder) -> tuple[list[str], list[tuple[str, str]]]:
    """(files as paths relative to `folder`, sorted; [(path, reason)] of what was skipped while listing)."""
    root = Path(folder)
    real_root = root.resolve()
    files, skipped = [], []

    def unreadable(error: OSError) -> None:
        skipped.append((os.path.relpath(error.filename, root) if error.filename else "?", "unreadable"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):  # links to folders: not followed
        here = Path(dirpath)
        for name in dirnames:
            if (here / name).is_symlink():
                reason = "linked_folder" if _inside(here / name, real_root) else "outside_folder"
                skipped.append(((here / name).relative_to(root).as_posix(), reason))
        for name in filenames:
            path = here / name
            if path.is_symlink() and not _inside(path, real_root):
                skipped.append((path.relative_to(root).as_posix(), "outside_folder"))
            elif not _regular(path):
                skipped.append((path.relative_to(root).as_posix(), "not_a_file"))
            else:
                files.append(path.relative_to(root).as_posix())
    return sorted(files), sorted(skipped)


def load_image(path: Path, transform: Callable) -> tuple[torch.Tensor | None, str | None]:
    """(pixels, None), or (None, the reason it was skipped)."""
    try:
        f = open(path, "rb")
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        return None, "unreadable"
    with f:
        return decode_image(f, transform)


def decode_image(f: BinaryIO, transform: Callable, max_pixels: int | None = None
                 ) -> tuple[torch.Tensor | None, str | None]:
    """An open image file (or uploaded bytes) as pixels: (pixels, None), or (None, `not_an_image` |
    `corrupt` | `too_large`: over `max_pixels`, told by the header before anything is decoded)."""
    try:
        image = Image.open(f)
        if max_pixels is not None and image.width * image.height > max_pixels:
            return None, "too_large"
        image = image.convert("RGB")
    except UnidentifiedImageError:
        return None, "not_an_image"
    except Exception:  # a truncated or damaged image, a decompression bomb
        return None, "corrupt"
    return transform(image), None


class ImageFiles(Dataset):
    def __init__(self, root: Path, files: list[str], transform: Callable):
        self.root, self.files, self.transform = Path(root), files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        pixels, reason = load_image(self.root / self.files[i], self.transform)
        return i, pixels, reason


def _collate(items: list) -> dict:
    kept = [(i, pixels) for i, pixels, _ in items if pixels is not None]
    return {"positions": [i for i, _ in kept], "images": torch.stack([p for _, p in kept]) if kept else None,
            "skipped": [(i, reason) for i, pixels, reason in items if pixels is None]}


def image_batches(root: Path, files: list[str], transform: Callable, batch_size: int, workers: int):
    """Batches in file order: {"positions" (into `files`), "images" (or None), "skipped": [(position,
    reason)]}; decoding runs in `workers` processes."""
    return DataLoader(ImageFiles(root, files, transform), batch_size=batch_size, num_workers=workers,
                      collate_fn=_collate, shuffle=False)
