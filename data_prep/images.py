"""Checking, reading and (optionally) shrinking one image for a shard.

`check_image` proves a file decodes (a JPEG is decoded at 1/8 scale: every
byte of the compressed stream is still read, so truncated or corrupt files
fail, at a fraction of the cost). `encode_image` then gives the bytes to
store: a JPEG that needs no change is stored byte for byte; anything else
(resize, non-RGB, PNG ...) is re-encoded as RGB JPEG. So every real-data shard
has one image key, "jpg", and every image decodes as RGB.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

IMAGE_KEY = "jpg"


@dataclass(frozen=True)
class ImageOptions:
    resize: int | None = None  # shorter side in pixels; only ever shrinks
    quality: int = 90          # JPEG quality when re-encoding


class BadImage(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadImage("missing_image", str(path)) from None
    except OSError as e:
        raise BadImage("unreadable_image", f"{path}: {e}") from None


def _decode(data: bytes, path: Path, at_least: tuple[int, int] | None = None) -> Image.Image:
    """Decode fully; a JPEG only down to `at_least` pixels (libjpeg's DCT scaling: much faster)."""
    try:
        img = Image.open(io.BytesIO(data))
        if at_least and img.format == "JPEG":
            img.draft("RGB", at_least)
        img.load()
        return img
    except Exception as e:  # PIL raises many types for bad files
        raise BadImage("unreadable_image", f"{path}: {type(e).__name__}: {e}") from None


def check_image(path) -> None:
    """Raise BadImage(reason) unless the file exists and decodes."""
    path = Path(path)
    _decode(_read(path), path, at_least=(1, 1))  # 1/8 scale, the smallest libjpeg offers


def target_size(size: tuple[int, int], shorter: int | None) -> tuple[int, int]:
    """`size` scaled so its shorter side is `shorter` (never enlarged)."""
    if not shorter or min(size) <= shorter:
        return size
    scale = shorter / min(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def needs_reencoding(img: Image.Image, options: ImageOptions) -> bool:
    too_big = options.resize is not None and min(img.size) > options.resize
    return too_big or img.format != "JPEG" or img.mode != "RGB"


def encode_image(path, options: ImageOptions) -> bytes:
    """JPEG bytes for the shard (call after `check_image`), or BadImage(reason)."""
    path = Path(path)
    data = _read(path)
    try:
        header = Image.open(io.BytesIO(data))  # reads the header only
    except Exception as e:
        raise BadImage("unreadable_image", f"{path}: {type(e).__name__}: {e}") from None
    if not needs_reencoding(header, options):
        return data
    size = target_size(header.size, options.resize)
    img = _decode(data, path, at_least=size)
    if img.size != size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=options.quality)
    return buf.getvalue()
