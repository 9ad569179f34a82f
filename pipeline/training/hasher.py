"""The hashing family: UCCH, unsupervised cross-modal hashing with a memory bank of sign keys."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.evaluation.scores import pack_codes
from pipeline.models.heads import HashHead, binarize
from pipeline.objectives.hashing import MemoryBankContrast, cross_modal_ranking, label_similarity
from pipeline.training.module import RetrievalModule


class CrossModalHasher(RetrievalModule):
    """UCCH: tanh hash heads; contrastive loss against a memory bank's sign keys + cross-modal
    ranking loss. Codes are sign() at test time, stored packed (bits/8 bytes per item)."""

    measure = "hamming"
    ks = (1, 5, 10, 50, 100, 200)
    training_only_state = ("bank.",)  # the memory bank: one key per training image

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, optim: dict, bits: int,
                 head_hidden: int, num_train_items: int, alpha: float = 0.7, tau: float = 0.9,
                 momentum: float = 0.4, num_negatives: int = 4096, margin: float = 0.2, shift: float = 0.1,
                 warmup_epochs: int = 1, label_weight: float = 0.0, label_scale: float = 5.0, seed: int = 0):
        super().__init__(image_encoder, text_encoder, optim)
        self.image_head = HashHead(image_encoder.out_dim, head_hidden, bits)
        self.text_head = HashHead(text_encoder.out_dim, head_hidden, bits)
        self.bank = MemoryBankContrast(num_train_items, bits, tau, momentum, num_negatives, seed)
        self.alpha, self.margin, self.shift, self.warmup_epochs = alpha, margin, shift, warmup_epochs
        self.label_weight, self.label_scale = label_weight, label_scale

    def objective(self, hx, hy, batch):
        idx, warmup = batch["image_ids"], self.current_epoch < self.warmup_epochs
        if int(idx.max()) >= len(self.bank.bank):
            raise IndexError(f"training image index {int(idx.max())} >= {len(self.bank.bank)} images in the card")
        contrast = (self.bank.loss(hx, idx, self.global_step, warmup, hy)
                    + self.bank.loss(hy, idx, self.global_step, warmup, hx))
        ranking = cross_modal_ranking(F.normalize(hx, dim=1), F.normalize(hy, dim=1), self.margin, self.shift)
        self.bank.update(hx.detach(), hy.detach(), idx, warmup)
        loss = self.alpha * contrast + (1 - self.alpha) * ranking
        parts = {"contrast": contrast.detach(), "ranking": ranking.detach()}
        if self.label_weight > 0:
            supervised = label_similarity(hx, hy, batch["labels"], self.label_scale)
            loss = loss + self.label_weight * supervised
            parts["label"] = supervised.detach()
        return loss, parts

    def gallery_features(self, h: torch.Tensor) -> torch.Tensor:
        return pack_codes(binarize(h))
