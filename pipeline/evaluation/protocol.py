"""FiCo-ITR retrieval metrics (docs/protocol.md), exact, chunked, on CPU or GPU.

``evaluate`` returns the numbers of the reference package ``fico_itr`` on
tie-free scores, much faster and in a small, bounded amount of memory.
``metric.RetrievalMetrics`` wraps it as a torchmetrics metric for validation under DDP.

Tie rule (everywhere): gallery items are ordered by score descending, equal
scores by gallery index ascending (see ``scores``).

Algorithm (per block of query rows; never the N x M matrix, never N x M x bits)
------------------------------------------------------------------------------
* Scores: one matmul per block of ``chunk_size`` score elements.
* R@K, MedianR, MeanR need only each query's rank: the number of gallery items
  ordered before its best positive ``(s+, i+)`` (for image to text the best of
  the image's captions, however many): ``#(s > s+) + #(s == s+, index < i+)``.
  Without labels that is a count (no sort). With labels the rows are sorted
  anyway, and the rank is a binary search of the best positive's key.
* mAP@k (k = 10, 100, N, ...): each row is sorted once by unique keys that pack
  the order-preserving integer image of the score above ``2 * index +
  relevant``. Ascending key order is exactly the tie rule, and the relevance of
  every sorted position is the key's lowest bit, so no gather follows the sort.
  AP@k = mean over the hits within the top k of ``hits so far / position``
  (0 when none): fico_itr's definition. The short prefixes (10, 100) use a
  cumulative sum; the whole gallery only the hit positions ``p_j`` (one
  ``flatnonzero``): AP@N = mean_j ``(j + 1) / (p_j + 1)``. float32 scores use
  int64 keys; hamming scores
  (``-distance``, 0..bits) use int32 keys ``distance << b | 2 * index +
  relevant`` (half the bytes: sorting is the dominant cost); float64 scores
  cannot share 64 bits with the index and use a stable argsort instead.
* CPU: numpy does the per-element work (its AVX-512 sort is 3-8x faster than
  ``torch.sort`` here, and its single-threaded ops do not stall the way torch's
  OpenMP ops do when another process holds a core), on sub-blocks of ~2**17
  elements that stay in L2 cache, with reused buffers, optionally on a small
  thread pool (numpy releases the GIL). Other devices: the same keys in torch.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import numpy as np
import torch

from pipeline.evaluation.ranking import Direction, Relevance, effective_k
from pipeline.evaluation.scores import as_tensor, default_chunk_size, prepare, score_dtype

__all__ = ["evaluate", "metric_names"]

_RSUM_KS = (1, 5, 10)
_FORCE_TORCH = False  # tests flip this to run the torch (GPU) kernels on CPU


def metric_names(ks: Sequence[int] = (1, 5, 10), map_ks: Sequence[int | None] = (10, 100, None),
                 with_map: bool = True) -> list[str]:
    """The keys of :func:`evaluate`'s result, in the protocol's order."""
    names = []
    for d in ("i2t", "t2i"):
        names += [f"{d}_R@{k}" for k in ks] + [f"{d}_MedianR", f"{d}_MeanR"]
    names.append("rsum")
    if with_map:
        for d in ("i2t", "t2i"):
            names += [f"{d}_mAP@{'N' if k is None else int(k)}" for k in map_ks]
    return names


@torch.no_grad()
def evaluate(image_feats, text_feats, caption_image, image_labels=None, measure: str = "cosine",
             ks: Iterable[int] = (1, 5, 10), map_ks: Iterable[int | None] = (10, 100, None),
             chunk_size: int | None = None, num_threads: int | None = None) -> dict[str, float]:
    """FiCo-ITR instance- and category-level retrieval metrics.

    Args:
        image_feats: ``[N, D]`` embeddings; for ``hamming``, codes (``uint8`` =
            packed bytes; bool, 0/1 or ±1 codes are packed first).
        text_feats: ``[M, D]``, the same kind.
        caption_image: int ``[M]``: the image index of each caption (any number
            of captions per image, any order; every image needs at least one).
        image_labels: optional ``[N, C]`` multi-hot (or ``[N]`` class ids);
            enables mAP (relevant = shares at least one label).
        measure: ``cosine`` | ``inner_product`` | ``euclidean`` | ``hamming``.
        ks: K of R@K. map_ks: k of mAP@k, None = the whole gallery (``mAP@N``).
        chunk_size: score elements per block (bounds memory); None = default.
        num_threads: CPU worker threads for the ranking work (default: torch's
            intra-op thread count, at most 4). Ignored on GPU.

    Tensors or numpy arrays; runs on ``image_feats``' device. Returns Python
    floats named as in docs/protocol.md: R@K in percent, mAP as fractions.
    """
    ks, map_ks = tuple(int(k) for k in ks), tuple(map_ks)
    img = as_tensor(image_feats)
    device = img.device
    txt = as_tensor(text_feats, device)
    cap = _check_inputs(img, txt, as_tensor(caption_image, device), measure)
    n, m = img.shape[0], txt.shape[0]
    labels = None if image_labels is None else _labels_matrix(image_labels, n, device)
    with_map = labels is not None and len(map_ks) > 0

    dtype = None if measure == "hamming" else (
        torch.float64 if torch.float64 in (img.dtype, txt.dtype) else torch.float32)
    img_p, txt_p = prepare(img, measure, dtype), prepare(txt, measure, dtype)
    if img_p.shape[1] != txt_p.shape[1]:
        raise ValueError(f"feature sizes differ: {img_p.shape[1]} vs {txt_p.shape[1]}")
    chunk_size = chunk_size or default_chunk_size(device)
    relevance = Relevance(labels, cap) if with_map else None
    on_cpu = device.type == "cpu" and not _FORCE_TORCH
    threads = 1 if not on_cpu else (num_threads or min(4, torch.get_num_threads()))

    # positive (query, gallery) pairs, sorted by query then gallery index
    by_image = torch.sort(cap, stable=True).indices  # caption indices grouped by image
    directions = {
        "i2t": Direction(img_p, txt_p, measure, cap[by_image], by_image, relevance, "i2t"),
        "t2i": Direction(txt_p, img_p, measure, torch.arange(m, device=device), cap, relevance, "t2i"),
    }
    # one score buffer for all blocks of both directions (fresh blocks fragment the heap)
    rows = {name: min(d.nq, max(1, chunk_size // d.n)) for name, d in directions.items()}
    block = torch.empty(max(rows[name] * d.n for name, d in directions.items()),
                        dtype=score_dtype(img_p, txt_p, measure), device=device)
    out, rsum = {}, 0.0
    with ThreadPoolExecutor(threads) if threads > 1 else _NoPool() as pool:
        for prefix, d in directions.items():
            ranks, aps = d.run(rows[prefix], block, on_cpu, pool, map_ks if with_map else ())
            out.update(_summarise(prefix, ranks, aps, ks, map_ks if with_map else (), d.n))
            rsum += sum(100.0 * float(np.count_nonzero(ranks < k)) / ranks.size for k in _RSUM_KS)
    out["rsum"] = rsum
    return {name: out[name] for name in metric_names(ks, map_ks, with_map)}


def _check_inputs(img, txt, cap, measure) -> torch.Tensor:
    """Validate shapes and the caption -> image map; return it as int64."""
    if cap.dtype.is_floating_point or cap.dtype == torch.bool:
        raise TypeError("caption_image must be an integer array")
    cap = cap.to(torch.int64).reshape(-1)
    if img.ndim != 2 or txt.ndim != 2:
        raise ValueError("image_feats and text_feats must be 2-D [items, dim]")
    n, m = img.shape[0], txt.shape[0]
    if n == 0 or m == 0:
        raise ValueError("need at least one image and one caption")
    if cap.numel() != m:
        raise ValueError(f"caption_image needs one entry per caption ({m}), got {cap.numel()}")
    if int(cap.min()) < 0 or int(cap.max()) >= n:
        raise ValueError(f"caption_image values must lie in [0, {n})")
    without = int((torch.bincount(cap, minlength=n) == 0).sum())
    if without:
        raise ValueError(f"{without} image(s) have no caption: their image-to-text rank is undefined")
    if measure != "hamming":
        for name, t in (("image_feats", img), ("text_feats", txt)):
            if t.dtype.is_floating_point and not _all_finite(t):
                raise ValueError(f"{name} contains NaN or inf")
    return cap


def _all_finite(t: torch.Tensor) -> bool:
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        # numpy (no OpenMP stalls on a busy CPU), in row blocks (no N x D temporary)
        x = t.numpy()
        return all(np.isfinite(x[a:a + 4096]).all() for a in range(0, len(x), 4096))
    return bool(torch.isfinite(t).all())


def _labels_matrix(labels, n_images: int, device) -> torch.Tensor:
    """float32 ``[N, C]`` 0/1; a 1-D class vector becomes one-hot (relevant = same class)."""
    lab = as_tensor(labels, device)
    if lab.ndim == 1:
        _, inv = torch.unique(lab, return_inverse=True)
        lab = torch.nn.functional.one_hot(inv, int(inv.max()) + 1)
    if lab.ndim != 2 or lab.shape[0] != n_images:
        raise ValueError(f"image_labels must be [N={n_images}, C] or [N], got {tuple(lab.shape)}")
    return (lab != 0).to(torch.float32)


def _summarise(prefix, ranks: np.ndarray, aps: dict, ks, map_ks, n_gallery: int) -> dict:
    out = {f"{prefix}_R@{k}": 100.0 * float(np.count_nonzero(ranks < k)) / ranks.size for k in ks}
    out[f"{prefix}_MedianR"] = float(np.floor(np.median(ranks)) + 1)  # numpy median, as fico_itr
    out[f"{prefix}_MeanR"] = float(ranks.mean() + 1)
    for k in map_ks:
        out[f"{prefix}_mAP@{'N' if k is None else int(k)}"] = float(aps[effective_k(k, n_gallery)].mean())
    return out


class _NoPool:
    """Stand-in for a thread pool: map in the calling thread."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def map(fn, *iterables):
        return map(fn, *iterables)
