"""Fine-grained objectives: symmetric InfoNCE (CLIP) and VSE++'s hardest negative, local rows against
gathered columns; on global embeddings, or on the score rows of any scorer (`*_scores`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.objectives.distributed import gather_no_grad, gather_with_grad


def same_item_mask(ids_local: torch.Tensor, ids_all: torch.Tensor, offset: int) -> torch.Tensor:
    """True where a column is the same image as the row but not the row's own pair (a false negative:
    resampled streams can put one image twice in a batch)."""
    same = ids_local[:, None] == ids_all[None, :]
    own = torch.arange(len(ids_local), device=ids_local.device) + offset
    same[torch.arange(len(ids_local), device=ids_local.device), own] = False
    return same


def info_nce(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
             ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) on L2-normalised embeddings, local rows vs gathered columns."""
    img_all, offset = gather_with_grad(img)
    txt_all, _ = gather_with_grad(txt)
    return info_nce_scores(img @ txt_all.T, txt @ img_all.T, logit_scale, offset, ids)


def vse_max_violation(img: torch.Tensor, txt: torch.Tensor, margin: float,
                      ids: torch.Tensor | None = None) -> torch.Tensor:
    """VSE++ hardest-negative triplet loss, both directions; mean over queries (VSE++ sums; the mean
    keeps the loss scale independent of the batch and makes DDP equal the single-process loss)."""
    img_all, offset = gather_with_grad(img)
    txt_all, _ = gather_with_grad(txt)
    return vse_max_violation_scores(img @ txt_all.T, txt @ img_all.T, margin, offset, ids)


# The same objectives on score rows from any scorer (token-level ones too): `i2t [B, W*B]` scores this
# rank's images against every rank's captions, `t2i [B, W*B]` this rank's captions against every rank's
# images, and this rank's pairs sit at columns `offset + arange(B)`.

def info_nce_scores(i2t: torch.Tensor, t2i: torch.Tensor, logit_scale: torch.Tensor, offset: int,
                    ids: torch.Tensor | None = None) -> torch.Tensor:
    logits_i2t, logits_t2i = logit_scale * i2t, logit_scale * t2i
    if ids is not None:
        mask = same_item_mask(ids, gather_no_grad(ids), offset)
        logits_i2t = logits_i2t.masked_fill(mask, float("-inf"))
        logits_t2i = logits_t2i.masked_fill(mask, float("-inf"))
    target = torch.arange(i2t.shape[0], device=i2t.device) + offset
    return (F.cross_entropy(logits_i2t, target) + F.cross_entropy(logits_t2i, target)) / 2


def vse_max_violation_scores(i2t: torch.Tensor, t2i: torch.Tensor, margin: float, offset: int,
                             ids: torch.Tensor | None = None) -> torch.Tensor:
    rows = torch.arange(i2t.shape[0], device=i2t.device)
    exclude = torch.zeros(i2t.shape, dtype=torch.bool, device=i2t.device)
    exclude[rows, rows + offset] = True
    if ids is not None:
        exclude |= same_item_mask(ids, gather_no_grad(ids), offset)
    loss = i2t.new_zeros(())
    for scores in (i2t, t2i):
        positive = scores[rows, rows + offset]
        hinge = (margin + scores - positive[:, None]).clamp(min=0).masked_fill(exclude, 0)
        loss = loss + hinge.max(dim=1).values.mean()
    return loss
