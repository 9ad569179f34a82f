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
  int64 keys; float64 scores cannot share 64 bits with the index and use a
  stable argsort instead. Hamming scores (``-distance``, 0..bits) need no sort
  on CPU: a stable counting order over the bits + 1 distances (counting.py) is
  the tie rule exactly; on other devices int32 keys ``distance << b | 2 *
  index + relevant``.
* CPU: numpy does the per-element work (its AVX-512 sort is 3-8x faster than
  ``torch.sort`` here, and its single-threaded ops do not stall the way torch's
  OpenMP ops do when another process holds a core), on sub-blocks of ~2**17
  elements that stay in L2 cache, with reused buffers, optionally on a small
  thread pool (numpy releases the GIL). Other devices: the same keys in torch.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from pipeline.evaluation.extended import DEFAULT_P_KS, ExtraOptions, ExtraStats
from pipeline.evaluation.ranking import Direction, Relevance, effective_k
from pipeline.evaluation.scores import as_tensor, default_chunk_size, prepare, score_dtype, score_prepared

__all__ = ["evaluate", "evaluate_blocks", "metric_names"]

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
             chunk_size: int | None = None, num_threads: int | None = None, all_metrics: bool = False,
             p_ks: Iterable[int] = DEFAULT_P_KS, curves: bool = False):
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
        all_metrics: also every other published convention (docs/protocol.md,
            "Other conventions": ``mAP@k[ucch]``, ``mAP@k[dadh]``, ``P@K`` for K in
            ``p_ks``, and for hamming ``[ties]``, ``P@H2``, ``R@H2``), after today's names.
        curves: return ``(results, curves)``: P@K over K, PR11 and (hamming) the radius
            PR per direction (needs labels; implies nothing about ``all_metrics``).

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
    dtype = None if measure == "hamming" else (
        torch.float64 if torch.float64 in (img.dtype, txt.dtype) else torch.float32)
    img_p, txt_p = prepare(img, measure, dtype), prepare(txt, measure, dtype)
    if img_p.shape[1] != txt_p.shape[1]:
        raise ValueError(f"feature sizes differ: {img_p.shape[1]} vs {txt_p.shape[1]}")
    chunk_size = chunk_size or default_chunk_size(device)
    # one score buffer for all blocks of both directions (fresh blocks fragment the heap)
    buffer = torch.empty(max(_rows(n, m, chunk_size) * m, _rows(m, n, chunk_size) * n),
                         dtype=score_dtype(img_p, txt_p, measure), device=device)
    scorers = {"i2t": feature_blocks(img_p, txt_p, measure, buffer), "t2i": feature_blocks(txt_p, img_p, measure, buffer)}
    bits = 8 * img_p.shape[1] if measure == "hamming" else None  # packed bytes
    extra = ExtraOptions(map_ks, ks, tuple(int(k) for k in p_ks), curves, all_metrics) if all_metrics or curves else None
    results, curve = _rank_and_summarise(scorers, n, m, cap, labels, bits, ks, map_ks, chunk_size, device,
                                         num_threads, extra, all_metrics)
    return (results, curve) if curves else results


@torch.no_grad()
def evaluate_blocks(score_i2t: Callable[[int, int], torch.Tensor], score_t2i: Callable[[int, int], torch.Tensor],
                    num_images: int, caption_image, image_labels=None, ks: Iterable[int] = (1, 5, 10),
                    map_ks: Iterable[int | None] = (10, 100, None), chunk_size: int | None = None,
                    num_threads: int | None = None, device="cpu", all_metrics: bool = False,
                    p_ks: Iterable[int] = DEFAULT_P_KS, curves: bool = False):
    """The protocol on scores supplied block by block, from any scorer (a token-level model, a
    two-stage ranking): the same ranks, tie rule and metrics as :func:`evaluate`.

    ``score_i2t(a, b)`` returns the scores ``[b - a, M]`` of images ``a:b`` against every caption,
    ``score_t2i(a, b)`` those ``[b - a, N]`` of captions ``a:b`` against every image, as floating
    tensors on ``device`` (float64 takes a slower exact path). Blocks hold about ``chunk_size``
    scores. The other arguments are :func:`evaluate`'s (the hamming-only names never come from scores).
    """
    ks, map_ks = tuple(int(k) for k in ks), tuple(map_ks)
    device = torch.device(device)
    cap = as_tensor(caption_image, device)
    n = int(num_images)
    cap = _check_caption_map(cap, n, cap.numel())
    labels = None if image_labels is None else _labels_matrix(image_labels, n, device)
    m = cap.numel()
    scorers = {"i2t": _checked(score_i2t, m, "score_i2t"), "t2i": _checked(score_t2i, n, "score_t2i")}
    extra = ExtraOptions(map_ks, ks, tuple(int(k) for k in p_ks), curves, all_metrics) if all_metrics or curves else None
    results, curve = _rank_and_summarise(scorers, n, m, cap, labels, None, ks, map_ks,
                                         chunk_size or default_chunk_size(device), device, num_threads, extra,
                                         all_metrics)
    return (results, curve) if curves else results


