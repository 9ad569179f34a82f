"""COCO 1K five-fold (docs/protocol.md, "Folds"): the split cut into ``folds`` equal contiguous folds of
images, each with its own captions in test order, every scalar the mean over the folds.

Fold f holds images ``f * size .. (f + 1) * size - 1`` and the captions of those images, in the order
they come in the split. Names: ``1k/<name>`` when a fold holds 1,000 images (COCO's 5K test split in
five), else ``fold<size>/<name>``. MedianR and MeanR are means too (so they may be fractional), and
``rsum`` is the sum of the six fold-mean recalls, which equals the mean of the folds' rsums.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["fold_prefix", "fold_slices", "evaluate_folds"]


def fold_prefix(images_per_fold: int) -> str:
    return "1k" if images_per_fold == 1000 else f"fold{images_per_fold}"


def fold_slices(num_images: int, caption_image, folds: int):
    """Per fold: ``(image slice, caption indices in test order, their image index within the fold)``."""
    if folds < 1 or num_images % folds:
        raise ValueError(f"--folds {folds} must divide the number of images ({num_images}) into equal folds")
    cap = np.asarray(caption_image).reshape(-1).astype(np.int64)
    size = num_images // folds
    out = []
    for f in range(folds):
        lo = f * size
        captions = np.flatnonzero((cap >= lo) & (cap < lo + size))
        out.append((slice(lo, lo + size), captions, cap[captions] - lo))
    return out


def evaluate_folds(run: Callable, num_images: int, caption_image, image_labels, folds: int) -> dict[str, float]:
    """``{prefix/name: mean over folds}``; ``run(image_slice, caption_indices, caption_image_local,
    labels_local)`` evaluates one fold and returns its dict (the same names for every fold)."""
    results = []
    for images, captions, local in fold_slices(num_images, caption_image, folds):
        labels = None if image_labels is None else np.asarray(image_labels)[images]
        results.append(run(images, captions, local, labels))
    prefix = fold_prefix(num_images // folds)
    names = [k for k in results[0] if all(k in r for r in results)]  # a K beyond one fold's gallery: dropped
    return {f"{prefix}/{k}": float(np.mean([r[k] for r in results])) for k in names}
