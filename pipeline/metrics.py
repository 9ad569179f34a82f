"""FiCo-ITR retrieval metrics (PROTOCOL.md), exact, chunked, on CPU or GPU.

``evaluate`` returns the numbers of the reference package ``fico_itr`` on
tie-free scores, much faster and in a small, bounded amount of memory.
``RetrievalMetrics`` wraps it as a torchmetrics metric for validation under DDP.

Tie rule (everywhere): gallery items are ordered by score descending, equal
scores by gallery index ascending (see ``pipeline.retrieval``).

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

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import numpy as np
import torch
from torchmetrics import Metric

from pipeline.retrieval import (
    as_tensor,
    canonical_zero,
    default_chunk_size,
    float_bits_key,
    order_key32,
    pack_codes,
    pack_keys,
    prepare,
    score_dtype,
    score_prepared,
)

__all__ = ["evaluate", "RetrievalMetrics", "metric_names"]

_RSUM_KS = (1, 5, 10)
_SUB_BLOCK = 1 << 17  # elements per CPU sub-block: keys + scratch fit in L2
_REL_CACHE = 1 << 26  # cache image x image relevance (bool) up to this many entries
_FORCE_TORCH = False  # tests flip this to run the torch (GPU) kernels on CPU


def metric_names(ks: Sequence[int] = (1, 5, 10), map_ks: Sequence[int | None] = (10, 100, None),
                 with_map: bool = True) -> list[str]:
    """The keys of :func:`evaluate`'s result, in PROTOCOL.md's order."""
    names = []
    for d in ("i2t", "t2i"):
        names += [f"{d}_R@{k}" for k in ks] + [f"{d}_MedianR", f"{d}_MeanR"]
    names.append("rsum")
    if with_map:
        for d in ("i2t", "t2i"):
            names += [f"{d}_mAP@{'N' if k is None else int(k)}" for k in map_ks]
    return names


# --------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------
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
    floats named as in PROTOCOL.md: R@K in percent, mAP as fractions.
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
    relevance = _Relevance(labels, cap) if with_map else None
    on_cpu = device.type == "cpu" and not _FORCE_TORCH
    threads = 1 if not on_cpu else (num_threads or min(4, torch.get_num_threads()))

    # positive (query, gallery) pairs, sorted by query then gallery index
    by_image = torch.sort(cap, stable=True).indices  # caption indices grouped by image
    directions = {
        "i2t": _Direction(img_p, txt_p, measure, cap[by_image], by_image, relevance, "i2t"),
        "t2i": _Direction(txt_p, img_p, measure, torch.arange(m, device=device), cap, relevance, "t2i"),
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
        out[f"{prefix}_mAP@{'N' if k is None else int(k)}"] = float(aps[_effective_k(k, n_gallery)].mean())
    return out


def _effective_k(k, n: int) -> int:
    return n if k is None or k <= 0 or k >= n else int(k)  # 0 = whole gallery, as fico_itr


class _NoPool:
    """Stand-in for a thread pool: map in the calling thread."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def map(fn, *iterables):
        return map(fn, *iterables)


