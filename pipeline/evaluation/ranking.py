"""The ranking work behind `evaluate`: one direction's ranks and per-query APs, block by block, with
the tie rule built into integer sort keys (see the algorithm in protocol.py), and the relevance rows
("shares a label") it needs. numpy on CPU, torch elsewhere; the same keys on both."""
from __future__ import annotations

import threading

import numpy as np
import torch

from pipeline.evaluation.counting import counting_order
from pipeline.evaluation.scores import canonical_zero, float_bits_key, order_key32, pack_keys

_SUB_BLOCK = 1 << 17  # elements per CPU sub-block: keys + scratch fit in L2
_REL_CACHE = 1 << 26  # cache image x image relevance (bool) up to this many entries


def effective_k(k, n: int) -> int:
    return n if k is None or k <= 0 or k >= n else int(k)  # 0 = whole gallery, as fico_itr


class Relevance:
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


class Direction:
    """Ranks and per-query APs for one direction: ``nq`` queries against a gallery of ``n``.

    ``score(a, b)`` returns the scores ``[b - a, n]`` of queries ``a:b`` (any source: features, a
    token scorer, a two-stage ranking); ``bits``: the code length when they are minus Hamming
    distances (narrower sort keys), else None. ``pos_q, pos_g``: positive (query, gallery) pairs
    sorted by query, then gallery index; every query has at least one.
    """

    def __init__(self, score, nq, n, bits, pos_q, pos_g, relevance, name):
        self.score, self.nq, self.n, self.bits, self.name = score, nq, n, bits, name
        self.starts = torch.zeros(self.nq + 1, dtype=torch.int64, device=pos_q.device)
        self.starts[1:] = torch.cumsum(torch.bincount(pos_q, minlength=self.nq), 0)
        self.pos_q, self.pos_g = pos_q, pos_g
        self.relevance = relevance
        self.local = threading.local()  # per-thread numpy buffers

    def run(self, rows: int, on_cpu: bool, pool, map_ks, extras=None):
        """Score ``rows`` queries at a time; return ranks and {k: AP@k}. ``extras`` (an
        ``extended.ExtraStats``) receives every block's values for the `--all` names."""
        self.extras = extras
        ks = sorted({effective_k(k, self.n) for k in map_ks})
        ranks, aps = [], {k: [] for k in ks}
        for a in range(0, self.nq, rows):
            b = min(a + rows, self.nq)
            s = self.score(a, b)
            best, best_idx, tied = _best_positive(s, self.pos_q, self.pos_g, self.starts, a, b)
            self.tied = tied.cpu().numpy()
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

    def _extra(self, s, rel, rel_sorted, best, a, hist=None) -> dict:
        """The `--all` values of queries ``a:a + len(s)`` (numpy), or nothing without extras."""
        if self.extras is None:
            return {}
        return self.extras.block(s, rel, rel_sorted, best, self.tied[a - self.block_start:][: s.shape[0]], hist)

    # ---- CPU: numpy on L2-sized sub-blocks -------------------------------------------
    def _block_numpy(self, s, best, best_idx, a, ks, pool):
        sub = max(1, _SUB_BLOCK // self.n)
        starts = range(0, s.shape[0], sub)
        self.block_start = a
        parts = list(pool.map(lambda i: self._sub_numpy(s[i:i + sub], best[i:i + sub],
                                                        best_idx[i:i + sub], a + i, ks), starts))
        for p in parts:  # in query order, in this thread
            if self.extras is not None:
                self.extras.add(p[2])
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
            return _rank_by_count_np(s, best, best_idx), {}, self._extra(s, None, None, best, a)
        rel = self.relevance.rows_np(self.name, a, a + r, self._buf("rel", (r, n), np.bool_))
        rel_sorted = self._buf("rel_sorted", (r, n), np.uint8)
        if s.dtype == np.float64:  # no room for the index in the key: stable argsort
            order = np.argsort(-s, axis=1, kind="stable")
            rel_sorted[...] = np.take_along_axis(rel.view(np.uint8), order, axis=1)
            return (_rank_by_count_np(s, best, best_idx), _ap_np(rel_sorted, ks),
                    self._extra(s, rel, rel_sorted, best, a))
        if self.bits is not None:  # 65 distances at 64 bits: a stable counting order, no sort
            ranks, _, hist, aps = counting_order(s, rel, best, best_idx, self.bits, rel_sorted,
                                                 self.extras is not None, ks)
            return ranks, aps or _ap_np(rel_sorted, ks), self._extra(s, rel, rel_sorted, best, a, hist)
        keys, best_key = self._keys64_np(canonical_zero(s), best, best_idx, rel)
        keys.sort(axis=1)
        ranks = np.fromiter((np.searchsorted(keys[i], best_key[i]) for i in range(r)), np.int64, r)
        # relevance = bit 0 of each key = bit 0 of its first byte (little-endian)
        np.bitwise_and(keys.view(np.uint8)[:, :: keys.itemsize], 1, out=rel_sorted)
        return ranks, _ap_np(rel_sorted, ks), self._extra(s, rel, rel_sorted, best, a)

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

    # ---- other devices: the same keys in torch -----------------------------------------
    def _block_torch(self, s, best, best_idx, a, ks):
        self.block_start = a
        if not ks:
            self._extra_torch(s, None, None, best, a)
            return _rank_by_count_torch(s, best, best_idx), {}
        r, n = s.shape
        rel = self.relevance.rows(self.name, a, a + r)
        idx2 = torch.arange(0, 2 * n, 2, device=s.device)
        if s.dtype == torch.float64:
            order = torch.sort(s, dim=1, descending=True, stable=True).indices
            hits = rel.gather(1, order).to(torch.int32)
            self._extra_torch(s, rel, hits, best, a)
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
        self._extra_torch(s, rel, keys & 1, best, a)
        return ranks, _ap_torch((keys & 1).to(torch.int32), ks)

    def _extra_torch(self, s, rel, rel_sorted, best, a) -> None:
        """The `--all` values on the host (a copy of the block: `--all` is not the fast path)."""
        if self.extras is not None:
            host = (lambda t: None if t is None else t.cpu().numpy())
            sorted_np = None if rel_sorted is None else host(rel_sorted.to(torch.uint8))
            self.extras.add(self._extra(host(s), host(rel), sorted_np, host(best), a))


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
    """Per query of ``a:b``: (score, gallery index) of its best positive under the tie rule, and how many
    of its positives score exactly that much."""
    p0, p1 = int(starts[a]), int(starts[b])
    ql, gl = pos_q[p0:p1] - a, pos_g[p0:p1]
    vals = s[ql, gl]
    best = vals.new_empty(b - a).scatter_reduce_(0, ql, vals, "amax", include_self=False)
    # among the positives with the best score, the smallest gallery index
    cand = torch.where(vals == best[ql], gl, torch.iinfo(torch.int64).max)
    idx = gl.new_empty(b - a).scatter_reduce_(0, ql, cand, "amin", include_self=False)
    tied = torch.zeros(b - a, dtype=torch.int64, device=s.device).index_add_(0, ql, (vals == best[ql]).long())
    return best, idx, tied


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
