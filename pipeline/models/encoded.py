"""What every encoder returns: a global vector and its tokens."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Encoded:
    vector: torch.Tensor  # [B, D]: what the retrieval heads take
    tokens: torch.Tensor  # [B, T, D'] (CNN cells, ViT patches, word pieces); D' = the encoder's token_dim
    mask: torch.Tensor  # [B, T] bool, True where a token is real
