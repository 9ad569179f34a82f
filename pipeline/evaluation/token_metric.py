"""`TokenRetrievalMetrics`: the protocol for token-level models as a torchmetrics Metric. Besides the
global embeddings (the screen) it keeps each item's token set; under DDP the token states are padded to
the longest token length of any rank before they are gathered (captions differ in length), and
`compute` scores them exhaustively or through the screen (`evaluate_tokens`)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from pipeline.evaluation.metric import RetrievalMetrics, pad_trailing
from pipeline.evaluation.scores import as_tensor
from pipeline.evaluation.token_level import MODES, evaluate_tokens


class TokenRetrievalMetrics(RetrievalMetrics):
    """``update(..., image_tokens, image_mask, text_tokens, text_mask)``: RetrievalMetrics' arguments
    (the global embeddings the screen compares) and the token sets `[B, T, D]` with masks `[B, T]`.

    ``score_grid`` / ``score_pairs`` are the scorer as callables on tensors (see ``evaluate_tokens``);
    plain functions, never bound methods of a module (a Metric may be deep-copied). ``mode`` is
    ``exhaustive`` or ``screened`` (top ``k`` of the screen re-ranked)."""

    _STATES = RetrievalMetrics._STATES + ("image_tokens", "image_token_mask", "text_tokens", "text_token_mask")

    def __init__(self, score_grid: Callable, score_pairs: Callable, mode: str = "screened", k: int = 100,
                 ks: Sequence[int] = (1, 5, 10), map_ks: Sequence[int | None] = (10, 100, None),
                 chunk_size: int | None = None, score_candidates: Callable | None = None, **kwargs):
        super().__init__(measure="cosine", ks=ks, map_ks=map_ks, chunk_size=chunk_size, **kwargs)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.scorers = (score_grid, score_pairs)  # a tuple: nothing registered as a submodule
        self.score_candidates = score_candidates  # the faster re-ranking (evaluate_tokens), when the scorer has one
        self.mode, self.k = mode, k

    def update(self, image_feats=None, image_ids=None, image_labels=None, text_feats=None, text_ids=None,
               text_image_ids=None, image_tokens=None, image_mask=None, text_tokens=None, text_mask=None) -> None:
        super().update(image_feats, image_ids, image_labels, text_feats, text_ids, text_image_ids)
        for feats, tokens, mask, states in ((image_feats, image_tokens, image_mask, "image"),
                                            (text_feats, text_tokens, text_mask, "text")):
            if feats is None or not len(feats):
                continue
            if tokens is None or len(tokens) != len(feats):
                raise ValueError(f"{states}_tokens must come with every {states} row")
            getattr(self, f"{states}_tokens").append(as_tensor(tokens, self.device).detach())
            getattr(self, f"{states}_token_mask").append(as_tensor(mask, self.device).to(torch.uint8))  # gloo: no bool

    def compute(self) -> dict[str, float]:
        img_keep, txt_keep, caption_image, labels = self._aligned()
        img_tokens, img_mask = _padded_cat(self.image_tokens)[img_keep], _padded_cat(self.image_token_mask)[img_keep]
        txt_tokens, txt_mask = _padded_cat(self.text_tokens)[txt_keep], _padded_cat(self.text_token_mask)[txt_keep]
        screen_image = _padded_cat(self.image_feats)[img_keep]
        screen_text = _padded_cat(self.text_feats)[txt_keep]
        return evaluate_tokens(img_tokens, img_mask, txt_tokens, txt_mask, caption_image, *self.scorers,
                               image_labels=labels, mode=self.mode, k=self.k, screen_image=screen_image,
                               screen_text=screen_text, ks=self.ks, map_ks=self.map_ks, chunk_size=self.chunk_size,
                               score_candidates=self.score_candidates)


def _padded_cat(state) -> torch.Tensor:
    """A list state as one tensor, entries padded to the largest trailing shape (batches differ in length)."""
    if isinstance(state, torch.Tensor):
        return state
    shape = tuple(max(t.shape[d] for t in state) for d in range(1, state[0].ndim))
    return torch.cat([pad_trailing(t, shape) for t in state])
