"""Supervised cross-modal hashing from multi-hot labels: an image and a caption are similar when their
labels share a category. DCMH's objective (Jiang & Li, CVPR 2017) on relaxed codes: the negative
log-likelihood of the pairwise similarities, a quantisation term towards the pair's shared binary
code and a bit-balance term; and the cosine label term that UCCH may add (`hash.label_weight`).

Local rows score gathered columns, both directions, so W ranks at batch B equal one process at W x B.
Items without labels (a few COCO images) are left out of every pair they are in: they count as zero
in the mean over pairs, so the mean does not depend on how the batch is split over ranks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.objectives.binary import binary_target, bit_balance, quantisation
from pipeline.objectives.distributed import gather_no_grad, gather_with_grad


def label_affinity(labels: torch.Tensor, labels_all: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(similar [B, N] as 0/1 floats: the two share a label; known [B, N]: both have labels)."""
    similar = ((labels @ labels_all.T) > 0).to(labels.dtype)
    known = (labels.sum(1) > 0)[:, None] & (labels_all.sum(1) > 0)[None, :]
    return similar, known


def _pairwise_bce(hx, hy, labels, logits_of) -> torch.Tensor:
    """Binary cross-entropy of `logits_of(query, gallery)` against the label similarities, over local
    rows x gathered columns in both directions, pairs with an unlabelled item counted as 0."""
    hx_all, _ = gather_with_grad(hx)
    hy_all, _ = gather_with_grad(hy)
    similar, known = label_affinity(labels, gather_no_grad(labels))
    loss = hx.new_zeros(())
    for query, gallery in ((hx, hy_all), (hy, hx_all)):
        bce = F.binary_cross_entropy_with_logits(logits_of(query, gallery), similar, reduction="none")
        loss = loss + (bce * known).mean()
    return loss / 2


def pairwise_likelihood(hx: torch.Tensor, hy: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """DCMH's -sum(S * Theta - log(1 + e^Theta)), Theta = scale * <h_x, h_y> (DCMH: scale 1/2, on the
    codes themselves; for ±1 codes <b_x, b_y> = L - 2 d_H, so Theta = (L - 2 d_H) / 2), as a mean over
    pairs (softplus, no overflow)."""
    return _pairwise_bce(hx, hy, labels, lambda q, g: scale * q @ g.T)


def label_similarity(hx: torch.Tensor, hy: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """UCCH's optional supervised term: the same pairwise cross-entropy on scaled cosines of the codes."""
    return _pairwise_bce(hx, hy, labels, lambda q, g: scale * F.normalize(q, dim=1) @ F.normalize(g, dim=1).T)


def dcmh_loss(hx: torch.Tensor, hy: torch.Tensor, labels: torch.Tensor, scale: float, quant_weight: float,
              balance_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """likelihood + quant_weight * (||B - H_x||^2 + ||B - H_y||^2), B = sign(h_x + h_y), + balance_weight *
    (bit balance of H_x + of H_y), the squared norms as means; returns the loss and its detached parts."""
    likelihood = pairwise_likelihood(hx, hy, labels, scale)
    target = binary_target(hx, hy)
    quant = quantisation(hx, target) + quantisation(hy, target)
    balance = bit_balance(hx) + bit_balance(hy)
    loss = likelihood + quant_weight * quant + balance_weight * balance
    return loss, {"likelihood": likelihood.detach(), "quantisation": quant.detach(), "balance": balance.detach()}
