"""Large contrastive batches in the memory of one chunk (GradCache, Gao et al. 2021).

One optimizer step over a batch cut into N chunks, whose loss sees every chunk's negatives:
1. every chunk goes forward without gradients, its RNG state saved first; only the representations the
   objective reads are kept (embeddings, codes, token sets), not the encoders' activations;
2. the objective runs once on all of them (and, under DDP, on every rank's: the objectives gather), and
   gives the gradient of the loss with respect to each cached representation, and to the parameters the
   objective reads directly (logit scales);
3. each chunk goes forward again with its saved RNG state (the same dropout), and backward with its
   cached gradient: the encoders' gradients add up chunk by chunk to the whole batch's.

So the loss and every gradient equal one step at the whole batch, with the chunks' forward passes (the
reference for a model with BatchNorm being trained is the same chunks with gradients: BatchNorm normalises
per chunk). Lightning's `accumulate_grad_batches` is not this: it sums per-chunk losses, each with only its
own chunk's negatives.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

Represent = Callable[[dict], Sequence[torch.Tensor]]  # a batch's inputs -> what the objective reads
LossOf = Callable[[list[torch.Tensor], dict], tuple[torch.Tensor, dict]]  # (representations, batch) -> loss, parts
INPUTS = ("images", "text")  # the batch keys that go through the encoders; the rest is read by the objective


def split_rows(x, chunks: int) -> list:
    """A tensor, or a dict of tensors (keyword inputs), cut into `chunks` equal parts along the rows."""
    if isinstance(x, dict):
        parts = {k: split_rows(v, chunks) for k, v in x.items()}
        return [{k: parts[k][i] for k in parts} for i in range(chunks)]
    if x.shape[0] % chunks:
        raise ValueError(f"a batch of {x.shape[0]} rows does not cut into {chunks} equal chunks")
    return list(torch.tensor_split(x, chunks))


def chunk_inputs(batch: dict, chunks: int) -> list[dict]:
    """The encoders' inputs of `batch` as `chunks` smaller batches."""
    split = {k: split_rows(batch[k], chunks) for k in INPUTS}
    return [{k: split[k][i] for k in INPUTS} for i in range(chunks)]


def rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(state, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


@contextmanager
def norm_statistics_kept(module: nn.Module) -> Iterator[None]:
    """BatchNorm running statistics as they were before the block: the pass without gradients must not
    update them (the replay does, once per chunk, as the reference forward would)."""
    norms = [m for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
    try:
        yield
    finally:
        for m, (mean, var, count) in zip(norms, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)


def cached_backward(module: nn.Module, represent: Represent, loss_of: LossOf, batch: dict, chunks: int,
                    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                    no_sync: Callable[[], object] = nullcontext) -> tuple[torch.Tensor, dict]:
    """Accumulates into `module`'s parameters' `.grad` the gradient of `loss_of` over the whole `batch`,
    running the encoders on `chunks` chunks at a time; returns (loss, parts), detached.

    `backward` runs a backward pass (Lightning's `manual_backward`); `no_sync()` is entered around every
    chunk's replay but the last, so that DDP all-reduces the gradients once, after the last chunk."""
    params = [p for p in module.parameters() if p.requires_grad]
    inputs = chunk_inputs(batch, chunks)
    device = params[0].device if params else torch.device("cpu")
    states, cached = [], []
    with torch.no_grad(), norm_statistics_kept(module):
        for chunk in inputs:
            states.append(rng_state(device))
            cached.append(represent(chunk))
    after = rng_state(device)
    reps = [torch.cat(pieces).requires_grad_(pieces[0].is_floating_point()) for pieces in zip(*cached)]
    loss, parts = loss_of(reps, batch)
    wanted = [r for r in reps if r.requires_grad]
    grads = torch.autograd.grad(loss, wanted + params, allow_unused=True)
    by_rep = dict(zip(map(id, wanted), grads[:len(wanted)]))
    chunk_grads = [[None] * chunks if by_rep.get(id(r)) is None else list(torch.tensor_split(by_rep[id(r)], chunks))
                   for r in reps]
    # the parameters the objective reads directly (logit scales): their gradient enters with the last chunk's
    # backward; zero for the others, so that every trained parameter takes part in that backward (DDP waits
    # for all of them)
    direct = [g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads[len(wanted):])]
    for i, chunk in enumerate(inputs):
        last = i == chunks - 1
        with nullcontext() if last else no_sync():
            set_rng_state(states[i], device)
            out = represent(chunk)
            surrogate = sum((o * g[i]).sum() for o, g in zip(out, chunk_grads) if g[i] is not None)
            if last:
                surrogate = surrogate + sum((p * g).sum() for p, g in zip(params, direct))
            backward(surrogate)
    set_rng_state(after, device)
    return loss.detach(), {k: v.detach() if torch.is_tensor(v) else v for k, v in parts.items()}
