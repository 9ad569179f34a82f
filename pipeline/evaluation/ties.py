"""Hamming ranking without a tie rule: exact expectations over every order of equal distances
(after McSherry & Najork, ECIR 2008), and Hamming-radius lookup. docs/protocol.md, "Ties" and "Hashing".

With b-bit codes there are only b + 1 distances, so a query's ranking is a sequence of tie groups, one
per distance, each in an order that a sort chose arbitrarily. Everything here works on per-query
histograms over the distances (``count[q, d]`` items and ``relevant[q, d]`` relevant items at distance
d), never on the items: the expectations are sums over at most b + 1 groups.

Expected AP@K. Let the groups before the one that straddles K hold ``A`` items, ``R`` of them relevant,
and let the straddling group hold ``n`` items, ``r`` relevant, ``m = K - A`` of its slots inside K.
Groups are permuted independently. For a group entirely inside K, whose positions are A'+1..A'+n with
R' relevant before it, a slot t is relevant with probability r/n and, given that, the hits up to it
are R' + 1 + (t - 1)(r - 1)/(n - 1) in expectation; so its expected sum of precisions at relevant
positions is (r/n) [(R' + 1) S0 + (r - 1)/(n - 1) S1] with S0 = sum_t 1/(A' + t), S1 = sum_t (t - 1)/(A' + t).
AP@K divides by the number of hits inside K, R + x, where x (the straddling group's hits inside K) is
hypergeometric (n, r, m); given x its m slots are a uniform arrangement of x hits, the same formula
with (x, m) for (r, n). Hence E[AP@K] = sum_x P(x) (F + S(x)) / (R + x), 0 where R + x = 0.

Expected R@K (instance level: is one of the query's positives in the top K). With ``before`` items
strictly closer than the best positive, ``n`` items at its distance of which ``r`` are positives:
1 when before + n <= K, 0 when before >= K, else 1 - C(n - r, m) / C(n, m) with m = K - before.
"""
from __future__ import annotations

import numpy as np

__all__ = ["distance_histograms", "expected_recall", "expected_ap", "radius_lookup", "radius_pr"]


def distance_histograms(neg_dist: np.ndarray, rel: np.ndarray | None, bits: int):
    """``(count, relevant)`` ``[rows, bits + 1]`` from int32 scores ``-distance`` and bool relevance
    (``relevant`` is None without labels)."""
    r, n = neg_dist.shape
    width = bits + 1
    idx = (np.arange(r, dtype=np.int64) * width)[:, None] - neg_dist  # row * width + distance
    count = np.bincount(idx.ravel(), minlength=r * width).reshape(r, width)
    relevant = None
    if rel is not None:
        relevant = np.bincount(idx.ravel(), weights=rel.ravel(), minlength=r * width).reshape(r, width)
        relevant = relevant.astype(np.int64)
    return count, relevant


def expected_recall(before: np.ndarray, tied: np.ndarray, tied_pos: np.ndarray, k: int) -> np.ndarray:
    """E[best positive within the top k] per query (see the module's note): ``before`` items closer than
    the best positive, ``tied`` items at its distance, ``tied_pos`` >= 1 positives among them."""
    m = k - before
    out = np.where(before + tied <= k, 1.0, 0.0)
    straddle = (m > 0) & (before + tied > k)
    if straddle.any():
        n, r, mm = tied[straddle].astype(np.float64), tied_pos[straddle], m[straddle].astype(np.float64)
        none_in = np.ones(n.size)
        for i in range(int(r.max())):  # C(n - r, m) / C(n, m) = prod_{i < r} (n - m - i) / (n - i)
            use = i < r
            none_in[use] *= np.maximum(n[use] - mm[use] - i, 0.0) / (n[use] - i)
        out[straddle] = 1.0 - none_in
    return out


def _log_factorials(n: int) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])


