"""Gathering across ranks for the objectives (open_clip's gather-with-grad + local loss).

Each rank scores its own B rows against the W*B columns gathered from all ranks, with gradients
flowing back through the gather. The rank's loss is the mean over its rows, so DDP's gradient
averaging gives exactly the single-process loss at batch W*B (tests/objectives check it on gloo).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gathered gradient over ranks and keeps this rank's rows.

    torch.distributed.nn.all_gather does the same sum with all_to_all on gloo, and that path aborts
    the process at exit now and then ("terminate called without an active exception", about one
    2-rank gloo run in four with torch 2.13); one all_reduce of a B*W x D gradient costs nothing."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return gather_no_grad(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        rows = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * rows:(dist.get_rank() + 1) * rows]


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' `x` concatenated (gradients flow back to each owner) and this rank's row offset."""
    rank, world = rank_and_world()
    if world == 1:
        return x, 0
    return _GatherWithGrad.apply(x), rank * x.shape[0]


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    _, world = rank_and_world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)
