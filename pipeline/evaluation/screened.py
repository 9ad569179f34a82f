"""Two-stage ranking as score blocks: a cheap screen (global embeddings) picks each query's top K, an
expensive scorer (token-level) re-orders those K, and the rest of the gallery keeps the screen's order
below them. Expressed as scores, so that the protocol ranks it with its own exact code and tie rule.

The order of one query's gallery is
1. the screen's top K (by the tie rule: screen score descending, then gallery index), ordered by the
   re-ranking score descending, equal re-ranking scores by gallery index;
2. every other item, in the screen's order.
With K = the gallery size that is exactly the re-ranking scorer's own (exhaustive) order.
`screened_topk` gives the first k of that order for a gallery handed over in blocks (search).

The block written for the protocol keeps the screen's scores for the items outside the top K and gives
the K candidates the distinct integers `base + K - position`, above every screen score (`base` is the
integer above the row's best screen score): integers stay exact in float32 up to 2**24, and the tie
rule then orders everything as above.
"""
from __future__ import annotations

from typing import Callable

import torch

from pipeline.evaluation.exhaustive import _block_topk, blocked_topk

_EXACT_FLOAT32 = 1 << 24


def two_stage(screen: Callable[[int, int], torch.Tensor], rerank: Callable[[int, int, torch.Tensor], torch.Tensor],
              k: int) -> Callable[[int, int], torch.Tensor]:
    """``score(a, b)`` for :func:`pipeline.evaluation.protocol.evaluate_blocks` from a screen and a re-ranker.

    ``screen(a, b)``: screen scores ``[b - a, n]`` of queries ``a:b`` (may be modified in place).
    ``rerank(a, b, candidates)``: scores ``[b - a, K']`` of queries ``a:b`` against the gallery items
    ``candidates [b - a, K']`` (int64, each row ascending). ``K' = min(k, n)``.
    """
    if k < 1:
        raise ValueError(f"the screen depth K must be >= 1, got {k}")

    def score(a: int, b: int) -> torch.Tensor:
        s = screen(a, b)
        rows, n = s.shape
        kept = min(k, n)
        _, candidates = _block_topk(s, kept, 0)  # the screen's top K, tie rule applied
        candidates = torch.sort(candidates.to(s.device), dim=1).values  # index order: ties stay by index below
        fine = rerank(a, b, candidates)
        if tuple(fine.shape) != (rows, kept):
            raise ValueError(f"rerank({a}, {b}, ...) must return scores of shape {(rows, kept)}, got {tuple(fine.shape)}")
        order = torch.sort(fine, dim=1, descending=True, stable=True).indices
        ranked = candidates.gather(1, order)
        base = float(torch.floor(s.max())) + 1.0 if s.numel() else 1.0
        if base + kept >= _EXACT_FLOAT32 and s.dtype != torch.float64:
            raise ValueError("screen scores too large to place the candidates above them exactly in float32")
        top = base + torch.arange(kept, 0, -1, device=s.device, dtype=s.dtype)
        return s.scatter_(1, ranked, top.expand(rows, kept))

    return score


def pair_rerank(pair_scores: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], queries_are_images: bool):
    """``rerank(a, b, candidates)`` from ``pair_scores(image_index [P], caption_index [P]) -> [P]``."""
    def rerank(a: int, b: int, candidates: torch.Tensor) -> torch.Tensor:
        queries = torch.arange(a, b, device=candidates.device).repeat_interleave(candidates.shape[1])
        flat = candidates.reshape(-1)
        pairs = (queries, flat) if queries_are_images else (flat, queries)
        return pair_scores(*pairs).reshape(candidates.shape)

    return rerank


def screened_topk(screen_queries, screen_blocks, rerank: Callable[[torch.Tensor], torch.Tensor], k: int,
                  screen_k: int, measure: str = "cosine"):
    """The two-stage ranking's first ``k`` items per query, over a gallery handed over in blocks.

    ``screen_blocks`` yields ``(first row, screen array)`` in gallery order (memory: one block at a time);
    the screen keeps each query's top ``K' = max(k, screen_k)`` (tie rule), ``rerank(candidates [q, K'])``
    scores them (each row ascending in gallery index) and they are ordered by that score, equal scores
    by gallery index: the order :func:`two_stage` gives. Returns ``(rerank scores, gallery indices)``
    ``[q, min(k, K')]``; with ``screen_k`` >= the gallery size, the re-ranker's exhaustive top k."""
    if k < 1 or screen_k < 1:
        raise ValueError(f"k and the screen depth must be >= 1, got k={k}, screen_k={screen_k}")
    _, candidates = blocked_topk(screen_queries, screen_blocks, max(k, screen_k), measure)
    candidates = torch.sort(candidates, dim=1).values
    fine = rerank(candidates)
    if tuple(fine.shape) != tuple(candidates.shape):
        raise ValueError(f"rerank must return scores of shape {tuple(candidates.shape)}, got {tuple(fine.shape)}")
    order = torch.sort(fine, dim=1, descending=True, stable=True).indices[:, :k]
    return fine.gather(1, order), candidates.gather(1, order)
