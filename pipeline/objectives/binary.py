"""Terms that make relaxed (tanh) codes good binary codes once sign() is taken: quantisation pulls each
code towards its binary target, bit balance keeps every bit split about evenly over the items (a bit
that is +1 for everything tells nothing apart), and the straight-through codes on which an objective can
score exactly the binary codes retrieval will compare."""
from __future__ import annotations

import torch

from pipeline.objectives.distributed import gather_with_grad


def binary_target(*codes: torch.Tensor) -> torch.Tensor:
    """±1 codes the relaxed codes are pulled towards, outside the graph: the sign of their sum, so that
    an image and its caption share one binary code (DCMH's B = sign(F + G)); sign(0) is +1."""
    total = torch.stack(codes).sum(0).detach()
    return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)


def quantisation(h: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared distance of relaxed codes `h` [B, L] to their binary `target` (default: their own
    signs). A mean over this rank's rows, so that DDP's averaging gives the mean over all rows."""
    if target is None:
        target = binary_target(h)
    return ((h - target) ** 2).mean()


def bit_balance(h: torch.Tensor) -> torch.Tensor:
    """DCMH's balance term ||H^T 1||^2, normalised: the squared mean of each bit over the batch (all
    ranks' rows, gathered with gradients), averaged over bits. 0 when every bit is +1 for half the
    items; 1 when a bit is the same for all."""
    h_all, _ = gather_with_grad(h)
    return (h_all.mean(0) ** 2).mean()


def straight_through(h: torch.Tensor) -> torch.Tensor:
    """The binary codes sign(h) (sign(0) = +1) in the forward pass, with the gradient of h in the backward
    pass (the straight-through estimator): an objective on these scores the codes retrieval compares,
    while its gradient still reaches the relaxed codes."""
    return h + (torch.where(h >= 0, 1.0, -1.0).to(h.dtype) - h).detach()
