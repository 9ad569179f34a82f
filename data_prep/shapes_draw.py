"""Drawing a shapes scene with PIL.

Scenes are drawn at 4x the target size and downsampled, so that small objects
(about 10 px across at 64 px) keep anti-aliased, recognisable outlines.
Every shape is a filled, solid-colour silhouette whose outline differs from the
others even when small: round (circle), hollow (ring), corners up or down
(triangle, heart), axis-aligned or rotated (square, diamond), pointy (star)
or thin-armed (cross).
"""
from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond", "ring", "heart"]

# Saturated, well-separated hues; all dark or vivid enough to stand out on a light background.
COLOURS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 0),
    "yellow": (225, 200, 0),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (130, 40, 180),
    "pink": (240, 100, 190),
    "black": (25, 25, 25),
}

SIZES = {"big": 0.42, "small": 0.25}  # radius as a fraction of a grid cell
GRID = 3
SUPERSAMPLE = 4


def _star(cx, cy, r, points=5, inner=0.45):
    out = []
    for i in range(points * 2):
        rad = r if i % 2 == 0 else r * inner
        angle = -math.pi / 2 + i * math.pi / points
        out.append((cx + rad * math.cos(angle), cy + rad * math.sin(angle)))
    return out


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(1, round(r * 0.38)))
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r), fill=fill)
    elif shape == "cross":
        w = r * 0.33
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif shape == "heart":
        lobe = r * 0.52
        for dx in (-lobe, lobe):
            draw.ellipse((cx + dx - lobe, cy - r * 0.55 - lobe * 0.5,
                          cx + dx + lobe, cy - r * 0.55 + lobe * 1.5), fill=fill)
        draw.polygon([(cx - r, cy - r * 0.2), (cx + r, cy - r * 0.2), (cx, cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: dict, image_size: int) -> Image.Image:
    """scene = {"background": (r, g, b), "objects": [{"shape", "colour", "size", "cell": (row, col),
    "offset": (dx, dy) in cell fractions, "tint": (r, g, b) offsets}]}."""
    big = image_size * SUPERSAMPLE
    cell = big / GRID
    img = Image.new("RGB", (big, big), tuple(scene["background"]))
    draw = ImageDraw.Draw(img)
    for obj in scene["objects"]:
        row, col = obj["cell"]
        cx = (col + 0.5 + obj["offset"][0]) * cell
        cy = (row + 0.5 + obj["offset"][1]) * cell
        fill = tuple(max(0, min(255, c + t)) for c, t in zip(COLOURS[obj["colour"]], obj["tint"]))
        _draw_shape(draw, obj["shape"], cx, cy, SIZES[obj["size"]] * cell, fill)
    return img.resize((image_size, image_size), Image.Resampling.BOX)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
