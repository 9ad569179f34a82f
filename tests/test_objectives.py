"""Objectives under 2-process gloo DDP equal one process at the doubled batch (loss and gradients)."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pipeline.objectives import (MemoryBankContrast, check_finite, cross_modal_ranking, info_nce, label_similarity,
                                 vse_max_violation)
from tests.conftest import free_port

B, D_IN, D_OUT, WORLD = 6, 10, 16, 2


def _data():
    g = torch.Generator().manual_seed(0)
    x_img, x_txt = torch.randn(WORLD * B, D_IN, generator=g), torch.randn(WORLD * B, D_IN, generator=g)
    ids = torch.arange(WORLD * B)
    ids[3] = ids[8]  # one image twice in the batch (resampled streams do this): a false negative to mask
    return x_img, x_txt, ids


def _heads():
    torch.manual_seed(1)
    return torch.nn.Linear(D_IN, D_OUT), torch.nn.Linear(D_IN, D_OUT)


def _loss(name, img_head, txt_head, x_img, x_txt, ids, bank=None, rows=slice(None)):
    zi, zt = F.normalize(img_head(x_img), dim=1), F.normalize(txt_head(x_txt), dim=1)
    if name == "infonce":
        return info_nce(zi, zt, torch.tensor(10.0), ids)
    if name == "vse":
        return vse_max_violation(zi, zt, 0.2, ids)
    if name == "ranking":
        return cross_modal_ranking(zi, zt, 0.2, 0.1)
    if name == "label":
        labels = (torch.arange(WORLD * B)[rows, None] % torch.tensor([2, 3, 5])[None, :] == 0).float()
        return label_similarity(img_head(x_img), txt_head(x_txt), labels, 5.0)
    hi, ht = torch.tanh(img_head(x_img)), torch.tanh(txt_head(x_txt))
    warmup = name == "ucch_warmup"
    return bank.loss(hi, ids, step=3, warmup=warmup, partner=ht) + bank.loss(ht, ids, step=3, warmup=warmup, partner=hi)


def _make_bank():
    return MemoryBankContrast(num_items=WORLD * B + 5, bits=D_OUT, tau=0.9, momentum=0.4, num_negatives=32, seed=7)


def _single(name):
    img_head, txt_head = _heads()
    x_img, x_txt, ids = _data()
    loss = _loss(name, img_head, txt_head, x_img, x_txt, ids, _make_bank())
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in (*img_head.parameters(), *txt_head.parameters())]


def _worker(rank, port, names, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    x_img, x_txt, ids = _data()
    rows = slice(rank * B, (rank + 1) * B)
    results = {}
    for name in names:
        img_head, txt_head = _heads()
        loss = _loss(name, img_head, txt_head, x_img[rows], x_txt[rows], ids[rows], _make_bank(), rows)
        loss.backward()
        grads = [p.grad.clone() for p in (*img_head.parameters(), *txt_head.parameters())]
        for g in grads:  # what DDP does to gradients
            dist.all_reduce(g)
            g /= WORLD
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        results[name] = (mean_loss / WORLD, grads)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


NAMES = ["infonce", "vse", "ranking", "label", "ucch", "ucch_warmup"]


@pytest.fixture(scope="module")
def ddp_results():
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "ddp.pt")
        mp.spawn(_worker, args=(free_port(), NAMES, out), nprocs=WORLD, join=True)
        return torch.load(out)


@pytest.mark.parametrize("name", NAMES)
def test_ddp_equals_single_process_at_doubled_batch(name, ddp_results):
    single_loss, single_grads = _single(name)
    ddp_loss, ddp_grads = ddp_results[name]
    assert torch.allclose(ddp_loss, single_loss, atol=1e-6), (ddp_loss, single_loss)
    for g_ddp, g_single in zip(ddp_grads, single_grads):
        assert torch.allclose(g_ddp, g_single, atol=1e-6), (g_ddp - g_single).abs().max()


def test_false_negative_mask_changes_the_loss():
    img_head, txt_head = _heads()
    x_img, x_txt, ids = _data()
    with_mask = _loss("infonce", img_head, txt_head, x_img, x_txt, ids)
    without = _loss("infonce", img_head, txt_head, x_img, x_txt, torch.arange(len(ids)))
    assert not torch.allclose(with_mask, without)


def test_infonce_prefers_aligned_pairs():
    z = F.normalize(torch.randn(8, 16), dim=1)
    aligned = info_nce(z, z, torch.tensor(20.0))
    shuffled = info_nce(z, z[torch.randperm(8)], torch.tensor(20.0))
    assert aligned < shuffled


def test_memory_bank_update_moves_keys_towards_codes():
    bank = _make_bank()
    h = torch.tanh(torch.randn(4, D_OUT))
    idx = torch.tensor([0, 1, 2, 3])
    bank.update(h, h, idx, warmup=True)  # warm-up: delta 0, the bank takes the codes' direction
    assert torch.equal(torch.sign(bank.bank[idx]), torch.sign(h))
    assert torch.allclose(bank.bank.norm(dim=1), torch.ones(len(bank.bank)))


def test_non_finite_loss_names_the_step():
    check_finite(torch.tensor(1.0), 3)
    with pytest.raises(FloatingPointError, match="step 42"):
        check_finite(torch.tensor(float("nan")), 42)