# --------------------------------------------------------------------------
# relevance: image-level label overlap, expanded to captions by caption_image
# --------------------------------------------------------------------------
class _Relevance:
    """Rows of the query x gallery "shares a label" matrix, for either direction.

    Caption relevance is its image's, so only image x image overlaps are
    computed (a small matmul), cached whole when N x N is small (COCO 5K: 25 MB).
    """

    def __init__(self, labels: torch.Tensor, caption_image: torch.Tensor):
        self.labels, self.cap = labels, caption_image
        n = labels.shape[0]
        self.cache = None
        if n * n <= _REL_CACHE:  # in row blocks, one scratch: float products are 4x the bools
            self.cache = torch.empty(n, n, dtype=torch.bool, device=labels.device)
            rows = 64
            scratch = torch.empty(min(rows, n), n, device=labels.device)
            for a in range(0, n, rows):
                b = min(a + rows, n)
                products = torch.mm(labels[a:b], labels.T, out=scratch[: b - a])
                if labels.device.type == "cpu":  # numpy: no OpenMP stalls
                    np.greater(products.numpy(), 0, out=self.cache[a:b].numpy())
                else:
                    torch.gt(products, 0, out=self.cache[a:b])
        if labels.device.type == "cpu":
            self.cap_np = caption_image.numpy()
            self.cache_np = None if self.cache is None else self.cache.numpy()

    def image_rows(self, images: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[images]
        return self.labels[images] @ self.labels.T > 0

    def rows(self, direction: str, a: int, b: int):
        """bool ``[b - a, n_gallery]`` for queries ``a:b`` (torch)."""
        if direction == "i2t":
            return self.image_rows(torch.arange(a, b, device=self.cap.device))[:, self.cap]
        return self.image_rows(self.cap[a:b])

    def rows_np(self, direction: str, a: int, b: int, out: np.ndarray) -> np.ndarray:
        """numpy version of :meth:`rows`, written into ``out``."""
        if self.cache_np is None:
            out[...] = self.rows(direction, a, b).numpy()
        elif direction == "i2t":
            np.take(self.cache_np[a:b], self.cap_np, axis=1, out=out)
        else:
            np.take(self.cache_np, self.cap_np[a:b], axis=0, out=out)
        return out


# --------------------------------------------------------------------------
# one retrieval direction
# --------------------------------------------------------------------------
class _Direction:
    """Ranks and per-query APs for one direction (queries ``q`` vs gallery ``g``).

    ``pos_q, pos_g``: positive (query, gallery) pairs sorted by query, then
    gallery index; every query has at least one.
    """

    def __init__(self, q, g, measure, pos_q, pos_g, relevance, name):
        self.q, self.g, self.measure, self.name = q, g, measure, name
        self.nq, self.n = q.shape[0], g.shape[0]
        self.starts = torch.zeros(self.nq + 1, dtype=torch.int64, device=q.device)
        self.starts[1:] = torch.cumsum(torch.bincount(pos_q, minlength=self.nq), 0)
        self.pos_q, self.pos_g = pos_q, pos_g
        self.relevance = relevance
        self.bits = 8 * g.shape[1] if measure == "hamming" else None  # packed bytes
        self.local = threading.local()  # per-thread numpy buffers

    def run(self, rows: int, block: torch.Tensor, on_cpu: bool, pool, map_ks):
        """Score ``rows`` queries at a time into ``block``; return ranks and {k: AP@k}."""
        ks = sorted({_effective_k(k, self.n) for k in map_ks})
        ranks, aps = [], {k: [] for k in ks}
        for a in range(0, self.nq, rows):
            b = min(a + rows, self.nq)
            s = score_prepared(self.q[a:b], self.g, self.measure, out=block[: (b - a) * self.n].view(b - a, self.n))
            best, best_idx = _best_positive(s, self.pos_q, self.pos_g, self.starts, a, b)
            if on_cpu:
                r, ap = self._block_numpy(s.numpy(), best.numpy(), best_idx.numpy(), a, ks, pool)
            else:
                if s.is_floating_point():
                    canonical_zero(s)  # -0.0 and +0.0 must share a key
                r, ap = self._block_torch(s, best, best_idx, a, ks)
            ranks.append(r)
            for k in ks:
                aps[k].append(ap[k])
        return _concat_np(ranks), {k: _concat_np(v) for k, v in aps.items()}

    # ---- CPU: numpy on L2-sized sub-blocks -------------------------------------------
    def _block_numpy(self, s, best, best_idx, a, ks, pool):
        sub = max(1, _SUB_BLOCK // self.n)
        starts = range(0, s.shape[0], sub)
        parts = list(pool.map(lambda i: self._sub_numpy(s[i:i + sub], best[i:i + sub],
                                                        best_idx[i:i + sub], a + i, ks), starts))
        ranks = np.concatenate([p[0] for p in parts])
        return ranks, {k: np.concatenate([p[1][k] for p in parts]) for k in ks}

    def _buf(self, name, shape, dtype) -> np.ndarray:
        """A reusable per-thread buffer (fresh large arrays cost page faults)."""
        size = int(np.prod(shape))
        buf = getattr(self.local, name, None)
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = np.empty(size, dtype)
            setattr(self.local, name, buf)
        return buf[:size].reshape(shape)

    def _sub_numpy(self, s, best, best_idx, a, ks):
        r, n = s.shape
        if not ks:
            return _rank_by_count_np(s, best, best_idx), {}
        rel = self.relevance.rows_np(self.name, a, a + r, self._buf("rel", (r, n), np.bool_))
        rel_sorted = self._buf("rel_sorted", (r, n), np.uint8)
        if s.dtype == np.float64:  # no room for the index in the key: stable argsort
            order = np.argsort(-s, axis=1, kind="stable")
            rel_sorted[...] = np.take_along_axis(rel.view(np.uint8), order, axis=1)
            return _rank_by_count_np(s, best, best_idx), _ap_np(rel_sorted, ks)
        if self.bits is not None and self.bits << _index_bits(n) < 2**31:
            keys, best_key = self._keys_hamming_np(s, best, best_idx, rel)
        else:
            keys, best_key = self._keys64_np(canonical_zero(s), best, best_idx, rel)
        keys.sort(axis=1)
        ranks = np.fromiter((np.searchsorted(keys[i], best_key[i]) for i in range(r)), np.int64, r)
        # relevance = bit 0 of each key = bit 0 of its first byte (little-endian)
        np.bitwise_and(keys.view(np.uint8)[:, :: keys.itemsize], 1, out=rel_sorted)
        return ranks, _ap_np(rel_sorted, ks)

    def _keys64_np(self, s, best, best_idx, rel):
        """``order_key32(score) << 32 | 2 * index + relevant`` written into one buffer."""
        r, n = s.shape
        keys = self._buf("keys64", (r, n), np.int64)
        halves = keys.view(np.int32)  # [..., 0::2] low, [..., 1::2] high halves
        # score keys in a contiguous buffer first: strided int32 passes are slow
        halves[:, 1::2] = float_bits_key(s.view(np.int32), self._buf("hi", (r, n), np.int32))
        np.add(_even(n), rel, out=halves[:, 0::2])
        best_key = pack_keys(order_key32(best.astype(np.float32)), 2 * best_idx.astype(np.int32))
        return keys, best_key

    def _keys_hamming_np(self, s, best, best_idx, rel):
        """int32 ``(distance - 1) << b | 2 * index + relevant``; scores are ``-distance``."""
        r, n = s.shape
        shift = _index_bits(n)
        keys = np.invert(s, out=self._buf("keys32", (r, n), np.int32))  # ~(-d) = d - 1
        keys <<= shift
        keys |= _even(n)
        keys |= rel
        best_key = (~best << shift) | (2 * best_idx).astype(np.int32)
        return keys, best_key

    # ---- other devices: the same keys in torch -----------------------------------------
    def _block_torch(self, s, best, best_idx, a, ks):
        if not ks:
            return _rank_by_count_torch(s, best, best_idx), {}
        r, n = s.shape
        rel = self.relevance.rows(self.name, a, a + r)
        idx2 = torch.arange(0, 2 * n, 2, device=s.device)
        if s.dtype == torch.float64:
            order = torch.sort(s, dim=1, descending=True, stable=True).indices
            hits = rel.gather(1, order).to(torch.int32)
            return _rank_by_count_torch(s, best, best_idx), _ap_torch(hits, ks)
        if self.bits is not None and self.bits << _index_bits(n) < 2**31:
            shift = _index_bits(n)
            keys = ((~s) << shift) | idx2.to(torch.int32) | rel
            best_key = (~best << shift) | (2 * best_idx).to(torch.int32)
        else:
            keys = pack_keys(order_key32(s), idx2 + rel)
            best_key = pack_keys(order_key32(best), 2 * best_idx)
        keys = torch.sort(keys, dim=1).values
        ranks = torch.searchsorted(keys, best_key[:, None]).squeeze(1)
        return ranks, _ap_torch((keys & 1).to(torch.int32), ks)


def _concat_np(parts) -> np.ndarray:
    """Per-block results (numpy, or device tensors: one copy to the host) as one array."""
    return np.concatenate([p.cpu().numpy() if isinstance(p, torch.Tensor) else p for p in parts])


def _index_bits(n: int) -> int:
    """Bits of the ``2 * index + relevant`` payload for a gallery of ``n``."""
    return int(n - 1).bit_length() + 1


_EVEN_CACHE: dict[int, np.ndarray] = {}


def _even(n: int) -> np.ndarray:
    """``2 * arange(n)`` as int32, cached."""
    if n not in _EVEN_CACHE:
        _EVEN_CACHE[n] = np.arange(0, 2 * n, 2, dtype=np.int32)
    return _EVEN_CACHE[n]


def _best_positive(s: torch.Tensor, pos_q, pos_g, starts, a: int, b: int):
    """Per query of ``a:b``: (score, gallery index) of its best positive under the tie rule."""
    p0, p1 = int(starts[a]), int(starts[b])
    ql, gl = pos_q[p0:p1] - a, pos_g[p0:p1]
    vals = s[ql, gl]
    best = vals.new_empty(b - a).scatter_reduce_(0, ql, vals, "amax", include_self=False)
    # among the positives with the best score, the smallest gallery index
    cand = torch.where(vals == best[ql], gl, torch.iinfo(torch.int64).max)
    idx = gl.new_empty(b - a).scatter_reduce_(0, ql, cand, "amin", include_self=False)
    return best, idx


def _rank_by_count_np(s, best, best_idx) -> np.ndarray:
    """#items before the best positive: better score, or equal score at a smaller index."""
    bv = best[:, None]
    ranks = np.count_nonzero(s > bv, axis=1).astype(np.int64)
    tied = np.flatnonzero(np.count_nonzero(s == bv, axis=1) > 1)  # rare for float scores
    if tied.size:
        before = np.arange(s.shape[1]) < best_idx[tied, None]
        ranks[tied] += np.count_nonzero((s[tied] == bv[tied]) & before, axis=1)
    return ranks


def _rank_by_count_torch(s, best, best_idx) -> torch.Tensor:
    bv = best[:, None]
    before = torch.arange(s.shape[1], device=s.device)[None, :] < best_idx[:, None]
    return (s > bv).sum(1) + ((s == bv) & before).sum(1)


def _ap_np(rel_sorted: np.ndarray, ks) -> dict:
    """{k: AP@k per row} from 0/1 ``uint8`` relevance in ranked order.

    AP@k = mean over the hits within the top k of (hits so far) / position.
    The whole-gallery AP touches only the hits: with hits at positions
    p_0 < p_1 < ... of a row, AP = mean_j (j + 1) / (p_j + 1). (numpy's
    flatnonzero is ~3x cheaper than a row-wise cumsum here.)
    """
    r, n = rel_sorted.shape
    out = {}
    small = [k for k in ks if k < n]
    if small:  # short prefixes: cumulative sums are cheap
        head = rel_sorted[:, : max(small)]
        hits = np.cumsum(head, axis=1, dtype=np.int64)
        prec = np.cumsum(np.where(head != 0, hits * _inverse_positions(head.shape[1]), 0.0), axis=1)
        for k in small:
            found = hits[:, k - 1]
            out[k] = np.where(found > 0, prec[:, k - 1] / np.maximum(found, 1), 0.0)
    if n in ks:
        hit = rel_sorted.view(np.bool_)  # numpy's nonzero is fastest on bool
        counts = np.count_nonzero(hit, axis=1)
        flat = np.flatnonzero(hit)  # row-major: rows in order, positions ascending
        first = np.cumsum(counts) - counts  # index in `flat` of each row's first hit
        ordinal = np.arange(1, flat.size + 1) - np.repeat(first, counts)  # j + 1
        position = flat + 1 - np.repeat(np.arange(r) * n, counts)  # p_j + 1
        sums = np.zeros(r)
        nonempty = counts > 0
        if flat.size:
            sums[nonempty] = np.add.reduceat(ordinal / position, first[nonempty])
        out[n] = np.where(nonempty, sums / np.maximum(counts, 1), 0.0)
    return out


def _ap_torch(rel_sorted: torch.Tensor, ks) -> dict:
    hits = torch.cumsum(rel_sorted, dim=1, dtype=torch.int64)
    found = {k: hits[:, k - 1] for k in ks}
    prec = torch.where(rel_sorted.bool(), hits.double() / torch.arange(
        1, rel_sorted.shape[1] + 1, device=hits.device, dtype=torch.float64), 0.0)
    out = {}
    for k in ks:
        total = prec[:, :k].sum(1)
        out[k] = torch.where(found[k] > 0, total / found[k].clamp_min(1), 0.0)
    return out


_INV_CACHE: dict[int, np.ndarray] = {}


def _inverse_positions(n: int) -> np.ndarray:
    """``1 / (1..n)`` in float64, cached."""
    if n not in _INV_CACHE:
        _INV_CACHE[n] = 1.0 / np.arange(1, n + 1, dtype=np.float64)
    return _INV_CACHE[n]


# --------------------------------------------------------------------------
# torchmetrics wrapper
# --------------------------------------------------------------------------
class RetrievalMetrics(Metric):
    """Accumulates embeddings (or packed codes) with ids; ``compute`` = :func:`evaluate`.

    ``update(image_feats, image_ids, image_labels, text_feats, text_ids,
    text_image_ids)``: int64 ids; image ids unique per image, text ids unique
    per caption, ``text_image_ids`` the image id of each caption. Either side
    may be empty (None or zero rows) in a call. States stay on the metric's
    device and are concatenated across ranks (``dist_reduce_fx="cat"``).

    ``compute`` keeps the first copy of each id (DistributedSampler pads by
    repeating samples: a record seen twice counts once), orders images and
    captions by id, so the result does not depend on which rank saw what or in
    which order, maps captions to images by id (a caption whose image was never
    seen raises ``ValueError``), and returns :func:`evaluate`'s dict.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    _STATES = ("image_feats", "image_ids", "image_labels", "text_feats", "text_ids", "text_image_ids")
    _DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8,
               torch.int16, torch.int32, torch.int64)

    def __init__(self, measure: str = "cosine", ks: Sequence[int] = (1, 5, 10),
                 map_ks: Sequence[int | None] = (10, 100, None), chunk_size: int | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.measure, self.ks, self.map_ks, self.chunk_size = measure, tuple(ks), tuple(map_ks), chunk_size
        for name in self._STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, image_feats=None, image_ids=None, image_labels=None,
               text_feats=None, text_ids=None, text_image_ids=None) -> None:
        if image_feats is not None and len(image_feats):
            feats = self._stored_feats(image_feats)
            ids = as_tensor(image_ids, self.device).to(torch.int64).reshape(-1)
            if feats.shape[0] != ids.shape[0]:
                raise ValueError("image_feats and image_ids differ in length")
            self.image_feats.append(feats)
            self.image_ids.append(ids)
            if image_labels is not None:  # bool does not travel over gloo: uint8
                lab = as_tensor(image_labels, self.device).reshape(len(ids), -1)
                self.image_labels.append((lab != 0).to(torch.uint8))
        if text_feats is not None and len(text_feats):
            feats = self._stored_feats(text_feats)
            tids = as_tensor(text_ids, self.device).to(torch.int64).reshape(-1)
            timg = as_tensor(text_image_ids, self.device).to(torch.int64).reshape(-1)
            if not feats.shape[0] == tids.shape[0] == timg.shape[0]:
                raise ValueError("text_feats, text_ids and text_image_ids differ in length")
            self.text_feats.append(feats)
            self.text_ids.append(tids)
            self.text_image_ids.append(timg)

    def _stored_feats(self, feats) -> torch.Tensor:
        """Hash codes are kept packed (32x smaller than floats, and gloo-friendly)."""
        feats = as_tensor(feats, self.device).detach()
        if self.measure == "hamming" and feats.dtype != torch.uint8:
            feats = pack_codes(feats)
        return feats

    def _sync_dist(self, dist_sync_fn=None, process_group=None) -> None:
        self._add_missing_states(process_group)
        kwargs = {} if dist_sync_fn is None else {"dist_sync_fn": dist_sync_fn}
        super()._sync_dist(process_group=process_group, **kwargs)

    def _add_missing_states(self, process_group) -> None:
        """Give a rank that saw no data empty tensors of the right dtype and width.

        torchmetrics pads a missing list state with a 1-D float32 tensor, which
        cannot be gathered together with other ranks' 2-D uint8 codes or int64 ids.
        """
        import torch.distributed as dist

        meta = torch.full((len(self._STATES), 3), -1, dtype=torch.int64, device=self.device)
        for i, name in enumerate(self._STATES):
            t = _first_tensor(getattr(self, name))
            if t is not None:
                meta[i, 0], meta[i, 1] = t.ndim, t.shape[1] if t.ndim > 1 else 0
                meta[i, 2] = self._DTYPES.index(t.dtype)
        dist.all_reduce(meta, op=dist.ReduceOp.MAX, group=process_group)
        for i, name in enumerate(self._STATES):
            state = getattr(self, name)
            ndim, width, code = (int(v) for v in meta[i])
            if code >= 0 and isinstance(state, list) and not state:
                shape = (0, width) if ndim > 1 else (0,)
                state.append(torch.empty(shape, dtype=self._DTYPES[code], device=self.device))

    def compute(self) -> dict[str, float]:
        img_ids, txt_ids = _cat(self.image_ids), _cat(self.text_ids)
        if img_ids is None or txt_ids is None or not img_ids.numel() or not txt_ids.numel():
            raise ValueError("RetrievalMetrics.compute needs at least one image and one caption")
        img_keep, img_uids = _first_by_id(img_ids)
        txt_keep, _ = _first_by_id(txt_ids)
        txt_img = _cat(self.text_image_ids)[txt_keep]
        caption_image = torch.searchsorted(img_uids, txt_img).clamp_max(img_uids.numel() - 1)
        missing = img_uids[caption_image] != txt_img
        if bool(missing.any()):
            example = torch.unique(txt_img[missing])[:5].tolist()
            raise ValueError(f"{int(missing.sum())} caption(s) refer to images never seen, "
                             f"e.g. image ids {example}")
        labels = _cat(self.image_labels)
        if labels is not None and labels.numel():
            if labels.shape[0] != img_ids.shape[0]:
                raise ValueError("image_labels were given in some updates but not in others")
            labels = labels[img_keep]
        else:
            labels = None
        return evaluate(_cat(self.image_feats)[img_keep], _cat(self.text_feats)[txt_keep], caption_image,
                        labels, measure=self.measure, ks=self.ks, map_ks=self.map_ks,
                        chunk_size=self.chunk_size)


def _first_tensor(state):
    if isinstance(state, torch.Tensor):
        return state
    return state[0] if state else None


def _cat(state):
    if isinstance(state, torch.Tensor):
        return state
    return torch.cat(state) if state else None


def _first_by_id(ids: torch.Tensor):
    """Positions of the first occurrence of each distinct id, ordered by id, and the ids."""
    uids, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    pos = torch.arange(ids.numel(), device=ids.device)
    first = torch.full_like(uids, ids.numel()).scatter_reduce_(0, inverse, pos, "amin")
    return first, uids