def feature_blocks(q: torch.Tensor, g: torch.Tensor, measure: str, buffer: torch.Tensor | None = None):
    """``score(a, b)``: scores of prepared queries ``a:b`` against the prepared gallery, written into
    ``buffer`` (reused by every block) when given."""
    def score(a: int, b: int) -> torch.Tensor:
        out = None if buffer is None else buffer[: (b - a) * g.shape[0]].view(b - a, g.shape[0])
        return score_prepared(q[a:b], g, measure, out=out)

    return score


def _checked(score: Callable, n_gallery: int, name: str):
    def checked(a: int, b: int) -> torch.Tensor:
        s = score(a, b)
        if tuple(s.shape) != (b - a, n_gallery) or not s.is_floating_point():
            raise ValueError(f"{name}({a}, {b}) must return floating scores of shape {(b - a, n_gallery)}, "
                             f"got {s.dtype} {tuple(s.shape)}")
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"{name}({a}, {b}) returned NaN or inf scores")
        return s.contiguous()

    return checked


def _rows(nq: int, n: int, chunk_size: int) -> int:
    return min(nq, max(1, chunk_size // n))


def _rank_and_summarise(scorers: dict, n: int, m: int, cap, labels, bits, ks, map_ks, chunk_size: int, device,
                        num_threads, extra: ExtraOptions | None = None, all_metrics: bool = False):
    """(today's names, then the `--all` names when asked; {direction: curves} when ``extra``)."""
    with_map = labels is not None and len(map_ks) > 0
    with_labels = labels is not None
    relevance = Relevance(labels, cap) if with_labels else None
    on_cpu = device.type == "cpu" and not _FORCE_TORCH
    threads = 1 if not on_cpu else (num_threads or min(4, torch.get_num_threads()))
    # positive (query, gallery) pairs, sorted by query then gallery index
    by_image = torch.sort(cap, stable=True).indices  # caption indices grouped by image
    directions = {
        "i2t": Direction(scorers["i2t"], n, m, bits, cap[by_image], by_image, relevance, "i2t"),
        "t2i": Direction(scorers["t2i"], m, n, bits, torch.arange(m, device=device), cap, relevance, "t2i"),
    }
    out, rsum, more, curves = {}, 0.0, {}, {}
    with ThreadPoolExecutor(threads) if threads > 1 else _NoPool() as pool:
        for prefix, d in directions.items():
            stats = None if extra is None else ExtraStats(d.n, bits, with_labels, extra)
            run_ks = tuple(map_ks if with_map else ()) + tuple(stats.ap_ks() if stats else ())
            if stats is not None and with_labels and not run_ks:
                run_ks = (None,)  # the ranked relevance is made only where an AP is asked for
            ranks, aps = d.run(_rows(d.nq, d.n, chunk_size), on_cpu, pool, run_ks, stats)
            out.update(_summarise(prefix, ranks, aps, ks, map_ks if with_map else (), d.n))
            rsum += sum(100.0 * float(np.count_nonzero(ranks < k)) / ranks.size for k in _RSUM_KS)
            if stats is not None:
                more.update(stats.names(prefix, aps) if all_metrics else {})
                curves[prefix] = stats.curves(d.nq)
    out["rsum"] = rsum
    results = {name: out[name] for name in metric_names(ks, map_ks, with_map)}
    results.update(more)
    return results, curves


def _check_inputs(img, txt, cap, measure) -> torch.Tensor:
    """Validate shapes and the caption -> image map; return it as int64."""
    if img.ndim != 2 or txt.ndim != 2:
        raise ValueError("image_feats and text_feats must be 2-D [items, dim]")
    n, m = img.shape[0], txt.shape[0]
    if n == 0 or m == 0:
        raise ValueError("need at least one image and one caption")
    cap = _check_caption_map(cap, n, m)
    if measure != "hamming":
        for name, t in (("image_feats", img), ("text_feats", txt)):
            if t.dtype.is_floating_point and not _all_finite(t):
                raise ValueError(f"{name} contains NaN or inf")
    return cap


def _check_caption_map(cap, n: int, m: int) -> torch.Tensor:
    if cap.dtype.is_floating_point or cap.dtype == torch.bool:
        raise TypeError("caption_image must be an integer array")
    cap = cap.to(torch.int64).reshape(-1)
    if n <= 0 or m == 0:
        raise ValueError("need at least one image and one caption")
    if cap.numel() != m:
        raise ValueError(f"caption_image needs one entry per caption ({m}), got {cap.numel()}")
    if int(cap.min()) < 0 or int(cap.max()) >= n:
        raise ValueError(f"caption_image values must lie in [0, {n})")
    without = int((torch.bincount(cap, minlength=n) == 0).sum())
    if without:
        raise ValueError(f"{without} image(s) have no caption: their image-to-text rank is undefined")
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
