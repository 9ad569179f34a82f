"""What docs/methods.md states about two hashing objectives, checked against the code: DCMH's Theta on ±1 codes
is ½ (L - 2 d_H), and the nested memory bank's per-modality normalisation (over the whole code in the update,
over the prefix in the loss)."""
import math

import torch
import torch.nn.functional as F

from pipeline.objectives.supervised import pairwise_likelihood
from pipeline.objectives.ucch import MemoryBankContrast

BITS, PREFIX = 32, 8


def test_dcmh_theta_on_binary_codes_is_half_of_bits_minus_twice_the_hamming_distance():
    g = torch.Generator().manual_seed(0)
    bx = torch.sign(torch.randn(6, BITS, generator=g))
    by = torch.sign(torch.randn(6, BITS, generator=g))
    labels = F.one_hot(torch.arange(6) % 3, 3).float()
    similar = (labels @ labels.T > 0).float()
    hamming = (bx[:, None, :] != by[None, :, :]).sum(2).float()
    theta = (BITS - 2 * hamming) / 2  # [image, caption]
    nll = F.softplus(theta) - similar * theta  # -(S Theta - log(1 + e^Theta))
    expected = (nll.mean() + nll.T.mean()) / 2  # both directions
    assert torch.allclose(pairwise_likelihood(bx, by, labels, 0.5), expected, atol=1e-6)
    wrong = F.softplus(BITS / 2 - 2 * hamming) - similar * (BITS / 2 - 2 * hamming)  # L/2 - 2 d_H
    assert not torch.allclose(pairwise_likelihood(bx, by, labels, 0.5), wrong.mean(), atol=1e-2)


def _codes(seed):
    """Relaxed codes whose prefix holds a different share of the norm in each modality (early training)."""
    g = torch.Generator().manual_seed(seed)
    hx, hy = torch.tanh(torch.randn(4, BITS, generator=g)), torch.tanh(torch.randn(4, BITS, generator=g))
    hx[:, PREFIX:] *= 0.2  # the image code's norm mostly in the prefix, the caption's mostly past it
    hy[:, :PREFIX] *= 0.3
    return hx, hy


def test_nested_bank_normalises_each_modality_over_the_whole_code_and_the_row_as_a_whole():
    """One update with the full codes: a prefix's keys are the signs of the prefix slices of the row
    normalize(delta v + (1 - delta) normalize(h_x/|h_x| + h_y/|h_y|)), norms over all the bits, which is
    not what a bank of the prefix's own (the slices normalised on their own) would hold where image and
    text disagree on a bit."""
    bank = MemoryBankContrast(4, BITS, tau=0.9, momentum=0.4, num_negatives=8, seed=0)
    idx = torch.arange(4)
    hx, hy = _codes(1)
    bank.update(hx, hy, idx, warmup=True)  # delta 0: the row is the target
    whole = F.normalize(F.normalize(hx, dim=1) + F.normalize(hy, dim=1), dim=1)
    assert torch.allclose(bank.bank, whole, atol=1e-6)
    own = torch.sign(F.normalize(hx[:, :PREFIX], dim=1) + F.normalize(hy[:, :PREFIX], dim=1))
    assert not torch.equal(torch.sign(bank.bank[:, :PREFIX]), own)  # the shares of the norm count
    old = bank.bank.clone()
    hx2, hy2 = _codes(2)
    bank.update(hx2, hy2, idx, warmup=False)
    target = F.normalize(F.normalize(hx2, dim=1) + F.normalize(hy2, dim=1), dim=1)
    assert torch.equal(torch.sign(bank.bank[:, :PREFIX]), torch.sign(0.4 * old[:, :PREFIX] + 0.6 * target[:, :PREFIX]))
    assert torch.allclose(bank.bank.norm(dim=1), torch.ones(4))


def test_nested_bank_loss_normalises_each_modalitys_prefix_on_its_own():
    """The loss of a prefix is that of an L-bit code: the prefix normalised over its L entries, its logit the
    cosine with the L-entry key, at temperature tau (so a code scaled by 2 has the same loss)."""
    bank = MemoryBankContrast(4, BITS, tau=0.9, momentum=0.4, num_negatives=6, seed=0)
    hx, hy = _codes(3)
    bank.update(hx, hy, torch.arange(4), warmup=True)
    z, keys = F.normalize(hx[:1, :PREFIX], dim=1)[0], torch.sign(bank.bank[:, :PREFIX])
    columns = [0] + [n for n in bank.negatives(0).tolist() if n != 0]  # the own item drawn is left out
    expected = -torch.log_softmax(torch.stack([z @ keys[c] for c in columns]) / math.sqrt(PREFIX) / 0.9, dim=0)[0]
    for scale in (1.0, 2.0):
        got = bank.loss(scale * hx[:1, :PREFIX], torch.tensor([0]), 0, False, hy[:1, :PREFIX])
        assert torch.allclose(got, expected, atol=1e-6), (scale, got, expected)
