"""Nested codes (Matryoshka representation learning, Kusupati et al. 2022, applied to hash codes): one
code whose first L bits are a usable code on their own, for each L of a set of lengths, trained by a
loss on every prefix. The lengths are multiples of 8, so a prefix of a packed code is its first L / 8
bytes: a bit-length sweep is one model, and a cascade can screen with 16 bits and refine with 64."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

Loss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def nested_loss(loss_of: Loss, hx: torch.Tensor, hy: torch.Tensor, lengths: Sequence[int],
                weights: Sequence[float] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted mean over `lengths` of `loss_of(hx[:, :L], hy[:, :L])` (equal weights by default)
    and the parts of each length, named `<L>bit/<part>` (with `<L>bit/loss`) when there are several."""
    lengths = list(lengths)
    if any(not 0 < length <= hx.shape[1] for length in lengths):
        raise ValueError(f"code lengths {lengths} must lie in 1..{hx.shape[1]} (the code's length)")
    weights = [1.0] * len(lengths) if weights is None else list(weights)
    if len(weights) != len(lengths) or sum(weights) <= 0:
        raise ValueError(f"need one non-negative weight per length, not all 0: {weights} for {lengths}")
    if len(lengths) == 1:
        return loss_of(hx[:, :lengths[0]], hy[:, :lengths[0]])
    total, parts = hx.new_zeros(()), {}
    for length, weight in zip(lengths, weights):
        loss, own = loss_of(hx[:, :length], hy[:, :length])
        total = total + weight * loss
        parts[f"{length}bit/loss"] = loss.detach()
        parts.update({f"{length}bit/{name}": value for name, value in own.items()})
    return total / sum(weights), parts
