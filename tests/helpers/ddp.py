"""An objective under 2-process gloo DDP against one process at the doubled batch: the check every
objective passes (loss and gradients equal), as DDP would average them."""
from __future__ import annotations

import os
import tempfile
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers.runs import free_port

WORLD = 2
# loss_of(name, rows) -> (loss on the batch rows `rows` of the doubled batch, parameters to compare);
# a module-level function (it is sent to the spawned processes)
LossOf = Callable[[str, slice], tuple[torch.Tensor, list[torch.Tensor]]]


def single_process(loss_of: LossOf, name: str, batch: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and gradients of one process at the doubled batch (`batch` rows per rank)."""
    loss, params = loss_of(name, slice(0, WORLD * batch))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


def two_processes(loss_of: LossOf, names: list[str], batch: int) -> dict:
    """name -> (loss averaged over 2 gloo ranks, gradients all-reduced and averaged as DDP does)."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "ddp.pt")
        mp.spawn(_worker, args=(free_port(), loss_of, names, batch, out), nprocs=WORLD, join=True)
        return torch.load(out)


def _worker(rank, port, loss_of, names, batch, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    results = {}
    for name in names:
        loss, params = loss_of(name, slice(rank * batch, (rank + 1) * batch))
        loss.backward()
        grads = [p.grad.clone() for p in params]
        for g in grads:  # what DDP does to gradients
            dist.all_reduce(g)
            g /= WORLD
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        results[name] = (mean_loss / WORLD, grads)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def assert_equal_results(ddp: tuple, single: tuple, atol: float = 1e-6) -> None:
    (ddp_loss, ddp_grads), (single_loss, single_grads) = ddp, single
    assert torch.allclose(ddp_loss, single_loss, atol=atol), (ddp_loss, single_loss)
    assert len(ddp_grads) == len(single_grads)
    for g_ddp, g_single in zip(ddp_grads, single_grads):
        assert torch.allclose(g_ddp, g_single, atol=atol), (g_ddp - g_single).abs().max()
