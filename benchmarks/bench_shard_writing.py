"""Shard-writing rate (images/s) and shard bytes per image, at the default settings.

Makes N COCO-like JPEGs (640x480, smooth shapes plus sensor-like noise, quality
90; COCO's own files average about 160 kB), a manifest for them, then times
`python -m data_prep manifest` end to end (check + write + tokenizer + card):
once at the defaults (JPEGs stored as they are) and once re-encoding with
`--resize 256`. Inputs are made once and reused; outputs are deleted.

    python benchmarks/bench_shard_writing.py [--images 2000] [--workers N] [--work DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_prep.__main__ import main as data_prep_main  # noqa: E402


def fake_photo(rng: np.random.Generator, size=(640, 480)) -> bytes:
    w, h = size
    img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(40, 200, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(3, 9)):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        box = (x0, y0, x0 + rng.integers(20, 300), y0 + rng.integers(20, 300))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    noisy = np.asarray(img, dtype=np.int16) + rng.integers(-10, 11, (h, w, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_inputs(folder: Path, n: int) -> Path:
    manifest = folder / "manifest.jsonl"
    if manifest.is_file() and sum(1 for _ in manifest.open()) == n:
        return manifest
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = "a man woman dog cat red blue car street table sits stands near with on the of".split()
    with open(manifest, "w") as f:
        for i in range(n):
            (folder / "images" / f"{i:06d}.jpg").write_bytes(fake_photo(rng))
            captions = [" ".join(rng.choice(words, 10)) for _ in range(5)]
            f.write(json.dumps({"path": f"{i:06d}.jpg", "captions": captions}) + "\n")
    return manifest


def run(manifest: Path, out: Path, workers: int, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    args = ["manifest", "--jsonl", str(manifest), "--images", str(manifest.parent / "images"),
            "--out", str(out), "--workers", str(workers), "--no-progress", *extra]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        assert data_prep_main(args) == 0
    seconds = time.perf_counter() - start
    card = json.loads((out / "dataset.json").read_text())
    images = sum(s["num_images"] for s in card["splits"].values())
    shard_bytes = sum(p.stat().st_size for p in out.glob("*.tar"))
    shards = sum(len(s["shards"]) for s in card["splits"].values())
    shutil.rmtree(out)
    return {"settings": " ".join(extra) or "defaults", "workers": workers, "images": images,
            "seconds": round(seconds, 2), "load_avg_1min": round(os.getloadavg()[0], 1),  # others' work skews it
            "images_per_s": round(images / seconds, 1), "shard_bytes_per_image": round(shard_bytes / images),
            "shards": shards}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="the CLI's default")
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "out" / "shard_writing")
    args = parser.parse_args()
    t0 = time.perf_counter()
    manifest = make_inputs(args.work, args.images)
    input_bytes = sum(p.stat().st_size for p in (args.work / "images").iterdir()) / args.images
    print(f"{args.images} inputs ready in {time.perf_counter() - t0:.1f} s, "
          f"{input_bytes / 1e3:.0f} kB per JPEG; {os.cpu_count()} CPUs, --workers {args.workers}")
    for extra in ([], ["--resize", "256"]):
        print(json.dumps(run(manifest, args.work / "ds", args.workers, extra)))


if __name__ == "__main__":
    main()
