"""What every trainable encoder shares: which of its blocks train (`unlocked_layers`), activation
checkpointing of its blocks (`grad_checkpointing`), and its train / eval mode.

A tower is a stack of blocks (transformer layers, CNN stages) with what runs before them (patch or word
embeddings, a first norm) and what runs after (the final norm, a pooler, the projection into the joint
space). Locking to the last N blocks keeps those blocks and everything after them trainable; the rest
gets no gradient, hence no optimizer state (the optimizer only takes parameters that require one), and
stays in eval mode whatever `.train()` asks, as a frozen tower does: no dropout on features nobody
trains, and BatchNorm keeps its statistics.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.config import ConfigError

# what the block stacks are called: transformers (BERT, ViT: layer; CLIP: layers; GPT-2: h), open_clip
# (resblocks), timm (blocks)
BLOCK_LIST_NAMES = ("layer", "layers", "resblocks", "blocks", "h")


@dataclass
class Stack:
    """A tower's parts in the order they run: `before` the blocks, the `blocks`, and `after` them (modules or
    parameters: the final norm, a pooler, the projection)."""

    blocks: list[nn.Module]
    before: list[nn.Module] = field(default_factory=list)
    after: list[nn.Module | nn.Parameter] = field(default_factory=list)


class Tower(nn.Module):
    """Base of the encoders that can be fine-tuned. A subclass says where its blocks are (`stack`) and how
    it checkpoints them (`enable_checkpointing`)."""

    def __init__(self):
        super().__init__()
        self.locked: list[nn.Module] = []  # parts kept in eval mode (a plain list: not in the state dict)

    def stack(self) -> Stack:
        raise NotImplementedError

    def enable_checkpointing(self, key: str) -> None:
        raise NotImplementedError

    def train(self, mode: bool = True) -> "Tower":
        super().train(mode)
        for module in self.locked:
            module.train(False)
        return self

    def lock(self, unlocked: int, key: str) -> None:
        """Freezes all but the last `unlocked` blocks and what runs after them (`key` names the config key)."""
        stack = self.stack()
        n = len(stack.blocks)
        if unlocked > n:
            raise ConfigError(f"config key '{key}' is {unlocked}, but this tower has {n} blocks: give at most {n}, "
                              f"or null to train all of it")
        trainable = {id(p) for p in self.parameters() if p.requires_grad}  # fixed ones (sin-cos positions) stay fixed
        self.requires_grad_(False)
        for part in [*stack.blocks[n - unlocked:], *stack.after]:
            for p in ([part] if isinstance(part, nn.Parameter) else part.parameters()):
                p.requires_grad_(id(p) in trainable)
        self.locked = [*stack.before, *stack.blocks[:n - unlocked]]
        self.train(self.training)


def find_stack(root: nn.Module, what: str) -> Stack:
    """The block stack of a transformers, open_clip or timm tower: the longest list of modules named like one
    (`BLOCK_LIST_NAMES`). Walking down to it, the children registered before each step run before the
    blocks, those registered after run after them; a parameter held on the way (a class token, positions,
    a projection matrix) belongs after when it is a projection, else before."""
    lists = [(name, m) for name, m in root.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential))
             and name.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES and len(m)]
    if not lists:
        raise ConfigError(f"{what} has no list of blocks (transformer layers) to lock or checkpoint: set "
                          f"unlocked_layers to null and grad_checkpointing to false for it")
    path, blocks = max(lists, key=lambda item: len(item[1]))
    stack, node = Stack(list(blocks)), root
    for part in path.split("."):
        children = list(node.named_children())
        i = [name for name, _ in children].index(part)
        stack.before += [child for _, child in children[:i]]
        stack.after += [child for _, child in children[i + 1:]]
        stack.after += [p for name, p in node.named_parameters(recurse=False) if "proj" in name]
        node = getattr(node, part)
    return stack


def checkpointed(function, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """`function(x)` without keeping its activations for the backward: they are recomputed then. Non-reentrant,
    so that gradients reach a block whose input needs none (behind locked blocks); the recomputation replays
    the same dropout (the RNG state is saved) and leaves BatchNorm statistics as the first pass left them."""
    def contexts():
        return contextlib.nullcontext(), batchnorm_statistics_kept(module)

    if torch.compiler.is_compiling():  # compiled, the recomputation replays no state update (and dynamo
        return checkpoint(function, x, use_reentrant=False)  # cannot trace a context_fn)
    return checkpoint(function, x, use_reentrant=False, context_fn=contexts)


@contextlib.contextmanager
def batchnorm_statistics_kept(module: nn.Module):
    """BatchNorm's running statistics as they were on entry, once the block inside is done: a recomputed
    forward in train mode would otherwise count each batch twice."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
