"""Retrieval heads on top of the encoders' global vectors."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


class EmbeddingHead(nn.Module):
    """Continuous embedding for fine-grained retrieval: MLP, then L2-normalised (cosine space)."""

    def __init__(self, in_dim: int, hidden: int, embed_dim: int):
        super().__init__()
        self.proj = _mlp(in_dim, hidden, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(x), dim=-1)


class HashHead(nn.Module):
    """Relaxed hash code: MLP, tanh. Training uses the continuous output; codes are sign() of it."""

    def __init__(self, in_dim: int, hidden: int, bits: int):
        super().__init__()
        self.proj = _mlp(in_dim, hidden, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x))


def binarize(h: torch.Tensor) -> torch.Tensor:
    """±1 codes; sign(0) is mapped to +1 so that every bit is defined."""
    return torch.where(h >= 0, 1.0, -1.0).to(h.dtype)
