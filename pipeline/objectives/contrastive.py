"""Fine-grained objectives on global embeddings: symmetric InfoNCE (CLIP) and VSE++'s hardest negative,
local rows against gathered columns."""
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
    logits_i2t = logit_scale * img @ txt_all.T
    logits_t2i = logit_scale * txt @ img_all.T
    if ids is not None:
        mask = same_item_mask(ids, gather_no_grad(ids), offset)
        logits_i2t = logits_i2t.masked_fill(mask, float("-inf"))
        logits_t2i = logits_t2i.masked_fill(mask, float("-inf"))
    target = torch.arange(img.shape[0], device=img.device) + offset
    return (F.cross_entropy(logits_i2t, target) + F.cross_entropy(logits_t2i, target)) / 2


def vse_max_violation(img: torch.Tensor, txt: torch.Tensor, margin: float,
                      ids: torch.Tensor | None = None) -> torch.Tensor:
    """VSE++ hardest-negative triplet loss, both directions; mean over queries (VSE++ sums; the mean
    keeps the loss scale independent of the batch and makes DDP equal the single-process loss)."""
    img_all, offset = gather_with_grad(img)
    txt_all, _ = gather_with_grad(txt)
    rows = torch.arange(img.shape[0], device=img.device)
    exclude = torch.zeros(img.shape[0], img_all.shape[0], dtype=torch.bool, device=img.device)
    exclude[rows, rows + offset] = True
    if ids is not None:
        exclude |= same_item_mask(ids, gather_no_grad(ids), offset)
    loss = img.new_zeros(())
    for query, gallery in ((img, txt_all), (txt, img_all)):
        scores = query @ gallery.T
        positive = scores[rows, rows + offset]
        hinge = (margin + scores - positive[:, None]).clamp(min=0).masked_fill(exclude, 0)
        loss = loss + hinge.max(dim=1).values.mean()
    return loss
