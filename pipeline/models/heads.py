"""Retrieval heads on top of the encoders' outputs: global vectors (embedding, hash) and tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.token_scorers import TokenSet


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


class TokenHead(nn.Module):
    """Token embeddings for token-level scoring: every token mapped linearly to `dim`, L2-normalised, the
    padding set to zero. With `positions` (an encoder whose tokens always sit at the same places, like the
    CNN's grid cells) a learned embedding of each place is added first: a caption says *where* things are,
    and a cell's features alone barely do (transformers already add position embeddings)."""

    def __init__(self, in_dim: int, dim: int, positions: int | None = None):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.position = nn.Parameter(torch.zeros(positions, in_dim)) if positions else None

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> TokenSet:
        if self.position is not None:
            tokens = tokens + self.position
        return TokenSet(F.normalize(self.proj(tokens), dim=-1) * mask[..., None].to(tokens.dtype), mask.bool())
