"""Training objectives. They see tensors only: no models, no data.

Distributed rule (open_clip's gather-with-grad + local loss): each rank scores
its own B rows against the W*B columns gathered from all ranks, with gradients
flowing back through the gather. The rank's loss is the mean over its rows, so
DDP's gradient averaging gives exactly the single-process loss at batch W*B.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gathered gradient over ranks and keeps this rank's rows.

    torch.distributed.nn.all_gather does the same sum with all_to_all on gloo, and that path aborts
    the process at exit now and then ("terminate called without an active exception", about one
    2-rank gloo run in four with torch 2.13); one all_reduce of a B*W x D gradient costs nothing."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return gather_no_grad(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        rows = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * rows:(dist.get_rank() + 1) * rows]


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' `x` concatenated (gradients flow back to each owner) and this rank's row offset."""
    rank, world = _world()
    if world == 1:
        return x, 0
    return _GatherWithGrad.apply(x), rank * x.shape[0]


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    _, world = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _same_item_mask(ids_local: torch.Tensor, ids_all: torch.Tensor, offset: int) -> torch.Tensor:
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
        mask = _same_item_mask(ids, gather_no_grad(ids), offset)
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
        exclude |= _same_item_mask(ids, gather_no_grad(ids), offset)
    loss = img.new_zeros(())
    for query, gallery in ((img, txt_all), (txt, img_all)):
        scores = query @ gallery.T
        positive = scores[rows, rows + offset]
        hinge = (margin + scores - positive[:, None]).clamp(min=0).masked_fill(exclude, 0)
        loss = loss + hinge.max(dim=1).values.mean()
    return loss


def cross_modal_ranking(hx: torch.Tensor, hy: torch.Tensor, margin: float, shift: float) -> torch.Tensor:
    """UCCH's cross-modal ranking loss (CRL): a smooth upper bound of the summed hinge in which
    negatives already outside the margin are shifted down by `shift` (down-weighted, not dropped)."""
    hx_all, offset = gather_with_grad(hx)
    hy_all, _ = gather_with_grad(hy)
    rows = torch.arange(hx.shape[0], device=hx.device)
    loss = hx.new_zeros(())
    for query, gallery in ((hx, hy_all), (hy, hx_all)):
        scores = query @ gallery.T
        positive = scores[rows, rows + offset]
        easy = (scores < positive[:, None] - margin).detach()
        shifted = torch.where(easy, scores - shift, scores)
        loss = loss + (margin - positive + torch.logsumexp(shifted, dim=1)).mean()
    return loss


def label_similarity(hx: torch.Tensor, hy: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """Supervised cross-modal pairwise loss (DCMH-style likelihood): an image and a caption are
    similar when their multi-hot labels share a category. Binary cross-entropy on scaled cosines of
    the relaxed codes, local rows against gathered columns, both directions."""
    hx_all, _ = gather_with_grad(hx)
    hy_all, _ = gather_with_grad(hy)
    labels_all = gather_no_grad(labels)
    similar = ((labels @ labels_all.T) > 0).to(hx.dtype)
    loss = hx.new_zeros(())
    for query, gallery in ((hx, hy_all), (hy, hx_all)):
        logits = scale * F.normalize(query, dim=1) @ F.normalize(gallery, dim=1).T
        loss = loss + F.binary_cross_entropy_with_logits(logits, similar)
    return loss / 2


class MemoryBankContrast(nn.Module):
    """UCCH's contrastive hashing loss against sign keys of a momentum-updated memory bank.

    The bank holds one L2-normalised vector per training image; its signs are the binary keys that
    each modality's relaxed code is pulled towards. sign() never enters the autograd graph: the keys
    are constants updated by momentum, the network trains on the continuous codes. UCCH draws K
    negatives per sample; we draw one set of K per step for the whole batch (one matmul instead of
    B*K gathers), seeded by the step so that every rank draws the same set.
    """

    def __init__(self, num_items: int, bits: int, tau: float, momentum: float, num_negatives: int, seed: int = 0):
        super().__init__()
        self.tau, self.momentum, self.num_negatives, self.seed = tau, momentum, num_negatives, seed
        init = torch.sign(torch.rand(num_items, bits, generator=torch.Generator().manual_seed(seed)) - 0.5)
        self.register_buffer("bank", F.normalize(init, dim=1))

    def loss(self, h: torch.Tensor, idx: torch.Tensor, step: int, warmup: bool, partner: torch.Tensor) -> torch.Tensor:
        """Loss of relaxed codes `h` [B, L] (tanh outputs) of bank items `idx`; `partner` is the other
        modality's codes, used for the in-batch keys during warm-up."""
        h = F.normalize(h, dim=1)
        scale = 1.0 / (self.tau * math.sqrt(h.shape[1]))  # k·h/sqrt(L) is the cosine of h and the key
        if warmup:  # in-batch negatives: keys from both modalities' mean, no memory yet
            mean_all, offset = gather_with_grad(((h + F.normalize(partner, dim=1)) / 2).detach())
            logits = h @ torch.sign(mean_all).T * scale
            target = torch.arange(h.shape[0], device=h.device) + offset
            return F.cross_entropy(logits, target)
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + step)
        neg = torch.randint(len(self.bank), (self.num_negatives,), generator=gen).to(self.bank.device)
        pos_logit = (h * torch.sign(self.bank[idx])).sum(1, keepdim=True)
        neg_logits = h @ torch.sign(self.bank[neg]).T
        logits = torch.cat([pos_logit, neg_logits], dim=1) * scale
        return F.cross_entropy(logits, torch.zeros(h.shape[0], dtype=torch.long, device=h.device))

    @torch.no_grad()
    def update(self, hx: torch.Tensor, hy: torch.Tensor, idx: torch.Tensor, warmup: bool) -> None:
        """v_i <- normalize(delta * v_i + (1 - delta) * t_i), t_i = normalize(mean of both modalities), on
        every rank with the gathered batch so that all ranks keep identical banks. An item that occurs
        more than once in the gathered batch is written once, with the mean of its t_i: a plain indexed
        write of duplicates keeps an undefined one of them (CUDA), and the ranks' banks, of which only
        rank 0's is checkpointed, could drift apart."""
        target = F.normalize((F.normalize(hx, dim=1) + F.normalize(hy, dim=1)) / 2, dim=1)
        target, idx = gather_no_grad(target), gather_no_grad(idx)
        rows, inverse = torch.unique(idx, sorted=True, return_inverse=True)
        # a [rows x batch] 0/1 matmul: the same deterministic sums on every rank (no atomics)
        members = (inverse[None, :] == torch.arange(len(rows), device=idx.device)[:, None]).to(target.dtype)
        mean = (members @ target) / members.sum(1, keepdim=True)
        delta = 0.0 if warmup else self.momentum
        self.bank[rows] = F.normalize(delta * self.bank[rows] + (1 - delta) * mean, dim=1)


def check_finite(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"loss is {loss.item()} at step {step}: stopping. Lower optim.lr, check the data, or resume "
            f"from the last checkpoint with a different seed.")
