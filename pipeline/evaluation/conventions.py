"""The published mAP / precision conventions beside FiCo-ITR's (docs/protocol.md, "Other conventions"),
from each query's relevance in ranked order (the tie rule's order).

Every function takes ``rel_sorted``: ``uint8 [queries, n]``, 1 where the item at that rank is relevant,
and returns one value per query; the means (and who is left out of them) are in :func:`summarise_extras`.

    P@K          relevant items in the top K / K (DCMH's P@K)
    mAP@K[ucch]  today's AP@K, averaged only over queries with a relevant item in their top K
                 (UCCH's and thulab DeepHash's rule); no per-query function needed: AP@K > 0 exactly
                 when the top K holds a relevant item
    mAP@K[dadh]  (1 / m) * sum_{j <= m} j / pos_j, m = min(K, relevant items in the whole gallery),
                 pos_j the rank of the j-th relevant item in the full ranking (DADH's calc_map_k)
"""
from __future__ import annotations

import numpy as np

__all__ = ["precision_at", "dadh_ap", "hit_positions", "extra_map_ks", "ucch_mean"]


def extra_map_ks(map_ks, n: int) -> list[int | None]:
    """The k of the ``[ucch]`` / ``[dadh]`` / ``[ties]`` names: ``map_ks`` and 50, None = the whole gallery
    (``N``); a k larger than the gallery is dropped (a name never means another k than it says)."""
    out = []
    for k in (*map_ks, 50):
        k = None if k is None or k <= 0 else int(k)
        if (k is None or k <= n) and k not in out:
            out.append(k)
    return sorted(out, key=lambda k: n + 1 if k is None else k)  # 10, 50, 100, ..., N


def precision_at(rel_sorted: np.ndarray, ks) -> dict[int, np.ndarray]:
    """{K: relevant items in the top K / K} per query, for K <= n."""
    return {k: np.count_nonzero(rel_sorted[:, :k], axis=1) / k for k in ks}


def hit_positions(rel_sorted: np.ndarray):
    """The ranked relevant items of every row at once: ``(row, ordinal j >= 1, position p_j >= 1, counts)``,
    rows in order and positions ascending within a row (numpy's row-major ``flatnonzero``)."""
    r, n = rel_sorted.shape
    hit = rel_sorted.view(np.bool_)
    counts = np.count_nonzero(hit, axis=1)
    flat = np.flatnonzero(hit)
    rows = np.repeat(np.arange(r), counts)
    first = np.cumsum(counts) - counts
    ordinal = np.arange(1, flat.size + 1) - first[rows]
    position = flat + 1 - rows * n
    return rows, ordinal, position, counts


def dadh_ap(rel_sorted: np.ndarray, ks, hits=None) -> dict[int, np.ndarray]:
    """{K: DADH's AP} per query: the first m = min(K, relevant) relevant items, j / pos_j averaged over
    them; positions run over the whole ranking (not cut at K); 0 for a query without relevant items.
    ``hits``: :func:`hit_positions` of the rows, when already made."""
    r, n = rel_sorted.shape
    rows, ordinal, position, counts = hits if hits is not None else hit_positions(rel_sorted)
    ratio = ordinal / position
    first = np.cumsum(counts) - counts  # where each row's hits start in the flat arrays
    out = {}
    ks = [n if k is None else int(k) for k in ks]
    small = [k for k in ks if k < n]
    if small:  # only each row's first k hits count: gather them, a running sum, read at min(k, hits)
        width = max(small)
        take = np.minimum(np.arange(width)[None, :], np.maximum(counts[:, None] - 1, 0))
        sums = np.cumsum(np.where(np.arange(width)[None, :] < counts[:, None],
                                  ratio[np.minimum(first[:, None] + take, max(ratio.size - 1, 0))]
                                  if ratio.size else 0.0, 0.0), axis=1)
        for k in small:
            m = np.minimum(counts, k)
            out[k] = np.where(m > 0, sums[:, k - 1] / np.maximum(m, 1), 0.0)
    if n in ks:  # every hit counts: one sum per row
        sums = np.zeros(r)
        if ratio.size:
            nonempty = counts > 0
            sums[nonempty] = np.add.reduceat(ratio, first[nonempty])
        out[n] = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    return out


def ucch_mean(ap: np.ndarray) -> float:
    """UCCH's mean: only queries whose top K holds a relevant item (AP@K > 0) count; 0 when none does."""
    found = ap > 0
    return float(ap[found].mean()) if found.any() else 0.0
