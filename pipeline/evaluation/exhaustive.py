"""Exhaustive top-k search: every gallery item scored, in blocks that bound memory, best first under the
tie rule (score descending, equal scores by gallery index). ``pipeline.evaluation.hamming`` is the
faster exact path for packed codes on CPU."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.evaluation.scores import (as_packed, as_tensor, check_measure, default_chunk_size, float_dtype, low32,
                                        order_key32, pack_keys, prepare, score_dtype, score_prepared)

_FORCE_TORCH = False  # tests flip this to run the torch (GPU) top-k on CPU


def _block_topk(s: torch.Tensor, k: int, offset: int, scratch: np.ndarray | None = None):
    """(scores, gallery indices) ``[rows, k]`` of one score block, best first, tie rule applied."""
    if s.device.type == "cpu" and not _FORCE_TORCH:
        vals, idx = _block_topk_numpy(s.numpy(), k, offset, scratch)
        return torch.from_numpy(vals), torch.from_numpy(idx)
    return _block_topk_torch(s, k, offset)


def _block_topk_numpy(s: np.ndarray, k: int, offset: int, scratch: np.ndarray | None):
    """Select on raw scores, then apply the tie rule to the few candidates.

    The k-th best score of each row comes from an in-place partition of a copy
    (numpy's AVX-512 select, ~2 ns/element); the candidates are the items
    scoring at least that much (k, plus any ties at the k-th score); a lexsort
    of the candidates by (row, score descending, index) gives the tie rule.
    About 2x cheaper than building unique int64 keys for every element.
    """
    r, n = s.shape
    k = min(k, n)
    if k < n:
        part = s.copy() if scratch is None else scratch[: s.size].reshape(r, n)
        if scratch is not None:
            part[...] = s
        part.partition(n - k, axis=1)  # in place: the k-th best lands at column n - k
        flat = np.flatnonzero(s >= part[:, n - k, None])
    else:
        flat = np.arange(s.size)
    rows, cols = np.divmod(flat, n)
    vals = s.reshape(-1)[flat]
    order = np.lexsort((cols, -vals, rows))  # last key is the primary one
    counts = np.bincount(rows, minlength=r)
    pick = order[(np.cumsum(counts) - counts)[:, None] + np.arange(k)]
    return vals[pick], cols[pick] + offset


def _block_topk_torch(s: torch.Tensor, k: int, offset: int):
    """Top-k by unique keys (32-bit scores) or a stable sort (float64)."""
    n = s.shape[1]
    k = min(k, n)
    if s.dtype == torch.float64:  # no room for the index beside a 64-bit score
        order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    else:
        keys = pack_keys(order_key32(s), torch.arange(n, device=s.device))
        order = low32(torch.topk(keys, k, dim=1, largest=False, sorted=True).values)
    return s.gather(1, order), order + offset


def merge_topk(best, new, k: int):
    """Merge the running top-k with a later gallery block's top-k (same queries).

    Both lists are in tie-rule order and every index in ``best`` is below every
    index in ``new``, so a stable descending sort of the concatenation is the
    tie rule.
    """
    if best is None:
        return new
    vals, idx = torch.cat([best[0], new[0]], 1), torch.cat([best[1], new[1]], 1)
    if vals.device.type == "cpu":
        pos = torch.from_numpy(np.argsort(-vals.numpy(), axis=1, kind="stable")[:, :k])
    else:
        pos = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :k]
    return vals.gather(1, pos), idx.gather(1, pos)


@torch.no_grad()
def topk_search(queries, gallery, k: int, measure: str = "cosine",
                chunk_size: int | None = None):
    """Exhaustive top-``k`` gallery items per query, blocked to bound memory.

    Returns ``(scores [nq, k], indices [nq, k] int64)`` sorted best first under
    the tie rule (score descending, then gallery index ascending), so the result
    is deterministic and equals a full stable sort. ``chunk_size`` bounds the
    number of score elements alive per block (default: :func:`default_chunk_size`);
    memory is O(chunk_size + nq * k) beyond the inputs. hamming scores are
    int32 minus distances.
    """
    check_measure(measure)
    q_all, g_all = as_tensor(queries), as_tensor(gallery)
    nq, ng = q_all.shape[0], g_all.shape[0]
    if k <= 0 or ng == 0:
        raise ValueError("need k >= 1 and a non-empty gallery")
    if ng >= 2**31:
        raise ValueError("gallery indices must fit in 31 bits")
    k = min(k, ng)
    chunk_size = chunk_size or default_chunk_size(q_all.device)
    g_cols = min(ng, max(k, chunk_size // max(1, min(nq, 1024))))
    q_rows = max(1, min(nq, chunk_size // g_cols))
    if measure == "hamming":
        q_all, g_all = as_packed(q_all), as_packed(g_all)
    dt = None if measure == "hamming" else float_dtype(q_all, g_all)
    q_prep = prepare(q_all, measure, dt)

    results = [None] * ((nq + q_rows - 1) // q_rows)
    block = scratch = None  # buffers reused by every block
    for g0 in range(0, ng, g_cols):
        g_prep = prepare(g_all[g0:g0 + g_cols], measure, dt)  # once per gallery block
        if block is None:
            block = torch.empty(q_rows * g_cols, dtype=score_dtype(q_prep, g_prep, measure), device=q_prep.device)
            scratch = block.numpy().copy() if block.device.type == "cpu" else None
        for bi, q0 in enumerate(range(0, nq, q_rows)):
            rows = min(q_rows, nq - q0)
            out = block[: rows * g_prep.shape[0]].view(rows, g_prep.shape[0])
            s = score_prepared(q_prep[q0:q0 + q_rows], g_prep, measure, out=out)
            results[bi] = merge_topk(results[bi], _block_topk(s, k, g0, scratch), k)
    return torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results])


def blocked_topk(queries, blocks, k: int, measure: str = "cosine"):
    """``topk_search`` over a gallery handed over in blocks: ``blocks`` yields ``(first row, array)`` in
    gallery order (e.g. memory-mapped files). Each block's top-k is merged into the running top-k, so
    memory is one block plus ``[nq, k]``, and the tie rule holds across blocks (every index of a later
    block is larger). Returns ``(scores [nq, k'], gallery indices [nq, k'])``, ``k' = min(k, rows)``."""
    best = None
    for first, block in blocks:  # a copy of each block: memory maps are read-only
        scores, positions = topk_search(queries, torch.from_numpy(np.array(block)), k, measure)
        best = merge_topk(best, (scores, positions + first), k)
    if best is None:
        raise ValueError("an empty gallery: no block to search")
    return best
