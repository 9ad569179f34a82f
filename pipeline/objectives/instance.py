"""Instance-level hashing: codes that find the exact caption / image. A contrastive loss on the
relaxed codes' cosines (InfoNCE over in-batch negatives gathered across ranks, another caption of the
same image not counted as a negative), a quantisation term towards the signs, and optionally a
distillation term: the codes' in-batch similarity distribution matched to a fine-grained teacher's.

The cosine of two normalised ±1 codes is 1 - 2 x Hamming / L, so a fixed `scale` on cosines is a
temperature on Hamming distances: the same setting suits every code length and prefix."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.objectives.binary import quantisation
from pipeline.objectives.contrastive import info_nce
from pipeline.objectives.distributed import gather_no_grad, gather_with_grad


def code_contrast(hx: torch.Tensor, hy: torch.Tensor, scale: float, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE at a fixed `scale` on the cosines of relaxed codes, local rows vs gathered columns."""
    return info_nce(F.normalize(hx, dim=1), F.normalize(hy, dim=1), torch.tensor(scale, device=hx.device), ids)


def distillation(hx: torch.Tensor, hy: torch.Tensor, teacher_x: torch.Tensor, teacher_y: torch.Tensor,
                 scale: float, teacher_scale: float) -> torch.Tensor:
    """KL(teacher || codes) of each query's in-batch softmax, both directions, averaged: the codes learn
    the teacher's ranking of the batch, not only its top-1. `teacher_*` are the teacher's normalised
    embeddings of the same pairs (no gradient); rows are local, columns gathered from every rank."""
    zx, zy = F.normalize(hx, dim=1), F.normalize(hy, dim=1)
    zx_all, _ = gather_with_grad(zx)
    zy_all, _ = gather_with_grad(zy)
    tx, ty = teacher_x.detach(), teacher_y.detach()
    tx_all, ty_all = gather_no_grad(tx), gather_no_grad(ty)
    loss = hx.new_zeros(())
    for student, teacher in ((zx @ zy_all.T, tx @ ty_all.T), (zy @ zx_all.T, ty @ tx_all.T)):
        loss = loss + F.kl_div(F.log_softmax(scale * student, dim=1), F.log_softmax(teacher_scale * teacher, dim=1),
                               log_target=True, reduction="batchmean")
    return loss / 2


def instance_loss(hx: torch.Tensor, hy: torch.Tensor, ids: torch.Tensor | None, scale: float, quant_weight: float,
                  teacher: tuple[torch.Tensor, torch.Tensor] | None = None, distill_weight: float = 0.0,
                  teacher_scale: float = 20.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """contrast + quant_weight * (quantisation of h_x + of h_y) (+ distill_weight * distillation with a
    teacher); returns the loss and its detached parts."""
    contrast = code_contrast(hx, hy, scale, ids)
    quant = quantisation(hx) + quantisation(hy)
    loss = contrast + quant_weight * quant
    parts = {"contrast": contrast.detach(), "quantisation": quant.detach()}
    if teacher is not None and distill_weight > 0:
        distill = distillation(hx, hy, *teacher, scale, teacher_scale)
        loss = loss + distill_weight * distill
        parts["distillation"] = distill.detach()
    return loss, parts
