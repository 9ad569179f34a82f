"""UCCH's memory-bank contrast never counts a row's own item as one of its negatives: where the step's draw
of bank rows hits it (certain here: a bank of 5 items, 24 rows drawn) the loss equals one written from the
definition with the own key left out, for the whole code and for a prefix, and so does warm-up's in-batch
contrast with another row of the same item in the batch."""
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.objectives.ucch import MemoryBankContrast

ITEMS, BITS, TAU, K = 5, 16, 0.9, 24
IDX = torch.tensor([0, 1, 2, 2, 4])  # item 2 twice; item 3 in no row (a negative of every row)


def _bank_and_codes():
    bank = MemoryBankContrast(ITEMS, BITS, tau=TAU, momentum=0.4, num_negatives=K, seed=4)
    g = torch.Generator().manual_seed(5)
    bank.bank.copy_(F.normalize(torch.randn(ITEMS, BITS, generator=g, dtype=torch.float64).float(), dim=1))
    h = torch.tanh(torch.randn(len(IDX), BITS, generator=g))
    partner = torch.tanh(torch.randn(len(IDX), BITS, generator=g))
    return bank, h, partner


def _reference(h, keys, idx, columns, excluded):
    """Mean over rows of -log softmax at the positive, logits cos(code, key) / tau, the negatives being the
    key rows `columns` except those for which `excluded(row, column)` holds; loop per row, per key."""
    losses = []
    for b in range(len(h)):
        z = F.normalize(h[b], dim=0)
        logits = [z @ keys[idx[b]] / math.sqrt(len(z))]
        logits += [z @ keys[c] / math.sqrt(len(z)) for c in columns if not excluded(b, c)]
        losses.append(-torch.log_softmax(torch.stack(logits) / TAU, dim=0)[0])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("length", [BITS, 8])  # the whole code and a nested prefix
def test_bank_loss_leaves_each_rows_own_key_out_of_its_negatives(length):
    bank, h, partner = _bank_and_codes()
    step = 1
    neg = bank.negatives(step).tolist()
    assert all(neg.count(int(i)) > 1 for i in IDX)  # every row meets its own item, more than once
    keys = torch.sign(bank.bank[:, :length])
    loss = bank.loss(h[:, :length], IDX, step, False, partner[:, :length])
    expected = _reference(h[:, :length], keys, IDX, neg, lambda b, c: c == int(IDX[b]))
    assert torch.allclose(loss, expected, atol=1e-6), (loss, expected)
    # the rule is what the check sees: the own key kept, or every batch item's key left out of every
    # row (the mask on the wrong rows), give other losses
    kept = _reference(h[:, :length], keys, IDX, neg, lambda b, c: False)
    batch_items = set(IDX.tolist())
    all_rows = _reference(h[:, :length], keys, IDX, neg, lambda b, c: c in batch_items)
    assert (kept - expected).abs() > 1e-2 and (all_rows - expected).abs() > 1e-2, (kept, all_rows, expected)


def test_warmup_leaves_another_row_of_the_same_item_out_of_the_negatives():
    bank, h, partner = _bank_and_codes()
    loss = bank.loss(h, IDX, 0, True, partner)
    keys = torch.sign((F.normalize(h, dim=1) + F.normalize(partner, dim=1)) / 2)  # row b's in-batch key: row b
    rows = range(len(IDX))
    expected = _reference(h, keys, torch.arange(len(IDX)), rows,
                          lambda b, c: c == b or IDX[c] == IDX[b])  # the target itself is the positive
    assert torch.allclose(loss, expected, atol=1e-6), (loss, expected)
    kept = _reference(h, keys, torch.arange(len(IDX)), rows, lambda b, c: c == b)
    assert (kept - expected).abs() > 1e-3, (kept, expected)
