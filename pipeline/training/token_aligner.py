"""The token-level fine-grained family (`model.kind: fine_grained_tokens`): images and captions are
compared token by token (late interaction or SCAN-style cross-attention), trained with InfoNCE or VSE++ on
the token scores, jointly with a global embedding that screens the gallery at evaluation and in search."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from pipeline.evaluation.screened import screened_topk
from pipeline.evaluation.token_metric import TokenRetrievalMetrics
from pipeline.models.heads import TokenHead
from pipeline.models.token_scorers import TokenScorer, TokenSet
from pipeline.objectives.tokens import token_alignment_loss
from pipeline.training.aligner import FineGrainedAligner
from pipeline.training.module import encode

SEARCH_TOKEN_ELEMENTS = 1 << 24  # candidate token values gathered at once when re-ranking a search (64 MiB)


def without_ends(mask: torch.Tensor) -> torch.Tensor:
    """The token mask `[B, T]` without each row's first and last real token (a caption's [CLS] and [SEP],
    CLIP's start and end of text): words, not markers, are compared with regions. Rows of two or fewer
    tokens keep theirs (a caption never loses every token)."""
    mask = mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    first = torch.where(mask, positions, mask.shape[1]).min(1, keepdim=True).values
    last = torch.where(mask, positions, -1).max(1, keepdim=True).values
    inner = mask & (positions != first) & (positions != last)
    return torch.where(mask.sum(1, keepdim=True) > 2, inner, mask)


class TokenAligner(FineGrainedAligner):
    """FineGrainedAligner's global embeddings and objective (the screen), plus token heads, a token scorer
    and the token objective: loss = token loss + `global_weight` x global loss.

    `tokens`: the config's `tokens` section as a dict (dim, loss, init_temperature, max_logit_scale,
    margin, global_weight, val_scoring, test_scoring, screen_k); `scorer` is injected."""

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, optim: dict, embed_dim: int,
                 head_hidden: int, align: dict, tokens: dict, scorer: TokenScorer):
        super().__init__(image_encoder, text_encoder, optim, embed_dim, head_hidden, **align)
        self.image_token_head = TokenHead(getattr(image_encoder, "token_dim", image_encoder.out_dim), tokens["dim"],
                                          getattr(image_encoder, "token_positions", None))
        self.text_token_head = TokenHead(getattr(text_encoder, "token_dim", text_encoder.out_dim), tokens["dim"])
        self.token_scorer = scorer
        self.drop_text_ends = tokens.get("text_ends", "keep") == "drop"
        scorer.checkpointed = self.accum_steps > 1  # a large batch's token loss in blocks (its memory: docs)
        self.token_logit_scale = nn.Parameter(torch.tensor(math.log(1 / tokens["init_temperature"])))
        self.token_loss, self.token_margin = tokens["loss"], tokens["margin"]
        self.token_max_log_scale, self.global_weight = math.log(tokens["max_logit_scale"]), tokens["global_weight"]
        self.score_grid, score_pairs = scorer.functions()
        k = self.screen_k = tokens["screen_k"]
        rerank = scorer.candidates_function()
        self.val_metrics = TokenRetrievalMetrics(self.score_grid, score_pairs, tokens["val_scoring"], k, ks=self.ks,
                                                 score_candidates=rerank)
        self.test_metrics = TokenRetrievalMetrics(self.score_grid, score_pairs, tokens["test_scoring"], k, ks=self.ks,
                                                  score_candidates=rerank)
        screened = tokens["test_scoring"] == "screened"
        name = scorer.name
        self.test_scoring = {
            "mode": tokens["test_scoring"], "screen_k": k if screened else None, "scorer": name,
            "description": (f"screened: the {embed_dim}-d global embedding's top {k} re-ranked by {name}, the rest "
                            f"in screen order" if screened else f"exhaustive: every image-caption pair scored by {name}")}

    def encode_images_with_tokens(self, images: torch.Tensor):
        enc = encode(self.image_encoder, images)
        return self.image_head(enc.vector), self.image_token_head(enc.tokens, enc.mask)

    def encode_texts_with_tokens(self, text: dict):
        enc = self.text_encoder(**text)
        mask = without_ends(enc.mask) if self.drop_text_ends else enc.mask
        return self.text_head(enc.vector), self.text_token_head(enc.tokens, mask)

    def gallery_features(self, z: torch.Tensor, tokens: TokenSet | None = None):
        """The global embedding (what screens); given the items' token set too, what a search index stores
        and a query is searched with: {"screen": embedding, "tokens": [N, T, D], "mask": [N, T]}."""
        if tokens is None:
            return z
        return {"screen": z, "tokens": tokens.tokens, "mask": tokens.mask}

    @torch.no_grad()
    def search_gallery(self, queries: dict, gallery, k: int, screen_k: int | None = None):
        """(token scores [q, k], gallery positions [q, k]) best first, as screened evaluation ranks: the global
        embedding's top max(k, screen_k) by cosine over the gallery's blocks (default `tokens.screen_k`),
        re-ranked by the token scorer, equal scores in gallery order. `queries`: gallery_features with tokens;
        `gallery`: a search index's GalleryReader (`blocks(name)`, `rows(name, positions)`, `meta`)."""
        asked = TokenSet(torch.as_tensor(queries["tokens"]), torch.as_tensor(queries["mask"]))
        holds_images = gallery.meta["gallery"] == "images"

        def rerank(candidates: torch.Tensor) -> torch.Tensor:
            return self._score_candidates(asked, gallery, holds_images, candidates)

        return screened_topk(queries["screen"], gallery.blocks("screen"), rerank, k, screen_k or self.screen_k)

    def _score_candidates(self, asked: TokenSet, gallery, holds_images: bool, candidates: torch.Tensor):
        """Token scores [q, K] of each query with its K candidates (`token_scorer.pairs`, as screened
        evaluation re-ranks), reading the candidates' token sets from the gallery a few queries at a time:
        at most SEARCH_TOKEN_ELEMENTS gathered token values."""
        depth = candidates.shape[1]
        rows = max(1, SEARCH_TOKEN_ELEMENTS // (depth * int(np.prod(gallery.meta["arrays"]["tokens"]["shape"]))))
        out = []
        for a in range(0, len(asked), rows):
            flat = candidates[a:a + rows].reshape(-1).numpy()
            items = TokenSet(torch.from_numpy(gallery.rows("tokens", flat)),
                             torch.from_numpy(gallery.rows("mask", flat))).to(asked.tokens.device)
            queries = asked[a:a + rows]
            queries = queries[torch.arange(len(queries), device=asked.tokens.device).repeat_interleave(depth)]
            pairs = (items, queries) if holds_images else (queries, items)
            out.append(self.token_scorer.pairs(*pairs).float().reshape(-1, depth).cpu())
        return torch.cat(out)

    def represent(self, batch: dict) -> tuple[torch.Tensor, ...]:
        """The global embeddings and both token sets (tokens, mask), from one forward pass."""
        img, img_set = self.encode_images_with_tokens(batch["images"])
        txt, txt_set = self.encode_texts_with_tokens(batch["text"])
        return img, txt, img_set.tokens, img_set.mask, txt_set.tokens, txt_set.mask

    def training_loss(self, reps: list[torch.Tensor], batch: dict) -> tuple[torch.Tensor, dict]:
        img, txt, img_tokens, img_mask, txt_tokens, txt_mask = reps
        global_loss, parts = self.objective(img, txt, batch)
        token_loss, token_parts = self.token_objective(TokenSet(img_tokens, img_mask), TokenSet(txt_tokens, txt_mask),
                                                       batch["image_ids"])
        return token_loss + self.global_weight * global_loss, {
            "global_loss": global_loss.detach(), "token_loss": token_loss.detach(), **parts, **token_parts}

    def token_objective(self, img_set: TokenSet, txt_set: TokenSet, ids: torch.Tensor):
        """The token loss of this rank's rows against every rank's items."""
        scale = self.token_logit_scale.clamp(max=self.token_max_log_scale).exp()
        loss = token_alignment_loss(self.score_grid, img_set.tokens, img_set.mask, txt_set.tokens, txt_set.mask, ids,
                                    self.token_loss, scale, self.token_margin)
        return loss, ({"token_logit_scale": scale.detach()} if self.token_loss == "infonce" else {})

    def _eval_step(self, batch: dict, metrics: TokenRetrievalMetrics) -> None:
        img, img_set = self.encode_images_with_tokens(batch["images"])
        txt, txt_set = self.encode_texts_with_tokens(batch["text"])
        metrics.update(img, batch["image_ids"], batch["labels"], txt, batch["text_ids"], batch["text_image_ids"],
                       img_set.tokens, img_set.mask, txt_set.tokens, txt_set.mask)
