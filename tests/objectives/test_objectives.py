"""Objectives under 2-process gloo DDP equal one process at the doubled batch (loss and gradients); each ranks
aligned pairs below shuffled ones; the UCCH memory bank's updates."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pipeline.objectives.contrastive import info_nce, vse_max_violation
from pipeline.objectives.supervised import label_similarity
from pipeline.objectives.ucch import MemoryBankContrast, cross_modal_ranking
from pipeline.training.module import check_finite
from tests.helpers.ddp import assert_equal_results, single_process, two_processes
from tests.helpers.runs import free_port

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


def _loss_of(name, rows):
    """The named objective on rows `rows` of the doubled batch, and the parameters whose gradients count."""
    img_head, txt_head = _heads()
    x_img, x_txt, ids = _data()
    loss = _loss(name, img_head, txt_head, x_img[rows], x_txt[rows], ids[rows], _make_bank(), rows)
    return loss, [*img_head.parameters(), *txt_head.parameters()]


NAMES = ["infonce", "vse", "ranking", "label", "ucch", "ucch_warmup"]


@pytest.fixture(scope="module")
def ddp_results():
    return two_processes(_loss_of, NAMES, B)


@pytest.mark.parametrize("name", NAMES)
def test_ddp_equals_single_process_at_doubled_batch(name, ddp_results):
    assert_equal_results(ddp_results[name], single_process(_loss_of, name, B))


def test_false_negative_mask_changes_the_loss():
    img_head, txt_head = _heads()
    x_img, x_txt, ids = _data()
    with_mask = _loss("infonce", img_head, txt_head, x_img, x_txt, ids)
    without = _loss("infonce", img_head, txt_head, x_img, x_txt, torch.arange(len(ids)))
    assert not torch.allclose(with_mask, without)


def _aligned_and_shuffled(name):
    """(loss on aligned pairs, loss on the same items with the captions shuffled) of one objective: what
    every objective must rank the right way round (a flipped sign or a wrong target fails here)."""
    g = torch.Generator().manual_seed(3)
    n = 16
    img = torch.randn(n, D_OUT, generator=g)
    txt = img + 0.3 * torch.randn(n, D_OUT, generator=g)  # each caption near its own image
    perm = torch.roll(torch.arange(n), 1)  # every caption moved to another image
    zi, zt = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    if name == "infonce":
        f = lambda t: info_nce(zi, t, torch.tensor(10.0))  # noqa: E731
    elif name == "vse":
        f = lambda t: vse_max_violation(zi, t, 0.2)  # noqa: E731
    elif name == "ranking":
        f = lambda t: cross_modal_ranking(zi, t, 0.2, 0.1)  # noqa: E731
    elif name == "label":
        labels = F.one_hot(torch.arange(n) % 4, 4).float()  # 4 classes; same-class items get similar codes
        img = labels @ torch.randn(4, D_OUT, generator=g) + 0.1 * torch.randn(n, D_OUT, generator=g)
        txt = img + 0.1 * torch.randn(n, D_OUT, generator=g)
        perm = torch.roll(torch.arange(n), 1)  # neighbours are of another class
        return (label_similarity(torch.tanh(img), torch.tanh(txt), labels, 5.0),
                label_similarity(torch.tanh(img), torch.tanh(txt[perm]), labels, 5.0))
    else:  # ucch: both modalities' codes against a memory bank that holds the aligned keys
        bank = MemoryBankContrast(n, D_OUT, tau=0.9, momentum=0.4, num_negatives=32, seed=0)
        hi, ht = torch.tanh(img), torch.tanh(txt)
        bank.update(hi, ht, torch.arange(n), warmup=True)  # keys = signs of the pairs' mean codes
        idx = torch.arange(n)
        return (bank.loss(hi, idx, 0, False, ht) + bank.loss(ht, idx, 0, False, hi),
                bank.loss(hi, idx, 0, False, ht[perm]) + bank.loss(ht[perm], idx, 0, False, hi))
    return f(zt), f(zt[perm])


@pytest.mark.parametrize("name", ["infonce", "vse", "ranking", "label", "ucch"])
def test_each_objective_is_lower_for_aligned_than_for_shuffled_pairs(name):
    aligned, shuffled = _aligned_and_shuffled(name)
    assert aligned < shuffled - 0.05, (aligned, shuffled)


def test_memory_bank_update_moves_keys_towards_codes():
    bank = _make_bank()
    h = torch.tanh(torch.randn(4, D_OUT))
    idx = torch.tensor([0, 1, 2, 3])
    bank.update(h, h, idx, warmup=True)  # warm-up: delta 0, the bank takes the codes' direction
    assert torch.equal(torch.sign(bank.bank[idx]), torch.sign(h))
    assert torch.allclose(bank.bank.norm(dim=1), torch.ones(len(bank.bank)))


def _bank_steps(hx, hy, idx, steps=3):
    """A bank after `steps` updates (warm-up first, then momentum) with the given codes."""
    bank = _make_bank()
    for step in range(steps):
        bank.update(hx[step], hy[step], idx[step], warmup=step == 0)
    return bank.bank.clone()


def _bank_worker(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    hx, hy, idx = _bank_batches()
    rows = slice(rank * B, (rank + 1) * B)
    bank = _bank_steps([h[rows] for h in hx], [h[rows] for h in hy], [i[rows] for i in idx])
    banks = [torch.empty_like(bank) for _ in range(WORLD)]
    dist.all_gather(banks, bank)
    if rank == 0:
        torch.save(banks, out)
    dist.destroy_process_group()


def _bank_batches(steps=3):
    g = torch.Generator().manual_seed(11)
    hx = [torch.tanh(torch.randn(WORLD * B, D_OUT, generator=g)) for _ in range(steps)]
    hy = [torch.tanh(torch.randn(WORLD * B, D_OUT, generator=g)) for _ in range(steps)]
    idx = [torch.randperm(WORLD * B + 5, generator=g)[:WORLD * B] for _ in range(steps)]
    for i in idx:
        i[1] = i[4]  # one item twice on rank 0
        i[B + 2] = i[3]  # and one item on both ranks
    return hx, hy, idx


def test_memory_banks_stay_identical_across_ranks_with_repeated_items():
    """2 gloo ranks, batches in which items repeat (within a rank and across ranks): after the updates both
    ranks hold the same bank, equal to the one-process bank at the doubled batch, and a repeated item holds
    normalize(delta * v + (1 - delta) * mean of its targets)."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "banks.pt")
        mp.spawn(_bank_worker, args=(free_port(), out), nprocs=WORLD, join=True)
        rank0, rank1 = torch.load(out)
    assert torch.equal(rank0, rank1)
    hx, hy, idx = _bank_batches()
    single = _bank_steps(hx, hy, idx)
    assert torch.allclose(rank0, single, atol=1e-6)
    # the value of a repeated item after the last (momentum) step
    before = _bank_steps(hx[:2], hy[:2], idx[:2], steps=2)
    item = int(idx[2][4])
    where = (idx[2] == item).nonzero().flatten()
    assert len(where) == 2
    targets = F.normalize((F.normalize(hx[2][where], dim=1) + F.normalize(hy[2][where], dim=1)) / 2, dim=1)
    want = F.normalize(0.4 * before[item] + 0.6 * targets.mean(0), dim=0)
    assert torch.allclose(single[item], want, atol=1e-6)


def test_non_finite_loss_names_the_step():
    check_finite(torch.tensor(1.0), 3)
    with pytest.raises(FloatingPointError, match="step 42"):
        check_finite(torch.tensor(float("nan")), 42)
