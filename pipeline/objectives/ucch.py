"""UCCH (unsupervised contrastive cross-modal hashing) on relaxed (tanh) codes: the memory-bank contrast
against sign keys and the cross-modal ranking loss.

Nested codes: every function here works on a code prefix as on a whole code. The bank holds one
vector of the full length per item and a prefix's keys are the signs of its rows' first L entries
(`loss` slices the keys to the width of the codes it is given, and normalises each modality's prefix
on its own), so one bank, updated once a step with the full codes, serves every prefix: the first L
entries of a row move towards the first L entries of the mean of both modalities' codes, so each
prefix's keys follow that prefix's codes. The update's normalisations are over whole codes and whole
rows, not over the prefix: a bank of its own per prefix would differ where image and text (or old and
new) disagree in sign on a bit, in how the two are weighed (docs/methods.md, nested codes)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.objectives.distributed import gather_no_grad, gather_with_grad


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


class MemoryBankContrast(nn.Module):
    """UCCH's contrastive hashing loss against sign keys of a momentum-updated memory bank.

    The bank holds one L2-normalised vector per training image; its signs are the binary keys that
    each modality's relaxed code is pulled towards. sign() never enters the autograd graph: the keys
    are constants updated by momentum, the network trains on the continuous codes. UCCH draws K
    negatives per sample; we draw one set of K per step for the whole batch (one matmul instead of
    B*K gathers), seeded by the step so that every rank draws the same set.

    A row's own item is never one of its negatives: where the draw hits it (with K of N items drawn, a
    row meets its own key with chance 1 - (1 - 1/N)^K: a third of the rows at 4,096 of 10K items) that
    logit is masked out, as is another row of the same item among the in-batch keys of warm-up. Counted
    as a negative, the own key would push a code away from the key it is pulled to.
    """

    def __init__(self, num_items: int, bits: int, tau: float, momentum: float, num_negatives: int, seed: int = 0):
        super().__init__()
        self.tau, self.momentum, self.num_negatives, self.seed = tau, momentum, num_negatives, seed
        init = torch.sign(torch.rand(num_items, bits, generator=torch.Generator().manual_seed(seed)) - 0.5)
        self.register_buffer("bank", F.normalize(init, dim=1))

    def loss(self, h: torch.Tensor, idx: torch.Tensor, step: int, warmup: bool, partner: torch.Tensor) -> torch.Tensor:
        """Loss of relaxed codes `h` [B, L] (tanh outputs) of bank items `idx`; `partner` is the other
        modality's codes, used for the in-batch keys during warm-up. L may be shorter than the bank's
        rows (a prefix of nested codes): the keys are then the signs of the rows' first L entries."""
        h = F.normalize(h, dim=1)
        length = h.shape[1]
        scale = 1.0 / (self.tau * math.sqrt(h.shape[1]))  # k·h/sqrt(L) is the cosine of h and the key
        if warmup:  # in-batch negatives: keys from both modalities' mean, no memory yet
            mean_all, offset = gather_with_grad(((h + F.normalize(partner, dim=1)) / 2).detach())
            target = torch.arange(h.shape[0], device=h.device) + offset
            own = idx[:, None] == gather_no_grad(idx)[None, :]  # the row's item, its target included
            own[torch.arange(h.shape[0], device=h.device), target] = False
            logits = (h @ torch.sign(mean_all).T * scale).masked_fill(own, float("-inf"))
            return F.cross_entropy(logits, target)
        neg = self.negatives(step)
        pos_logit = (h * torch.sign(self.bank[idx, :length])).sum(1, keepdim=True)
        own = neg[None, :] == idx[:, None]  # [B, K]: the draw hit the row's own item
        neg_logits = (h @ torch.sign(self.bank[neg, :length]).T).masked_fill(own, float("-inf"))
        logits = torch.cat([pos_logit, neg_logits], dim=1) * scale
        return F.cross_entropy(logits, torch.zeros(h.shape[0], dtype=torch.long, device=h.device))

    def negatives(self, step: int) -> torch.Tensor:
        """The K bank rows drawn at `step` (uniform, with replacement): the same on every rank and for
        every chunk and prefix of the step."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + step)
        return torch.randint(len(self.bank), (self.num_negatives,), generator=gen).to(self.bank.device)

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
