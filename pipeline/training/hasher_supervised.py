"""Supervised cross-modal hashing from the dataset's multi-hot labels: DCMH's objective on relaxed codes."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from pipeline.objectives.supervised import dcmh_loss
from pipeline.training.hasher import Hasher


class SupervisedHasher(Hasher):
    """DCMH: pairwise label-similarity likelihood on the codes' inner products, quantisation towards each
    pair's shared binary code, bit balance. Needs labels on the training split (checked at start-up:
    `training.prerequisites`)."""

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, optim: dict, bits: int, head_hidden: int,
                 scale: float = 0.5, quant_weight: float = 1.0, balance_weight: float = 1.0,
                 prefixes: Sequence[int] = (), binary_weight: float = 0.0,
                 binarise_over: float = 0.0):
        super().__init__(image_encoder, text_encoder, optim, bits, head_hidden, prefixes, binary_weight,
                         binarise_over)
        self.scale, self.quant_weight, self.balance_weight = scale, quant_weight, balance_weight

    def code_loss(self, hx, hy, batch):
        quant_weight = self.quant_weight * self.binarising()
        return dcmh_loss(hx, hy, batch["labels"], self.scale, quant_weight, self.balance_weight)
