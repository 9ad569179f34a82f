"""The hashing family's LightningModule: tanh hash heads on the encoders; training works on the relaxed
codes, retrieval on their signs packed into bytes (8 bytes for 64 bits) compared by Hamming distance.
Subclasses bring the objective (`code_loss`): UCCH, supervised (DCMH), instance-level.

Nested codes: with `prefixes` (e.g. 16, 32, 64 of a 128-bit code) the objective is applied to every
prefix as to a code of its own (`objectives.nested`), and validation and test evaluate each prefix
too, on the packed prefix (the first L / 8 bytes of the packed code), logged as `<stage>/<L>bit/<name>`.
Tools reach a prefix through `gallery_features(h, bits=L)` and `code_lengths`."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pipeline.evaluation.metric import RetrievalMetrics
from pipeline.evaluation.scores import pack_codes
from pipeline.models.heads import HashHead, binarize
from pipeline.objectives.binary import straight_through
from pipeline.objectives.nested import nested_loss
from pipeline.training.module import RetrievalModule


class Hasher(RetrievalModule):
    """Tanh hash heads of `bits` bits; codes are sign() at test time, stored packed (bits / 8 bytes).

    `prefixes`: shorter lengths (multiples of 8) whose leading bits are trained and evaluated as codes
    of their own (nested codes); empty for a code of one length. `binary_weight`: the share of the
    objective computed on the straight-through binary codes (sign forward, the relaxed codes' gradient
    backward), the rest on the relaxed codes: it scores the codes retrieval compares, which closes the
    gap between relaxed and binary codes without a quantisation term strong enough to stall learning.
    `binarise_over`: the fraction of training over which the terms that push the codes to binary (the
    binary share and the objective's quantisation weight) grow linearly from 0 to their values; 0: they
    hold from the first step. Codes that must be binary from the start stop learning (saturated tanh)."""

    measure = "hamming"
    ks = (1, 5, 10, 50, 100, 200)
    monitor = "val/i2t_mAP@N"  # category level: what hashing is judged on (val/rsum without val labels)

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, optim: dict, bits: int, head_hidden: int,
                 prefixes: Sequence[int] = (), binary_weight: float = 0.0, binarise_over: float = 0.0):
        super().__init__(image_encoder, text_encoder, optim)
        self.bits, self.prefixes, self.binary_weight = bits, tuple(sorted(prefixes)), binary_weight
        self.binarise_over = binarise_over
        if any(p % 8 or not 0 < p < bits for p in self.prefixes):
            raise ValueError(f"prefixes {self.prefixes} must be multiples of 8 below the code length {bits}")
        self.image_head = HashHead(image_encoder.out_dim, head_hidden, bits)
        self.text_head = HashHead(text_encoder.out_dim, head_hidden, bits)
        self.val_metrics = RetrievalMetrics(measure=self.measure, ks=self.ks, code_prefixes=self.prefixes)
        self.test_metrics = RetrievalMetrics(measure=self.measure, ks=self.ks, code_prefixes=self.prefixes)

    @property
    def code_lengths(self) -> tuple[int, ...]:
        """Every length whose codes are trained to be used: the prefixes, then the full length."""
        return (*self.prefixes, self.bits)

    def gallery_features(self, h: torch.Tensor, bits: int | None = None) -> torch.Tensor:
        """Packed codes (uint8, MSB first) of the first `bits` bits (all by default): a prefix's bytes are
        the first bits / 8 bytes of the full code's."""
        return pack_codes(binarize(h if bits is None else h[:, :bits]))

    def binarising(self) -> float:
        """How far the binarising terms have grown, in [0, 1] (1 outside training, or without a ramp)."""
        trainer = self._trainer
        if not self.binarise_over or trainer is None or not self.training:
            return 1.0
        total = max(1, int(trainer.estimated_stepping_batches))
        return min(1.0, self.global_step / (self.binarise_over * total))

    def objective(self, hx: torch.Tensor, hy: torch.Tensor, batch: dict):
        def loss_of(x, y):
            return self.code_loss(x, y, batch)

        w = self.binary_weight * self.binarising()
        if w == 0:
            return nested_loss(loss_of, hx, hy, self.code_lengths)
        binary, parts = nested_loss(loss_of, straight_through(hx), straight_through(hy), self.code_lengths)
        parts = {f"binary/{k}": v for k, v in parts.items()}
        if w == 1:
            return binary, parts
        relaxed, relaxed_parts = nested_loss(loss_of, hx, hy, self.code_lengths)
        return (1 - w) * relaxed + w * binary, {**relaxed_parts, **parts}

    def code_loss(self, hx: torch.Tensor, hy: torch.Tensor, batch: dict):
        """(loss, detached parts) of relaxed codes of one length (the full codes, or a prefix)."""
        raise NotImplementedError
