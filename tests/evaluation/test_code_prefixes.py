"""Nested codes in evaluation: `RetrievalMetrics(code_prefixes=...)` evaluates each prefix on the packed
prefix (the first L / 8 bytes of an MSB-first packed code), and gives exactly what `evaluate` gives on the
truncated packed codes."""
import numpy as np
import pytest
import torch

from pipeline.evaluation.scores import pack_codes
from pipeline.metrics import RetrievalMetrics, evaluate, metric_names

BITS, PREFIXES, KS = 128, (16, 32, 64), (1, 5, 10)


def test_the_first_bits_of_a_code_pack_to_its_first_bytes():
    h = torch.randn(50, BITS)
    packed = pack_codes(h)
    for bits in (8, *PREFIXES):
        assert torch.equal(pack_codes(h[:, :bits]), packed[:, :bits // 8])


def _split(seed=0, n=30, captions=3, labels=5):
    """±1 codes of images and of their noisy captions, multi-hot labels."""
    rng = np.random.default_rng(seed)
    img = np.sign(rng.standard_normal((n, BITS)))
    cap = np.repeat(np.arange(n), captions)
    flip = rng.random((len(cap), BITS)) < 0.25  # a caption code: its image code with a quarter of its bits flipped
    txt = np.where(flip, -img[cap], img[cap])
    return img, txt, cap, (rng.random((n, labels)) < 0.4).astype(np.int64)


def test_prefix_metrics_equal_evaluate_on_the_truncated_packed_codes():
    img, txt, cap, labels = _split()
    metric = RetrievalMetrics(measure="hamming", ks=KS, code_prefixes=PREFIXES)
    order = np.random.default_rng(1).permutation(len(img))  # fed out of order, in two parts, one image twice
    for part in (order[:20], order[15:]):
        rows = np.isin(cap, part)
        metric.update(torch.tensor(img[part]), torch.tensor(part), torch.tensor(labels[part]),
                      torch.tensor(txt[rows]), torch.tensor(np.flatnonzero(rows)), torch.tensor(cap[rows]))
    results = metric.compute()
    names = metric_names(KS)
    assert list(results) == names + [f"{b}bit/{n}" for b in PREFIXES for n in names]
    packed_img, packed_txt = pack_codes(torch.tensor(img)), pack_codes(torch.tensor(txt))
    assert results == {**evaluate(packed_img, packed_txt, cap, labels, measure="hamming", ks=KS),
                       **{f"{b}bit/{n}": v for b in PREFIXES for n, v in evaluate(
                           packed_img[:, :b // 8], packed_txt[:, :b // 8], cap, labels, measure="hamming",
                           ks=KS).items()}}
    assert results["16bit/rsum"] < results["rsum"]  # the prefixes were not the full codes


def test_code_prefixes_need_hamming_codes_and_whole_bytes():
    with pytest.raises(ValueError, match="multiples of 8"):
        RetrievalMetrics(measure="hamming", code_prefixes=(12,))
    with pytest.raises(ValueError, match="hamming"):
        RetrievalMetrics(measure="cosine", code_prefixes=(16,))
