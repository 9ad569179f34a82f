"""The evaluation protocol (docs/protocol.md) on saved features or score matrices from any model: a drop-in
for the reference ``fico_itr``.

    python -m pipeline.evaluate --image img.npy --text txt.npy --caption-image map.npy \\
        [--labels labels.npy] [--measure cosine|inner_product|euclidean|hamming] \\
        [--ks 1,5,10] [--map-ks 10,100,N] [--all] [--p-ks 1,10,100,1000] [--folds 5] \\
        [--out results.json] [--device cpu|cuda]
    python -m pipeline.evaluate --scores S.npy [--scores-t2i T.npy] --caption-image map.npy \\
        [--labels labels.npy] [--all] [--folds 5] --out results.json

``--scores``: images x captions (higher = better), memory-mapped and read in row blocks; ``--scores-t2i``
captions x images for models that score the two directions separately (default: S transposed).
``--all`` adds every published convention (docs/protocol.md), and with ``--out`` writes the curves to
``test_curves.json`` beside it (or ``--curves``). ``--folds N``: also every name as the mean over N
equal contiguous folds of the images (``1k/...`` when a fold holds 1,000 images, else ``fold<size>/...``).

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
    p.add_argument("--image", type=Path, help="image features / codes, .npy [N, D]")
    p.add_argument("--text", type=Path, help="caption features / codes, .npy [M, D]")
    p.add_argument("--scores", type=Path, help="instead of features: scores images x captions, .npy [N, M]")
    p.add_argument("--scores-t2i", type=Path, help="scores captions x images, .npy [M, N] (default: --scores transposed)")
    p.add_argument("--caption-image", required=True, type=Path, help="image index of each caption, .npy [M]")
    p.add_argument("--labels", type=Path, help="image labels, .npy [N, C] multi-hot or [N] ids (enables mAP)")
    p.add_argument("--measure", choices=MEASURES, default="cosine")
    p.add_argument("--ks", type=int_list, default=None, help="R@K cut-offs (default 1,5,10; hamming adds 50,100,200)")
    p.add_argument("--map-ks", type=_map_ks, default=(10, 100, None), help="mAP@k cut-offs, N = whole gallery")
    p.add_argument("--all", action="store_true", dest="all_metrics",
                   help="every published convention: [ucch], [dadh], P@K, and for hamming [ties], P@H2, R@H2")
    p.add_argument("--p-ks", type=int_list, default=(1, 10, 100, 1000), help="P@K cut-offs for --all")
    p.add_argument("--folds", type=int, default=None, help="also the mean over N equal contiguous folds of images")
    p.add_argument("--curves", type=Path, help="with --all: write the curves here (default: test_curves.json beside --out)")
    p.add_argument("--chunk-size", type=int, default=None, help="score elements per block (bounds memory)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--title", default="", help="table title")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    return p.parse_args(argv)


def default_ks(measure: str) -> tuple[int, ...]:
    return (1, 5, 10, 50, 100, 200) if measure == "hamming" else (1, 5, 10)


def _load(path: Path, what: str, mmap: bool = False) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"--{what}: no such file {path}")
    return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)


def _inputs(args):
    """The arrays named on the command line (score matrices memory-mapped); one line on bad input."""
    if (args.scores is None) == (args.image is None and args.text is None):
        raise ValueError("give either --image and --text (features) or --scores (a score matrix), not both")
    if args.scores is None and (args.image is None or args.text is None):
        raise ValueError("--image and --text go together")
    if args.scores is not None and args.measure == "hamming":
        raise ValueError("--measure hamming needs codes (--image / --text), not --scores")
    if args.scores_t2i is not None and args.scores is None:
        raise ValueError("--scores-t2i needs --scores")
    cap = _load(args.caption_image, "caption-image")
    labels = _load(args.labels, "labels") if args.labels else None
    if args.scores is not None:
        t2i = None if args.scores_t2i is None else _load(args.scores_t2i, "scores-t2i", mmap=True)
        return {"scores": _load(args.scores, "scores", mmap=True), "scores_t2i": t2i}, cap, labels
    return {"image": _load(args.image, "image"), "text": _load(args.text, "text")}, cap, labels


def _run(args, data, cap, labels, device):
    """(results, curves) of the whole split, then with ``--folds`` the fold means."""
    from pipeline.evaluation.folds import evaluate_folds
    from pipeline.evaluation.protocol import evaluate
    from pipeline.evaluation.score_input import evaluate_scores

    import torch

    ks = args.ks or default_ks(args.measure)
    opts = dict(ks=ks, map_ks=args.map_ks, chunk_size=args.chunk_size, all_metrics=args.all_metrics,
                p_ks=args.p_ks)
    to = (lambda a: a) if device.type == "cpu" else (lambda a: torch.as_tensor(a).to(device))

    def one(d, c, lab, curves=False):
        if "scores" in d:
            return evaluate_scores(d["scores"], c, lab, d["scores_t2i"], curves=curves, **opts)
        return evaluate(to(d["image"]), to(d["text"]), to(c), None if lab is None else to(lab),
                        measure=args.measure, curves=curves, **opts)

    want_curves = args.all_metrics and labels is not None
    results = one(data, cap, labels, curves=want_curves)
    results, curves = results if want_curves else (results, {})
    if args.folds:
        def fold(images, captions, local, lab):
            if "scores" in data:
                s, t = data["scores"], data["scores_t2i"]
                part = {"scores": np.asarray(s[images])[:, captions],
                        "scores_t2i": None if t is None else np.asarray(t[captions])[:, images]}
            else:
                part = {"image": data["image"][images], "text": data["text"][captions]}
            return one(part, local, lab)

        num_images = (data["scores"] if "scores" in data else data["image"]).shape[0]
        results.update(evaluate_folds(fold, num_images, cap, labels, args.folds))
    return results, curves


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from pipeline.evaluation.table import format_tables

    try:
        data, cap, labels = _inputs(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ks = args.ks or default_ks(args.measure)
    device = torch.device(args.device)
    start = time.perf_counter()
    try:
        results, curves = _run(args, data, cap, labels, device)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    shape = (data["scores"].shape if "scores" in data else (data["image"].shape[0], data["text"].shape[0]))
    kind = "scores" if "scores" in data else args.measure
    print(format_tables(results, args.title or f"{kind}: {shape[0]} images x {shape[1]} captions"))
    print(f"\n({seconds:.2f} s on {device})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"image": _name(args.image), "text": _name(args.text), "caption_image": str(args.caption_image),
                "labels": _name(args.labels), "measure": args.measure, "num_images": int(shape[0]),
                "num_captions": int(shape[1]), "ks": list(ks), "map_ks": ["N" if k is None else k for k in args.map_ks],
                "seconds": seconds}
        if args.scores is not None:  # features keep today's record; the new inputs say what they were
            meta.update(image=None, text=None, measure=None, scores=str(args.scores), scores_t2i=_name(args.scores_t2i))
        if args.all_metrics:
            meta.update(all=True, p_ks=list(args.p_ks))
        if args.folds:
            meta["folds"] = args.folds
        args.out.write_text(json.dumps({"results": results, "inputs": meta}, indent=2) + "\n")
    if curves and (args.out or args.curves):
        path = args.curves or args.out.with_name("test_curves.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(curves, indent=1) + "\n")
    return 0


def _name(path) -> str | None:
    return None if path is None else str(path)


if __name__ == "__main__":
    sys.exit(main())
