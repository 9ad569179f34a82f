"""Loader throughput on the same images: our shard stream vs a plain map-style Dataset over JPEGs.

Both loaders do the same work per sample: read the JPEG, decode, resize to --size (bicubic, the
pipeline's `image_transform`), normalise, pick one caption, and per batch stack the pixels and
tokenize the captions (the dataset's WordPiece tokenizer). Ours is `pipeline.data.build_stream`
as training uses it (resampled shards, shuffle buffer, equal-length epochs); the baseline is a
`torch.utils.data.Dataset` reading `folder/NNNNNN.jpg` with DataLoader(shuffle=True).

Inputs: COCO-like 640x480 JPEGs (benchmarks/bench_shard_writing.py makes them), written into
shards by `python -m data_prep manifest` at its defaults (JPEGs stored as they are). Every
configuration times the same number of samples (--samples), after one warm-up batch (worker
start-up is reported apart), and runs --reps times, interleaved with the others so that load
from other processes hits all alike; medians are printed. Part 2 measures the cost per sample
of the shard stream (and the baseline) on datasets of different sizes (--sizes).

    python benchmarks/bench_loader.py [--sizes 1000 4000] [--workers 0 1 2] [--samples 1024] [--reps 3]
                                      [--also-resized 256]   (shards made with data_prep --resize 256 too)

Both read from the page cache here (the files were just written): this measures decoding and
the loader machinery, not storage. On network or spinning storage shards also turn ~N random
file reads into a few sequential ones, which this machine cannot show.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.bench_shard_writing import make_inputs  # noqa: E402
from data_prep.__main__ import main as data_prep_main  # noqa: E402
from pipeline.data import DatasetCard, SharedEpoch, build_stream, image_transform, load_tokenizer  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class JpegFolder(Dataset):
    """The baseline: one JPEG file per sample, read and decoded on demand."""

    def __init__(self, rows: list[dict], folder: Path, transform):
        self.rows, self.folder, self.transform = rows, folder, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        image = Image.open(self.folder / row["path"]).convert("RGB")
        return self.transform(image), random.choice(row["captions"])


class TokenizingCollate:
    def __init__(self, tokenizer, max_len: int = 48):
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, items):
        tok = self.tokenizer([c for _, c in items], padding=True, truncation=True, max_length=self.max_len,
                             return_tensors="pt")
        return {"images": torch.stack([p for p, _ in items]), "text": dict(tok)}


def prepare(work: Path, sizes: list[int], resized: int | None = None) -> dict:
    """JPEGs for the largest size, and for each size a manifest of its first n and their shards."""
    t0 = time.perf_counter()
    manifest = make_inputs(work / "inputs", max(sizes))
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    files = list((work / "inputs" / "images").iterdir())
    print(f"{max(sizes)} JPEGs ready in {time.perf_counter() - t0:.0f} s "
          f"({sum(f.stat().st_size for f in files) / len(files) / 1e3:.0f} kB each)")
    out = {}
    for n in sizes:
        shards = work / f"shards_{n}"
        if not (shards / "dataset.json").is_file():
            sub = work / f"manifest_{n}.jsonl"
            sub.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
            with contextlib.redirect_stdout(io.StringIO()):
                assert data_prep_main(["manifest", "--jsonl", str(sub), "--images", str(work / "inputs" / "images"),
                                       "--out", str(shards), "--split", "1,0,0", "--workers", "2",
                                       "--no-progress"]) == 0
        out[n] = (shards, rows[:n])
    if resized:  # the smallest set again, shrunk at build time (shorter side `resized`)
        n, shards = min(sizes), work / f"shards_{min(sizes)}_resize{resized}"
        if not (shards / "dataset.json").is_file():
            with contextlib.redirect_stdout(io.StringIO()):
                assert data_prep_main(["manifest", "--jsonl", str(work / f"manifest_{n}.jsonl"), "--images",
                                       str(work / "inputs" / "images"), "--out", str(shards), "--split", "1,0,0",
                                       "--resize", str(resized), "--workers", "2", "--no-progress"]) == 0
        out["resized"] = (shards, rows[:n])
        mb = {name: sum(f.stat().st_size for f in (work / name).glob("*.tar")) / 1e6
              for name in (f"shards_{n}", shards.name)}
        print("shard MB: " + ", ".join(f"{k} {v:.0f}" for k, v in mb.items()))
    return out


def shard_loader(shards: Path, batch: int, workers: int, samples: int, size: int, seed: int):
    card = DatasetCard.read(shards)
    loader, _ = build_stream(card, "train", train=True, batch_size=batch, rank=0, world=1, num_workers=workers,
                             seed=seed, epoch=SharedEpoch(), tokenizer=load_tokenizer(card), max_text_len=48,
                             transform=image_transform(size, MEAN, STD), steps_per_epoch=samples // batch + 1)
    return loader


def folder_loader(shards: Path, rows: list[dict], folder: Path, batch: int, workers: int, size: int, seed: int):
    tokenizer = load_tokenizer(DatasetCard.read(shards))  # the same tokenizer, so the same text work
    return DataLoader(JpegFolder(rows, folder, image_transform(size, MEAN, STD)), batch_size=batch, shuffle=True,
                      num_workers=workers, collate_fn=TokenizingCollate(tokenizer), drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


def timed(loader, samples: int) -> dict:
    """Samples/s after the first batch; the first batch's wait (worker start-up) apart. CPU time of
    this process too: with 0 workers it is all the loading work, whatever the neighbours do."""
    start = time.perf_counter()
    it = iter(loader)
    first = next(it)
    t_first, cpu_first = time.perf_counter(), time.process_time()
    seen, batch = 0, len(first["images"])
    for b in it:
        seen += len(b["images"])
        if seen >= samples:
            break
    end, cpu_end = time.perf_counter(), time.process_time()
    del it
    return {"samples_per_s": seen / (end - t_first), "first_batch_s": t_first - start, "samples": seen,
            "batch": batch, "cpu_ms_per_sample": 1e3 * (cpu_end - cpu_first) / seen}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000], help="dataset sizes (images)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=1024, help="samples timed per run")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224, help="output pixels (square)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "loader")
    p.add_argument("--also-resized", type=int, default=None, metavar="PX",
                   help="also time shards built with `--resize PX` from the smallest set")
    p.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = p.parse_args()
    torch.set_num_threads(1)  # the main process only collates; workers decode
    datasets = prepare(args.work, args.sizes, args.also_resized)
    images = args.work / "inputs" / "images"
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; batch {args.batch}, "
          f"{args.size}x{args.size}, {args.samples} samples per run, medians of {args.reps}")

    def run(kind: str, n: int, workers: int, rep: int) -> dict:
        shards, rows = datasets["resized" if kind == "shards, resized" else n]
        loader = (folder_loader(shards, rows, images, args.batch, workers, args.size, rep) if kind == "jpeg folder"
                  else shard_loader(shards, args.batch, workers, args.samples, args.size, rep))
        return timed(loader, args.samples)

    results = []
    small = min(args.sizes)
    kinds = ("shards", "jpeg folder") + (("shards, resized",) if args.also_resized else ())
    plan = [(kind, small, w) for w in args.workers for kind in kinds]
    plan += [(kind, n, w) for n in args.sizes if n != small for w in sorted({0, max(args.workers)})
             for kind in ("shards", "jpeg folder")]
    for rep in range(args.reps):
        for kind, n, workers in plan:
            r = run(kind, n, workers, rep)
            results.append({"loader": kind, "images": n, "workers": workers, "rep": rep,
                            "load_avg": os.getloadavg()[0], **r})
            print(f"  rep {rep} {kind:>11} n={n:<5} workers={workers}: {r['samples_per_s']:7.1f} samples/s "
                  f"(first batch {r['first_batch_s']:.2f} s, {r['cpu_ms_per_sample']:.2f} CPU ms/sample here)",
                  flush=True)

    if args.json:
        args.json.write_text(json.dumps(results, indent=1))

    def med(kind, n, w, key="samples_per_s"):
        return statistics.median(r[key] for r in results if (r["loader"], r["images"], r["workers"]) == (kind, n, w))

    print(f"\n### Loader throughput, {small} images, samples/s (median of {args.reps}; higher is better)\n")
    print("| workers | shard stream | JPEG folder (map-style) | shards / folder | first batch (s): shards / folder |")
    print("|---|---|---|---|---|")
    for w in args.workers:
        s, f = med("shards", small, w), med("jpeg folder", small, w)
        print(f"| {w} | {s:.1f} | {f:.1f} | {s / f:.2f}x | {med('shards', small, w, 'first_batch_s'):.2f} / "
              f"{med('jpeg folder', small, w, 'first_batch_s'):.2f} |")
    if args.also_resized:
        print(f"\nShards made with `--resize {args.also_resized}` (same images, shrunk once at build time), samples/s: "
              + ", ".join(f"{w} workers {med('shards, resized', small, w):.1f}" for w in args.workers)
              + "; CPU ms/sample at 0 workers: "
              + (f"{med('shards, resized', small, 0, 'cpu_ms_per_sample'):.2f}" if 0 in args.workers else "-"))
    w = max(args.workers)
    if len(args.sizes) < 2:
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
        return
    print(f"\n### Cost per sample vs dataset size (median of {args.reps}; lower is better)\n")
    print(f"| images | shards: CPU ms/sample, 0 workers | folder: CPU ms/sample, 0 workers "
          f"| shards: wall ms/sample, {w} workers | folder: wall ms/sample, {w} workers |")
    print("|---|---|---|---|---|")
    for n in args.sizes:
        cpu = [med(kind, n, 0, "cpu_ms_per_sample") for kind in ("shards", "jpeg folder")]
        print(f"| {n} | {cpu[0]:.2f} | {cpu[1]:.2f} | {1e3 / med('shards', n, w):.2f} "
              f"| {1e3 / med('jpeg folder', n, w):.2f} |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
