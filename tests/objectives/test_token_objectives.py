"""Token objectives under 2-process gloo DDP equal one process at the doubled batch (loss and gradients),
with the ranks' captions of different token lengths; and each objective prefers aligned pairs."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.models.heads import TokenHead
from pipeline.models.token_scorers import CrossAttention, LateInteraction
from pipeline.objectives.tokens import token_alignment_loss
from tests.helpers.runs import free_port

B, R, D_IN, D_OUT, WORLD = 4, 3, 6, 8, 2
WIDTH = (5, 7)  # caption token slots on rank 0 and rank 1: the gather must pad rank 0's


def _data():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(WORLD * B, R, D_IN, generator=g)
    texts = torch.randn(WORLD * B, max(WIDTH), D_IN, generator=g)
    lengths = torch.cat([torch.randint(1, w + 1, (B,), generator=g) for w in WIDTH])
    text_mask = torch.arange(max(WIDTH))[None] < lengths[:, None]
    image_mask = torch.ones(WORLD * B, R, dtype=torch.bool)
    image_mask[2, 2] = False  # one padded region
    ids = torch.arange(WORLD * B)
    ids[1] = ids[6]  # one image twice in the batch, on both ranks: a false negative to mask
    return images, image_mask, texts, text_mask, ids


def _heads():
    torch.manual_seed(1)
    return TokenHead(D_IN, D_OUT), TokenHead(D_IN, D_OUT)


SCORERS = {"late": LateInteraction("both"), "scan": CrossAttention("both", "lse", 4.0, 5.0)}
CASES = [(s, l) for s in SCORERS for l in ("infonce", "vse_max_violation")]


def _loss(scorer, loss, heads, images, image_mask, texts, text_mask, ids):
    img, txt = heads[0](images, image_mask), heads[1](texts, text_mask)
    grid, _ = SCORERS[scorer].functions()
    return token_alignment_loss(grid, img.tokens, img.mask, txt.tokens, txt.mask, ids, loss, torch.tensor(10.0), 0.2)


def _grads(heads):
    return [p.grad.clone() for h in heads for p in h.parameters()]


def _single(scorer, loss):
    heads = _heads()
    value = _loss(scorer, loss, heads, *_data())
    value.backward()
    return value.detach(), _grads(heads)


def _worker(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    images, image_mask, texts, text_mask, ids = _data()
    rows, width = slice(rank * B, (rank + 1) * B), WIDTH[rank]
    results = {}
    for scorer, loss in CASES:
        heads = _heads()
        value = _loss(scorer, loss, heads, images[rows], image_mask[rows], texts[rows, :width],
                      text_mask[rows, :width], ids[rows])
        value.backward()
        grads = _grads(heads)
        for g in grads:  # what DDP does to gradients
            dist.all_reduce(g)
            g /= WORLD
        mean = value.detach().clone()
        dist.all_reduce(mean)
        results[(scorer, loss)] = (mean / WORLD, grads)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results():
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "ddp.pt")
        # fork where available: spawn re-imports torch in each child (~15 s here instead of ~2 s)
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        mp.start_processes(_worker, args=(free_port(), out), nprocs=WORLD, join=True, start_method=method)
        return torch.load(out)


@pytest.mark.parametrize("scorer,loss", CASES)
def test_token_loss_under_ddp_equals_one_process_at_the_doubled_batch(scorer, loss, ddp_results):
    single_loss, single_grads = _single(scorer, loss)
    ddp_loss, ddp_grads = ddp_results[(scorer, loss)]
    assert torch.allclose(ddp_loss, single_loss, atol=1e-6), (ddp_loss, single_loss)
    for g_ddp, g_single in zip(ddp_grads, single_grads):
        assert torch.allclose(g_ddp, g_single, atol=1e-6), (g_ddp - g_single).abs().max()


@pytest.mark.parametrize("scorer,loss", CASES)
def test_token_loss_is_lower_for_aligned_than_for_shuffled_pairs(scorer, loss):
    """Captions made of their image's tokens (noisy) against the same captions given to other images: a
    flipped sign or a wrong target fails here."""
    g = torch.Generator().manual_seed(3)
    n = 12
    images = torch.randn(n, R, D_OUT, generator=g)
    texts = torch.cat([images, images[:, :1]], dim=1) + 0.3 * torch.randn(n, R + 1, D_OUT, generator=g)
    image_mask, text_mask = torch.ones(n, R, dtype=torch.bool), torch.ones(n, R + 1, dtype=torch.bool)
    grid, _ = SCORERS[scorer].functions()
    norm = torch.nn.functional.normalize

    def value(t):
        return token_alignment_loss(grid, norm(images, dim=-1), image_mask, norm(t, dim=-1), text_mask, None, loss,
                                    torch.tensor(10.0), 0.2)

    shuffled = texts[torch.roll(torch.arange(n), 1)]
    assert value(texts) < value(shuffled) - 0.05, (value(texts), value(shuffled))
