"""The fine-grained family: continuous embeddings, InfoNCE or VSE++."""
from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.models.heads import EmbeddingHead
from pipeline.objectives.contrastive import info_nce, vse_max_violation
from pipeline.training.module import RetrievalModule


class FineGrainedAligner(RetrievalModule):
    """Continuous embeddings; symmetric InfoNCE with a learnable, clamped temperature, or VSE++."""

    measure = "cosine"

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, optim: dict, embed_dim: int,
                 head_hidden: int, loss: str = "infonce", init_temperature: float = 0.07,
                 max_logit_scale: float = 100.0, margin: float = 0.2):
        super().__init__(image_encoder, text_encoder, optim)
        self.image_head = EmbeddingHead(image_encoder.out_dim, head_hidden, embed_dim)
        self.text_head = EmbeddingHead(text_encoder.out_dim, head_hidden, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        self.loss_name, self.max_log_scale, self.margin = loss, math.log(max_logit_scale), margin

    def objective(self, img, txt, batch):
        if self.loss_name == "vse_max_violation":
            return vse_max_violation(img, txt, self.margin, batch["image_ids"]), {}
        scale = self.logit_scale.clamp(max=self.max_log_scale).exp()
        return info_nce(img, txt, scale, batch["image_ids"]), {"logit_scale": scale.detach()}

    def gallery_features(self, z: torch.Tensor) -> torch.Tensor:
        return z
