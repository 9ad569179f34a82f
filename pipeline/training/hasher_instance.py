"""Instance-level hashing: codes that find the exact caption / image (the aim of ADV in FiCo-ITR)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pipeline.objectives.instance import instance_loss
from pipeline.training.hasher import Hasher


class InstanceHasher(Hasher):
    """InfoNCE on the relaxed codes' cosines (in-batch negatives from every rank) + quantisation, and
    with a teacher (a trained fine-grained run, attached at start-up by `training.prerequisites`) a
    distillation of its in-batch similarities. Judged on R@K: best.ckpt by val/rsum."""

    monitor = "val/rsum"

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, optim: dict, bits: int, head_hidden: int,
                 scale: float = 12.0, quant_weight: float = 0.1, distill_weight: float = 1.0,
                 teacher_scale: float = 20.0, prefixes: Sequence[int] = (), binary_weight: float = 0.0,
                 binarise_over: float = 0.0):
        super().__init__(image_encoder, text_encoder, optim, bits, head_hidden, prefixes, binary_weight,
                         binarise_over)
        self.scale, self.quant_weight = scale, quant_weight
        self.distill_weight, self.teacher_scale = distill_weight, teacher_scale
        self.teacher = None  # a FrozenTeacher (not a submodule: never trained, never in the checkpoint)

    def objective(self, hx, hy, batch):
        if self.teacher is not None:  # once a step, shared by every prefix
            batch = {**batch, "teacher": self.teacher.embed(batch, hx.device)}
        return super().objective(hx, hy, batch)

    def code_loss(self, hx: torch.Tensor, hy: torch.Tensor, batch: dict):
        return instance_loss(hx, hy, batch["image_ids"], self.scale, self.quant_weight * self.binarising(),
                             batch.get("teacher"), self.distill_weight, self.teacher_scale)
