"""Curves of a ranking (docs/protocol.md, "Curves"): P@K over K and the 11-point interpolated
precision-recall curve, as per-block sums that add up over blocks of queries.

PR11 (FiCo-ITR's Fig. 3, after the TREC convention): for one query, the interpolated precision at
recall level r is the best precision at any rank whose recall is at least r, for r = 0, 0.1, ..., 1.
Only queries with at least one relevant item have a recall; the curve is the mean over them (the
paper does not say; averaging zeros for the others would lower the whole curve).
"""
from __future__ import annotations

import numpy as np

from pipeline.evaluation.conventions import hit_positions

LEVELS = np.arange(11)  # recall levels t / 10


def pk_grid(n: int) -> np.ndarray:
    """K of the P@K curve: 1..10, then steps of 10 to 100, 100 to 1,000, 1,000 beyond, and n."""
    parts = [np.arange(1, 11), np.arange(20, 101, 10), np.arange(200, 1001, 100), np.arange(2000, n + 1, 1000)]
    grid = np.concatenate(parts)
    return np.unique(np.append(grid[grid <= n], n)).astype(np.int64)


def pr11_sums(rel_sorted: np.ndarray, hits=None):
    """(sum over queries of the interpolated precision at the 11 levels, number of queries summed);
    ``hits``: ``conventions.hit_positions`` of the rows, when already made."""
    rows, ordinal, position, counts = hits if hits is not None else hit_positions(rel_sorted)
    if rows.size == 0:
        return np.zeros(LEVELS.size), 0
    precision = ordinal / position
    # best precision at or after each hit within its row: a running max over the reversed hits, with
    # an offset per row that grows along the reversed order so no row inherits a later row's maximum
    rev = precision[::-1] + 2.0 * (rows.max() - rows[::-1])
    best_after = (np.maximum.accumulate(rev) - 2.0 * (rows.max() - rows[::-1]))[::-1]
    have = np.flatnonzero(counts > 0)
    first = (np.cumsum(counts) - counts)[have]
    total = counts[have]
    # the first hit j (1-based) whose recall j / total >= t / 10: j = ceil(t * total / 10), at least 1
    need = np.maximum((LEVELS[None, :] * total[:, None] + 9) // 10, 1)
    values = best_after[first[:, None] + need - 1]
    return values.sum(0), int(have.size)