def _group_sum(start, size, hits, before, harmonic):
    """Expected sum of precision at the relevant positions of a group of ``size`` slots at positions
    start+1..start+size holding ``hits`` relevant items (uniform order), ``before`` hits before it."""
    size_f = np.maximum(size, 1).astype(np.float64)
    s0 = harmonic[start + size] - harmonic[start]
    s1 = size - (start + 1) * s0
    pair = np.where(size > 1, (hits - 1) / np.maximum(size - 1, 1), 0.0)
    return np.where(size > 0, hits / size_f * ((before + 1) * s0 + pair * s1), 0.0)


def expected_ap(count: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
    """E[AP@k] per query over every order of the tie groups (today's AP@k: hits-in-top-k denominator,
    0 without a hit)."""
    q, width = count.shape
    n_total = int(count[0].sum())
    k = min(k, n_total)
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n_total + 1))])
    start = np.cumsum(count, axis=1) - count  # items before each group
    hits_before = np.cumsum(relevant, axis=1) - relevant  # hits in the groups before each group
    full = start + count <= k
    # F: the groups entirely inside k
    f = np.where(full, _group_sum(start, count, relevant, hits_before, harmonic), 0.0).sum(1)
    # the straddling group (if any): the first group not entirely inside k that starts before k
    straddles = (~full) & (start < k)
    has = straddles.any(1)
    g = np.argmax(straddles, axis=1)
    rows = np.arange(q)
    a, n, r = start[rows, g], count[rows, g], relevant[rows, g]
    big_r = np.where(full, relevant, 0).sum(1)  # hits in the groups entirely inside k
    m = np.where(has, k - a, 0)
    n, r = np.where(has, n, 0), np.where(has, r, 0)
    logf = _log_factorials(max(n_total, 1))
    top = np.minimum(r, m)  # the straddling group's hits inside k range over 0..top
    out = np.zeros(q)
    rows = np.arange(q)
    for x in range(int(top.max(initial=0)) + 1):
        rows = rows[top[rows] >= x]  # only the queries whose straddling group can hold x hits
        rr, nn, mm, bb = r[rows], n[rows], m[rows], big_r[rows]
        ok = mm - x <= nn - rr
        logp = (logf[rr] - logf[x] - logf[rr - x] + logf[np.clip(nn - rr, 0, None)]
                - logf[np.clip(mm - x, 0, None)] - logf[np.clip(nn - rr - mm + x, 0, None)]
                - logf[nn] + logf[mm] + logf[np.clip(nn - mm, 0, None)])
        p = np.where(ok, np.exp(np.where(ok, logp, 0.0)), 0.0)
        gain = _group_sum(a[rows], mm, np.full(rows.size, float(x)), bb, harmonic) if x else 0.0
        denom = bb + x
        out[rows] += np.where(denom > 0, p * (f[rows] + gain) / np.maximum(denom, 1), 0.0)
    return out


def radius_lookup(count: np.ndarray, relevant: np.ndarray, radius: int = 2):
    """Per query: (precision, recall) of the items within Hamming distance ``radius``; precision 0 when
    none is within, recall 0 when the query has no relevant item (thulab DeepHash's rule)."""
    within = count[:, : radius + 1].sum(1)
    rel_within = relevant[:, : radius + 1].sum(1)
    total = relevant.sum(1)
    precision = np.where(within > 0, rel_within / np.maximum(within, 1), 0.0)
    recall = np.where(total > 0, rel_within / np.maximum(total, 1), 0.0)
    return precision, recall


def radius_pr(count_sum: np.ndarray, relevant_sum: np.ndarray) -> dict[str, list[float]]:
    """DCMH's pooled precision-recall by Hamming radius, one point per radius 0..bits, from the
    histograms summed over queries: relevant within / within, relevant within / relevant."""
    within, rel_within = np.cumsum(count_sum), np.cumsum(relevant_sum)
    total = max(float(relevant_sum.sum()), 1.0)
    precision = np.where(within > 0, rel_within / np.maximum(within, 1), 0.0)
    return {"radius": list(range(len(count_sum))), "precision": precision.tolist(),
            "recall": (rel_within / total).tolist()}
