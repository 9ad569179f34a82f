"""The evaluation protocol (docs/protocol.md) on saved features from any model: a drop-in for the reference ``fico_itr``.

    python -m pipeline.evaluate --image img.npy --text txt.npy --caption-image map.npy \\
        [--labels labels.npy] [--measure cosine|inner_product|euclidean|hamming] \\
        [--ks 1,5,10] [--map-ks 10,100,N] [--out results.json] [--device cpu|cuda]

Inputs are ``.npy`` files (``np.save``): image features ``[N, D]``, caption features
``[M, D]``, ``caption_image`` int ``[M]`` (the image index of each caption, any number and
order of captions per image), optional labels ``[N, C]`` multi-hot or ``[N]`` class ids
(adds category-level mAP). For ``hamming`` the features are codes: packed ``uint8`` bytes,
or bool / 0-1 / ±1 per bit. The numbers are ``pipeline.metrics.evaluate``'s on the same
arrays (R@K in percent, mAP as fractions); the table is printed and, with ``--out``, the
dict is written as JSON together with the inputs' description.
Default ks: 1,5,10, and for hamming also 50,100,200 (the paper's Table 3 for hash models).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.cli import int_list
from pipeline.evaluation.scores import MEASURES



def _map_ks(text: str) -> tuple[int | None, ...]:
    return tuple(None if v.strip().upper() == "N" else int(v) for v in text.split(",") if v.strip())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True, type=Path, help="image features / codes, .npy [N, D]")
    p.add_argument("--text", required=True, type=Path, help="caption features / codes, .npy [M, D]")
    p.add_argument("--caption-image", required=True, type=Path, help="image index of each caption, .npy [M]")
    p.add_argument("--labels", type=Path, help="image labels, .npy [N, C] multi-hot or [N] ids (enables mAP)")
    p.add_argument("--measure", choices=MEASURES, default="cosine")
    p.add_argument("--ks", type=int_list, default=None, help="R@K cut-offs (default 1,5,10; hamming adds 50,100,200)")
    p.add_argument("--map-ks", type=_map_ks, default=(10, 100, None), help="mAP@k cut-offs, N = whole gallery")
    p.add_argument("--chunk-size", type=int, default=None, help="score elements per block (bounds memory)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--title", default="", help="table title")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    return p.parse_args(argv)


def default_ks(measure: str) -> tuple[int, ...]:
    return (1, 5, 10, 50, 100, 200) if measure == "hamming" else (1, 5, 10)


def _load(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"--{what}: no such file {path}")
    return np.load(path, allow_pickle=False)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from pipeline.evaluation.protocol import evaluate
    from pipeline.evaluation.table import format_table

    try:
        img, txt = _load(args.image, "image"), _load(args.text, "text")
        cap = _load(args.caption_image, "caption-image")
        labels = _load(args.labels, "labels") if args.labels else None
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ks = args.ks or default_ks(args.measure)
    device = torch.device(args.device)
    to = (lambda a: a) if device.type == "cpu" else (lambda a: torch.as_tensor(a).to(device))
    start = time.perf_counter()
    try:
        results = evaluate(to(img), to(txt), to(cap), None if labels is None else to(labels),
                           measure=args.measure, ks=ks, map_ks=args.map_ks, chunk_size=args.chunk_size)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(format_table(results, args.title or f"{args.measure}: {img.shape[0]} images x {txt.shape[0]} captions"))
    print(f"\n({seconds:.2f} s on {device})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"image": str(args.image), "text": str(args.text), "caption_image": str(args.caption_image),
                "labels": str(args.labels) if args.labels else None, "measure": args.measure,
                "num_images": int(img.shape[0]), "num_captions": int(txt.shape[0]), "ks": list(ks),
                "map_ks": ["N" if k is None else k for k in args.map_ks], "seconds": seconds}
        args.out.write_text(json.dumps({"results": results, "inputs": meta}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
