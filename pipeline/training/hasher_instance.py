"""Instance-level hashing: codes that find the exact caption / image (the aim of ADV in FiCo-ITR)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from pipeline.models.heads import EmbeddingHead
from pipeline.objectives.contrastive import info_nce
from pipeline.objectives.instance import instance_loss
from pipeline.training.hasher import Hasher
from pipeline.training.module import encode


class InstanceHasher(Hasher):
    """InfoNCE on the relaxed codes' cosines (in-batch negatives from every rank) + quantisation, and
    with a teacher a distillation of its in-batch similarities. Judged on R@K: best.ckpt by val/rsum.

    The teacher is either a trained fine-grained run (attached at start-up by `training.prerequisites`)
    or, with `joint_weight` > 0, a continuous embedding trained beside the codes on the same encoders
    (the fine-grained model's heads and InfoNCE, weighted by `joint_weight`): its detached similarities
    teach the codes, so one run gives the distilled codes without a teacher run first. The embedding
    heads serve training only: retrieval, exports and search use the codes."""

    monitor = "val/rsum"
    training_only_state = ("image_embedding.", "text_embedding.", "embedding_logit_scale")

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, optim: dict, bits: int, head_hidden: int,
                 scale: float = 24.0, quant_weight: float = 0.0, distill_weight: float = 1.0,
                 teacher_scale: float = 20.0, prefixes: Sequence[int] = (), binary_weight: float = 0.0,
                 binarise_over: float = 0.0, joint_weight: float = 0.0, embed_dim: int = 256,
                 init_temperature: float = 0.07, max_logit_scale: float = 100.0):
        super().__init__(image_encoder, text_encoder, optim, bits, head_hidden, prefixes, binary_weight,
                         binarise_over)
        self.scale, self.quant_weight = scale, quant_weight
        self.distill_weight, self.teacher_scale = distill_weight, teacher_scale
        self.teacher = None  # a FrozenTeacher (not a submodule: never trained, never in the checkpoint)
        self.joint_weight = joint_weight
        if joint_weight > 0:
            self.image_embedding = EmbeddingHead(image_encoder.out_dim, head_hidden, embed_dim)
            self.text_embedding = EmbeddingHead(text_encoder.out_dim, head_hidden, embed_dim)
            self.embedding_logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
            self.max_log_scale = math.log(max_logit_scale)

    def represent(self, batch: dict) -> tuple[torch.Tensor, ...]:
        """The relaxed codes, and with a joint embedding its vectors too, from one encoder pass."""
        if not self.joint_weight:
            return super().represent(batch)
        vx, vy = encode(self.image_encoder, batch["images"]).vector, self.text_encoder(**batch["text"]).vector
        return self.image_head(vx), self.text_head(vy), self.image_embedding(vx), self.text_embedding(vy)

    def training_loss(self, reps: list[torch.Tensor], batch: dict) -> tuple[torch.Tensor, dict]:
        if not self.joint_weight:
            return super().training_loss(reps, batch)
        hx, hy, ex, ey = reps
        scale = self.embedding_logit_scale.clamp(max=self.max_log_scale).exp()
        joint = info_nce(ex, ey, scale, batch["image_ids"])
        if self.teacher is None:  # the joint embedding teaches, as it stands (no gradient through it)
            batch = {**batch, "teacher": (ex.detach(), ey.detach())}
        loss, parts = self.objective(hx, hy, batch)
        return loss + self.joint_weight * joint, {**parts, "embedding": joint.detach(),
                                                  "embedding_logit_scale": scale.detach()}

    def objective(self, hx, hy, batch):
        if self.teacher is not None:  # once a step, shared by every prefix
            batch = {**batch, "teacher": self.teacher.embed(batch, hx.device)}
        return super().objective(hx, hy, batch)

    def code_loss(self, hx: torch.Tensor, hy: torch.Tensor, batch: dict):
        return instance_loss(hx, hy, batch["image_ids"], self.scale, self.quant_weight * self.binarising(),
                             batch.get("teacher"), self.distill_weight, self.teacher_scale)
