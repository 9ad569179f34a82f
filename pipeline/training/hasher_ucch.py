"""UCCH: unsupervised cross-modal hashing with a memory bank of sign keys and a cross-modal ranking loss."""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import nn

from pipeline.objectives.supervised import label_similarity
from pipeline.objectives.ucch import MemoryBankContrast, cross_modal_ranking
from pipeline.training.hasher import Hasher


class CrossModalHasher(Hasher):
    """UCCH: contrastive loss of each modality's codes against a memory bank's sign keys + cross-modal
    ranking loss (+ an optional supervised label term). With nested prefixes, one bank of full-length
    rows serves every prefix (`objectives.ucch`), updated once a step with the full codes."""

    training_only_state = ("bank.",)  # the memory bank: one key per training image

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, optim: dict, bits: int,
                 head_hidden: int, num_train_items: int, alpha: float = 0.7, tau: float = 0.9,
                 momentum: float = 0.4, num_negatives: int = 4096, margin: float = 0.2, shift: float = 0.1,
                 warmup_epochs: int = 1, label_weight: float = 0.0, label_scale: float = 5.0, seed: int = 0,
                 prefixes: Sequence[int] = (), binary_weight: float = 0.0,
                 binarise_over: float = 0.0):
        super().__init__(image_encoder, text_encoder, optim, bits, head_hidden, prefixes, binary_weight,
                         binarise_over)
        self.bank = MemoryBankContrast(num_train_items, bits, tau, momentum, num_negatives, seed)
        self.alpha, self.margin, self.shift, self.warmup_epochs = alpha, margin, shift, warmup_epochs
        self.label_weight, self.label_scale = label_weight, label_scale

    def objective(self, hx, hy, batch):
        idx = batch["image_ids"]
        if int(idx.max()) >= len(self.bank.bank):
            raise IndexError(f"training image index {int(idx.max())} >= {len(self.bank.bank)} images in the card")
        loss, parts = super().objective(hx, hy, batch)
        self.bank.update(hx.detach(), hy.detach(), idx, self.current_epoch < self.warmup_epochs)
        return loss, parts

    def code_loss(self, hx, hy, batch):
        idx, warmup = batch["image_ids"], self.current_epoch < self.warmup_epochs
        contrast = (self.bank.loss(hx, idx, self.global_step, warmup, hy)
                    + self.bank.loss(hy, idx, self.global_step, warmup, hx))
        ranking = cross_modal_ranking(F.normalize(hx, dim=1), F.normalize(hy, dim=1), self.margin, self.shift)
        loss = self.alpha * contrast + (1 - self.alpha) * ranking
        parts = {"contrast": contrast.detach(), "ranking": ranking.detach()}
        if self.label_weight > 0:
            supervised = label_similarity(hx, hy, batch["labels"], self.label_scale)
            loss = loss + self.label_weight * supervised
            parts["label"] = supervised.detach()
        return loss, parts
