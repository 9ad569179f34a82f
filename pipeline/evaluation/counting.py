"""Hamming ranking without a comparison sort. With b-bit codes a score is one of b + 1 distances, so a
row's ranking under the tie rule (distance ascending, then gallery index) is a stable counting order:
count the items per distance, turn the counts into start positions, and place each item's relevance at
its distance's next position in index order. Exact, two passes over the row, no keys.

The loop is the compiled ``counting_order`` beside the Hamming top-k kernel (pipeline/evaluation/hamming.py,
the same build and the same checks); without a C compiler numpy's stable argsort of the distances (a
radix sort for 8-bit keys) gives the same order, slower. ``backend()`` says which runs.
"""
from __future__ import annotations

import numpy as np

from pipeline.evaluation import hamming
from pipeline.evaluation.ties import distance_histograms

MAX_BITS = 65 * 8  # the kernel's histogram size


_INV: dict[int, np.ndarray] = {}


def _inverse_positions(n: int) -> np.ndarray:
    """``1 / (1..n)`` in float64, cached (a multiply per item instead of a division)."""
    if n not in _INV:
        _INV[n] = 1.0 / np.arange(1, n + 1, dtype=np.float64)
    return _INV[n]


def backend() -> str:
    return "c" if hamming._kernel() is not None else "numpy"


def counting_order(neg_dist: np.ndarray, rel: np.ndarray, best: np.ndarray, best_idx: np.ndarray, bits: int,
                   rel_out: np.ndarray, histograms: bool = False, ap_ks=()):
    """``(ranks int64 [rows], rel_out, histograms, aps)``: relevance (bool ``[rows, n]``) in tie-rule order
    written into ``rel_out`` (uint8, C-contiguous), the rank of each row's best positive (score ``best``,
    gallery index ``best_idx``), with ``histograms`` the items and relevant items per distance
    (``int64 [rows, bits + 1]`` each; else None), and {k: AP@k per row} for the cut-offs ``ap_ks``
    (1..n) when the compiled loop runs (else None: the caller computes them from ``rel_out``).
    ``neg_dist``: int32 ``-distance``, distances 0..bits."""
    rows, n = neg_dist.shape
    lib = hamming._kernel() if bits <= MAX_BITS else None
    if lib is not None:
        neg_dist, rel = np.ascontiguousarray(neg_dist, np.int32), np.ascontiguousarray(rel)
        best = np.ascontiguousarray(best, np.int32)
        best_idx = np.ascontiguousarray(best_idx, np.int64)
        ranks = np.empty(rows, np.int64)
        hist = (np.empty((rows, bits + 1), np.int64), np.empty((rows, bits + 1), np.int64)) if histograms else None
        ks = np.array(sorted(set(int(k) for k in ap_ks)), np.int64)
        aps = np.empty((rows, ks.size), np.float64)
        rc = lib.counting_order(neg_dist.ctypes.data, rel.ctypes.data, rows, n, bits, best.ctypes.data,
                                best_idx.ctypes.data, rel_out.ctypes.data, ranks.ctypes.data,
                                hist[0].ctypes.data if hist else None, hist[1].ctypes.data if hist else None,
                                ks.ctypes.data, ks.size, _inverse_positions(n).ctypes.data,
                                aps.ctypes.data if ks.size else None)
        if rc != 0:
            raise ValueError(f"Hamming distances outside 0..{bits}")
        return ranks, rel_out, hist, {int(k): aps[:, i] for i, k in enumerate(ks)}
    dist = (-neg_dist).astype(np.uint8 if bits < 256 else np.uint16)
    order = np.argsort(dist, axis=1, kind="stable")
    rel_out[...] = np.take_along_axis(rel.view(np.uint8), order, axis=1)
    bd = (-best).astype(dist.dtype)[:, None]
    before = np.arange(n)[None, :] < best_idx[:, None]
    ranks = np.count_nonzero(dist < bd, axis=1) + np.count_nonzero((dist == bd) & before, axis=1)
    hist = distance_histograms(neg_dist, rel, bits) if histograms else None
    return ranks.astype(np.int64), rel_out, hist, None
