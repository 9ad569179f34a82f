"""Token-level objectives: InfoNCE or VSE++'s hardest negative on the scores of a token scorer, with the
in-batch negatives of every rank.

Both sides' token sets are gathered from all ranks (padded to the longest token length of any rank, since
ranks' batches differ in caption length; gradients flow back to each owner), this rank's images are
scored against every caption and its captions against every image by the scorer the module hands in (a
function of tensors: objectives know no models), and the loss is the mean over this rank's rows. So with
W ranks at batch B the loss and, after DDP's averaging, the gradients equal one process at batch W x B,
exactly as for the global objectives."""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.objectives.contrastive import info_nce_scores, vse_max_violation_scores
from pipeline.objectives.distributed import gather_no_grad, gather_with_grad, rank_and_world

LOSSES = ("infonce", "vse_max_violation")


def gather_token_sets(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All ranks' token sets `[B, T, D]` with masks `[B, T]` as `[W*B, T', D]`, `[W*B, T']`, padded to the
    longest T of any rank (the padding masked), gradients flowing back to each owner; and this rank's row
    offset."""
    _, world = rank_and_world()
    if world == 1:
        return tokens, mask, 0
    length = torch.tensor([tokens.shape[1]], device=tokens.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    extra = int(length) - tokens.shape[1]
    tokens = F.pad(tokens, (0, 0, 0, extra))
    mask = F.pad(mask.to(torch.uint8), (0, extra))  # bool does not travel over gloo
    tokens_all, offset = gather_with_grad(tokens)
    return tokens_all, gather_no_grad(mask).bool(), offset


def token_alignment_loss(score: Callable[..., torch.Tensor], img_tokens: torch.Tensor, img_mask: torch.Tensor,
                         txt_tokens: torch.Tensor, txt_mask: torch.Tensor, ids: torch.Tensor | None,
                         loss: str = "infonce", logit_scale: torch.Tensor | None = None,
                         margin: float = 0.2) -> torch.Tensor:
    """The token loss of this rank's pairs. `score(img_tokens, img_mask, txt_tokens, txt_mask)` returns the
    scores `[n_images, n_captions]` of every image against every caption; `ids`: this rank's image ids
    (another row of the same image is not a negative)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown token loss {loss!r}; expected one of {LOSSES}")
    img_all, img_mask_all, offset = gather_token_sets(img_tokens, img_mask)
    txt_all, txt_mask_all, _ = gather_token_sets(txt_tokens, txt_mask)
    i2t = score(img_tokens, img_mask, txt_all, txt_mask_all)  # [B, W*B]: this rank's images
    if len(img_all) == len(img_tokens):  # one process: the same matrix serves both directions
        t2i = i2t.T
    else:
        t2i = score(img_all, img_mask_all, txt_tokens, txt_mask).T  # [B, W*B]: this rank's captions
    if loss == "infonce":
        return info_nce_scores(i2t, t2i, logit_scale, offset, ids)
    return vse_max_violation_scores(i2t, t2i, margin, offset, ids)
