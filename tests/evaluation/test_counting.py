"""The Hamming ranking's stable counting order (pipeline/evaluation/counting.py): the compiled loop, its
numpy fallback and the sorted-key path all give the tie rule's order and ranks."""
import numpy as np
import pytest

from pipeline.evaluation import counting, hamming
from pipeline.evaluation.counting import counting_order
from pipeline.metrics import evaluate
from tests.evaluation.test_hamming import compiled_kernel  # noqa: F401  (fixture)


def reference(neg, rel, best, best_idx):
    order = np.argsort(-neg, axis=1, kind="stable")  # distance ascending, then index: the tie rule
    position = np.argsort(order, axis=1)
    ranks = np.array([np.count_nonzero((neg[r] > best[r]) | ((neg[r] == best[r]) & (np.arange(neg.shape[1]) < best_idx[r])))
                      for r in range(neg.shape[0])])
    return ranks, np.take_along_axis(rel, order, axis=1).astype(np.uint8), position


@pytest.mark.parametrize("bits", [8, 64, 128])
def test_counting_order_is_the_tie_rule(bits, compiled_kernel, monkeypatch):
    rng = np.random.default_rng(bits)
    neg = -rng.binomial(bits, 0.5, (30, 500)).astype(np.int32)
    rel = rng.random((30, 500)) < 0.3
    best_idx = rng.integers(0, 500, 30)
    best = neg[np.arange(30), best_idx]
    ranks_ref, rel_ref, _ = reference(neg, rel, best, best_idx)
    assert counting.backend() == "c"  # the compiled loop, not the fallback, is what is compared here
    dist = -neg
    hist_ref = (np.stack([np.bincount(d, minlength=bits + 1) for d in dist]),
                np.stack([np.bincount(d[r], minlength=bits + 1) for d, r in zip(dist, rel)]))
    ranks, out, hist, aps = counting_order(neg, rel, best, best_idx, bits, np.empty((30, 500), np.uint8), True,
                                           (1, 10, 500))
    assert np.array_equal(ranks, ranks_ref) and np.array_equal(out, rel_ref)
    assert np.array_equal(hist[0], hist_ref[0]) and np.array_equal(hist[1], hist_ref[1])
    for k in (1, 10, 500):  # AP@k from the definition: mean over the hits in the top k of hits / position
        want = [np.mean((np.cumsum(h[:k]) / np.arange(1, k + 1))[h[:k] == 1]) if h[:k].any() else 0.0 for h in rel_ref]
        assert np.allclose(aps[k], want, rtol=0, atol=1e-12), k
    monkeypatch.setattr(hamming, "_kernel", lambda: None)  # the numpy fallback: same answer
    ranks, out, hist, aps = counting_order(neg, rel, best, best_idx, bits, np.empty((30, 500), np.uint8), True)
    assert np.array_equal(ranks, ranks_ref) and np.array_equal(out, rel_ref) and aps is None
    assert np.array_equal(hist[0], hist_ref[0]) and np.array_equal(hist[1], hist_ref[1])


def test_evaluate_with_counting_order_equals_the_sorted_keys(compiled_kernel, monkeypatch):
    """The GPU path still sorts int32 keys; forced onto the CPU it must give the same numbers."""
    from pipeline.evaluation import protocol as protocol_mod

    rng = np.random.default_rng(0)
    cap = rng.permutation(np.arange(300) % 60)
    img, txt = rng.integers(0, 2, (60, 16)).astype(bool), rng.integers(0, 2, (300, 16)).astype(bool)
    labels = (rng.random((60, 5)) < 0.3).astype(np.uint8)
    fast = evaluate(img, txt, cap, labels, measure="hamming", ks=(1, 5, 10, 50))
    monkeypatch.setattr(protocol_mod, "_FORCE_TORCH", True)
    assert evaluate(img, txt, cap, labels, measure="hamming", ks=(1, 5, 10, 50)) == pytest.approx(fast, abs=1e-12)
