"""Raw datasets -> WebDataset shards + dataset.json (+ tokenizer.json).

  python -m data_prep shapes --out DIR                  the embedded synthetic default
  python -m data_prep coco --karpathy dataset_coco.json --images COCO_ROOT
         --instances instances_train2014.json instances_val2014.json --out DIR
  python -m data_prep flickr30k --karpathy dataset_flickr30k.json --images DIR [--labels FILE] --out DIR
  python -m data_prep manifest --jsonl FILE --images DIR --out DIR
  python -m data_prep wds --train 'shards/train-*.tar' [--val GLOB] [--test GLOB] --out DIR   (read in place)
  (feature shards: python -m pipeline.features --shards DIR --config CFG --out DIR [--tokens])

Exit status: 0 written (bad inputs are skipped and summarised), 1 nothing usable
was written, 2 the inputs cannot be read.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from .card import read_card
from .entries import InputError, SkipLog


# ---- shapes --------------------------------------------------------------------

def _add_shapes(sub) -> None:
    p = sub.add_parser("shapes", help="the embedded procedurally drawn shapes dataset")
    p.add_argument("--out", required=True, type=Path, help="dataset folder to create")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=10000, help="number of training images")
    p.add_argument("--val", type=int, default=1000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=1000, help="records per shard")
    p.add_argument("--workers", type=int, default=None, help="processes (default: up to 4 for big builds)")
    p.set_defaults(run=_run_shapes)


def _run_shapes(args) -> int:
    from .shapes import build_shapes, default_workers
    workers = args.workers or default_workers(args.train + args.val + args.test)
    try:
        build_shapes(args.out, seed=args.seed, train=args.train, val=args.val, test=args.test,
                     image_size=args.image_size, shard_size=args.shard_size, workers=workers)
    except (ValueError, FileExistsError) as e:  # out dir holds something else
        raise InputError(str(e)) from None
    return 0


# ---- real datasets ---------------------------------------------------------------

def _writer_options(p) -> None:
    g = p.add_argument_group("shard writing")
    g.add_argument("--out", required=True, type=Path, help="dataset folder (re-run the same command to resume)")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="parallel shard writers")
    g.add_argument("--shard-mb", type=float, default=128.0, help="size target per shard in MB")
    g.add_argument("--min-shards", type=int, default=8, help="at least this many shards per split")
    g.add_argument("--shard-size", type=int, default=None, help="records per shard (overrides --shard-mb)")
    g.add_argument("--resize", type=int, default=None, help="shrink so the shorter side is at most this")
    g.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding")
    g.add_argument("--vocab-size", type=int, default=8000, help="WordPiece vocabulary size")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_coco(sub) -> None:
    p = sub.add_parser("coco", help="MS-COCO, Karpathy splits, labels from instance annotations")
    p.add_argument("--karpathy", required=True, type=Path, help="dataset_coco.json")
    p.add_argument("--images", required=True, type=Path, help="folder holding train2014/ and val2014/")
    p.add_argument("--instances", nargs="*", default=[], type=Path, help="instances_*2014.json files")
    p.add_argument("--keep-restval", action="store_true", help="write restval as its own split")
    _writer_options(p)
    p.set_defaults(run=_run_coco)


def _add_flickr30k(sub) -> None:
    p = sub.add_parser("flickr30k", help="Flickr30K, Karpathy splits, optional label file")
    p.add_argument("--karpathy", required=True, type=Path, help="dataset_flickr30k.json")
    p.add_argument("--images", required=True, type=Path, help="folder holding the .jpg files")
    p.add_argument("--labels", type=Path, help=".npy or .mat (v5 or v7.3), images x classes 0/1")
    p.add_argument("--labels-var", default="LAll", help="variable name inside a .mat file")
    p.add_argument("--labels-split", default="all", help="'all', or the one split the rows cover (e.g. test)")
    p.add_argument("--categories", type=Path, help="category names, one per line (default: COCO's 80)")
    _writer_options(p)
    p.set_defaults(run=_run_flickr30k)


def _fractions(text: str) -> tuple[float, float, float]:
    parts = [float(x) for x in text.split(",")]
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise argparse.ArgumentTypeError("expected three non-negative fractions, e.g. 0.8,0.1,0.1")
    return tuple(parts)


def _add_manifest(sub) -> None:
    p = sub.add_parser("manifest", help="any dataset described by a JSON-lines manifest")
    p.add_argument("--jsonl", required=True, type=Path, help="one JSON object per line: path, captions, ...")
    p.add_argument("--images", required=True, type=Path, help="folder the manifest paths are relative to")
    p.add_argument("--name", default=None, help="dataset name (default: the --out folder's name)")
    p.add_argument("--categories", type=Path, help="category names, one per line")
    p.add_argument("--label-format", choices=["indices", "multihot"], default="indices")
    p.add_argument("--split", type=_fractions, default=(0.8, 0.1, 0.1),
                   help="train,val,test fractions for lines without a split")
    p.add_argument("--seed", type=int, default=0, help="seed of that split")
    _writer_options(p)
    p.set_defaults(run=_run_manifest)


def _build(args, name: str, read, made_with: dict) -> int:
    from .images import ImageOptions
    from .writer import BuildOptions, NothingWritten, build_dataset
    skips = SkipLog()
    opts = BuildOptions(image=ImageOptions(args.resize, args.quality), workers=args.workers,
                        shard_mb=args.shard_mb, min_shards=args.min_shards, shard_size=args.shard_size,
                        vocab_size=args.vocab_size, progress=not args.no_progress)
    categories, entries = read(skips)
    try:
        build_dataset(args.out, name, categories, entries, made_with, opts, skips)
    except NothingWritten as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _run_coco(args) -> int:
    from .coco import coco_entries
    made_with = {"command": "coco", "karpathy": str(args.karpathy), "images": str(args.images),
                 "instances": [str(p) for p in args.instances], "keep_restval": args.keep_restval}
    return _build(args, "coco", lambda skips: coco_entries(
        args.karpathy, args.images, args.instances, args.keep_restval, skips), made_with)


def _run_flickr30k(args) -> int:
    from .flickr30k import flickr30k_entries
    made_with = {"command": "flickr30k", "karpathy": str(args.karpathy), "images": str(args.images),
                 "labels": str(args.labels) if args.labels else None, "labels_split": args.labels_split}
    return _build(args, "flickr30k", lambda skips: flickr30k_entries(
        args.karpathy, args.images, args.labels, args.labels_split, args.labels_var, args.categories,
        skips), made_with)


def _run_manifest(args) -> int:
    from .manifest import manifest_entries
    name = args.name or args.out.resolve().name
    made_with = {"command": "manifest", "jsonl": str(args.jsonl), "images": str(args.images),
                 "split": list(args.split), "seed": args.seed, "label_format": args.label_format}
    return _build(args, name, lambda skips: manifest_entries(
        args.jsonl, args.images, args.categories, args.split, args.seed, args.label_format, name,
        skips), made_with)


# ---- shards made by others ----------------------------------------------------------

def _add_wds(sub) -> None:
    p = sub.add_parser("wds", help="image-text shards made by others (img2dataset / open_clip layout), read in place")
    for split in ("train", "val", "test"):
        p.add_argument(f"--{split}", required=split == "train", help=f"a glob of the {split} shards (quote it)")
    p.add_argument("--out", required=True, type=Path, help="where the card and tokenizer go (not the shard folder)")
    p.add_argument("--name", default=None, help="dataset name (default: the --out folder's name)")
    p.add_argument("--vocab-size", type=int, default=8000, help="WordPiece vocabulary size")
    p.set_defaults(run=_run_wds)


def _run_wds(args) -> int:
    from .wds import build_wds_card
    globs = {split: getattr(args, split) for split in ("train", "val", "test") if getattr(args, split)}
    build_wds_card(globs, args.out, args.name, args.vocab_size)
    return 0


# ---- feature shards ----------------------------------------------------------------

def _add_features(sub) -> None:
    # Feature shards need the pipeline's encoders, and nothing here imports from pipeline: the command
    # lives there now; this name only points at it.
    p = sub.add_parser("features", help="moved: python -m pipeline.features", prefix_chars="+", add_help=False)
    p.add_argument("args", nargs="*")
    p.set_defaults(run=_run_features)


def _run_features(args) -> int:
    print("error: feature shards are made by `python -m pipeline.features` (same options)", file=sys.stderr)
    return 2


# ---- main ----------------------------------------------------------------------

def print_summary(out_dir: Path, seconds: float) -> None:
    card = read_card(out_dir)
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    print(f"{card['name']} -> {out_dir}")
    for split, entry in card["splits"].items():
        line = (f"  {split:>5}: {entry['num_images']:>7} images {entry['num_captions']:>8} captions "
                f"{len(entry['shards']):>4} shards")
        if entry.get("num_without_labels"):
            line += f" ({entry['num_without_labels']} without labels)"
        print(line)
    skipped = card.get("skipped") or {}
    print("  skipped: " + (", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "nothing"))
    print(f"  {size / 1e6:.1f} MB on disk, {seconds:.1f} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_shapes, _add_coco, _add_flickr30k, _add_manifest, _add_wds, _add_features):
        add(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="data_prep: %(message)s")
    start = time.perf_counter()
    try:
        code = args.run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if code == 0:
        print_summary(Path(args.out), time.perf_counter() - start)
    return code


if __name__ == "__main__":
    sys.exit(main())
