"""The protocol for token-level models: scores come from a token scorer, exhaustively or through the
two-stage ranking (a global-embedding screen, token re-ranking of its top K), and go through the same
exact ranking code and tie rule as every other model (`evaluate_blocks`).

Knows nothing of models: the scorer arrives as two callables on tensors,
``score_grid(image_tokens, image_mask, text_tokens, text_mask) -> [Ni, Nt]`` (every image against every
caption) and ``score_pairs(...same, row-aligned...) -> [P]`` (image p with caption p).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from pipeline.evaluation.protocol import evaluate_blocks, feature_blocks
from pipeline.evaluation.scores import as_tensor, default_chunk_size, prepare
from pipeline.evaluation.screened import pair_rerank, two_stage

MODES = ("exhaustive", "screened")
FULL_MATRIX_ELEMENTS = 1 << 26  # exhaustive: score the whole N x M matrix once when it fits in 256 MB


@torch.no_grad()
def evaluate_tokens(image_tokens, image_mask, text_tokens, text_mask, caption_image,
                    score_grid: Callable, score_pairs: Callable, image_labels=None, mode: str = "exhaustive",
                    k: int | None = None, screen_image=None, screen_text=None, ks: Iterable[int] = (1, 5, 10),
                    map_ks: Iterable[int | None] = (10, 100, None), chunk_size: int | None = None,
                    score_candidates: Callable | None = None) -> dict[str, float]:
    """FiCo-ITR metrics of a token-level model.

    ``mode="exhaustive"``: every (image, caption) pair is scored by the token scorer.
    ``mode="screened"``: the global embeddings ``screen_image [N, D]`` / ``screen_text [M, D]`` (cosine)
    rank the gallery, the token scorer re-orders each query's top ``k``, the rest keeps the screen's
    order (``k`` >= the gallery size is exhaustive scoring). Runs on the tokens' device.
    ``score_candidates(query_tokens, query_mask, gallery_tokens, gallery_mask, candidates [q, K],
    queries_are_images) -> [q, K]``, when given, re-ranks instead of ``score_pairs`` (the same scores, each
    query scored against its K candidates at once).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    img_t, txt_t = as_tensor(image_tokens), as_tensor(text_tokens)
    device = img_t.device
    img_m, txt_m = as_tensor(image_mask, device).bool(), as_tensor(text_mask, device).bool()
    txt_t = txt_t.to(device)
    n, m = img_t.shape[0], txt_t.shape[0]
    chunk_size = chunk_size or default_chunk_size(device)

    def grid(img_rows, txt_rows) -> torch.Tensor:
        return score_grid(img_t[img_rows], img_m[img_rows], txt_t[txt_rows], txt_m[txt_rows]).float()

    def pairs(img_idx, txt_idx) -> torch.Tensor:
        return score_pairs(img_t[img_idx], img_m[img_idx], txt_t[txt_idx], txt_m[txt_idx]).float()

    everything = slice(None)
    if mode == "exhaustive":
        if n * m <= FULL_MATRIX_ELEMENTS:  # one pass serves both directions
            full = grid(everything, everything)
            i2t, t2i = (lambda a, b: full[a:b]), (lambda a, b: full[:, a:b].T.contiguous())
        else:
            i2t = lambda a, b: grid(slice(a, b), everything)  # noqa: E731
            t2i = lambda a, b: grid(everything, slice(a, b)).T.contiguous()  # noqa: E731
    else:
        if k is None or screen_image is None or screen_text is None:
            raise ValueError("mode='screened' needs k and the screen's global embeddings (screen_image, screen_text)")
        img_s = prepare(as_tensor(screen_image, device), "cosine", torch.float32)
        txt_s = prepare(as_tensor(screen_text, device), "cosine", torch.float32)
        if score_candidates is None:
            rerank_i2t = pair_rerank(pairs, queries_are_images=True)
            rerank_t2i = pair_rerank(pairs, queries_are_images=False)
        else:
            def rerank_i2t(a, b, candidates):
                return score_candidates(img_t[a:b], img_m[a:b], txt_t, txt_m, candidates, True).float()

            def rerank_t2i(a, b, candidates):
                return score_candidates(txt_t[a:b], txt_m[a:b], img_t, img_m, candidates, False).float()
        i2t = two_stage(feature_blocks(img_s, txt_s, "cosine"), rerank_i2t, k)
        t2i = two_stage(feature_blocks(txt_s, img_s, "cosine"), rerank_t2i, k)
    return evaluate_blocks(i2t, t2i, n, as_tensor(caption_image, device), image_labels, ks=ks, map_ks=map_ks,
                           chunk_size=chunk_size, device=device)
