"""pipeline.evaluation (protocol, metric, scores, exhaustive): exactness against fico_itr, the tie rule, DDP.

fico_itr is the reference (docs/protocol.md). It breaks ties with numpy's unstable
argsort, so it is compared on tie-free float64 scores, and hash codes (which
tie constantly) are checked against a brute-force stable-sort reference here.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch

from pipeline.evaluation import exhaustive as exhaustive_mod
from pipeline.evaluation import protocol as protocol_mod
from pipeline.evaluation import ranking as ranking_mod
from pipeline.evaluation import scores as scores_mod
from pipeline.evaluation.exhaustive import topk_search
from pipeline.evaluation.scores import pack_codes, prepare, score_chunk, unpack_codes
from pipeline.metrics import RetrievalMetrics, evaluate, metric_names



@pytest.fixture
def fico():
    """The reference package, for the oracle comparisons only (every other test here runs without it)."""
    return pytest.importorskip("fico_itr")

MAP_KS = (10, 100, None)


# --------------------------------------------------------------------------
# data and references
# --------------------------------------------------------------------------
def make_data(seed=0, n=40, dim=16, max_caps=7, n_labels=6, dtype=np.float64):
    """Images with 1..max_caps captions each, captions shuffled, multi-hot labels.

    Captions are noisy copies of their image, so retrieval is far from random;
    one image has no label at all (its queries score AP = 0).
    """
    rng = np.random.default_rng(seed)
    cap = np.repeat(np.arange(n), rng.integers(1, max_caps + 1, n))
    rng.shuffle(cap)
    img = rng.standard_normal((n, dim))
    txt = img[cap] + 1.2 * rng.standard_normal((len(cap), dim))
    labels = (rng.random((n, n_labels)) < 0.3).astype(np.int64)
    labels[0] = 0
    return img.astype(dtype), txt.astype(dtype), cap, labels


def fico_reference(fico, sim_i2t, cap, labels, sim_t2i=None):
    """fico_itr's numbers under the protocol's names (no rsum)."""
    mapping = [int(c) for c in cap]  # a Python list: its ndarray path crashes
    i2t, t2i = fico.instance_retrieval(sim_i2t, t2i_sim=sim_t2i, captions_per_image=mapping)
    ref = {f"i2t_{k}": float(v) for k, v in i2t.items()}
    ref.update({f"t2i_{k}": float(v) for k, v in t2i.items()})
    for k in MAP_KS:
        a, b = fico.category_retrieval(sim_i2t, labels, k=k, sim2=sim_t2i, captions_per_image=mapping)
        name = "N" if k is None else k
        ref[f"i2t_mAP@{name}"], ref[f"t2i_mAP@{name}"] = float(a), float(b)
    return ref


def brute_force(scores_i2t, scores_t2i, cap, labels, ks=(1, 5, 10), map_ks=MAP_KS):
    """Explicit implementation of docs/protocol.md with a stable sort (the tie rule)."""
    cap = np.asarray(cap)
    rel_img = (labels @ labels.T) > 0

    def direction(scores, positives, rel):
        ranks, aps = [], {k: [] for k in map_ks}
        for q in range(scores.shape[0]):
            order = np.argsort(-scores[q], kind="stable")  # ties: smaller index first
            position = np.empty_like(order)
            position[order] = np.arange(order.size)
            ranks.append(position[positives(q)].min())
            hit = rel[q][order]
            for k in map_ks:
                h = hit[: k or None]
                prec = np.cumsum(h) / np.arange(1, h.size + 1)
                aps[k].append(prec[h].mean() if h.any() else 0.0)
        return np.array(ranks), {k: np.mean(v) for k, v in aps.items()}

    out = {}
    for name, scores, positives, rel in (
        ("i2t", scores_i2t, lambda q: np.flatnonzero(cap == q), rel_img[:, cap]),
        ("t2i", scores_t2i, lambda q: [cap[q]], rel_img[cap]),
    ):
        ranks, aps = direction(scores, positives, rel)
        out.update({f"{name}_R@{k}": 100.0 * np.mean(ranks < k) for k in ks})
        out[f"{name}_MedianR"] = np.floor(np.median(ranks)) + 1
        out[f"{name}_MeanR"] = ranks.mean() + 1
        out.update({f"{name}_mAP@{'N' if k is None else k}": v for k, v in aps.items()})
    return out


def assert_same(got, ref, tol=1e-6):
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, abs=tol), key


def random_codes(rng, n, bits):
    return np.where(rng.random((n, bits)) < 0.5, -1.0, 1.0).astype(np.float32)


def hamming_distances(a, b):
    return (a[:, None, :] != b[None, :, :]).sum(-1)


# --------------------------------------------------------------------------
# evaluate vs fico_itr
# --------------------------------------------------------------------------
@pytest.mark.parametrize("measure", ["cosine", "inner_product", "euclidean"])
def test_evaluate_matches_fico_variable_shuffled_captions(measure, fico):
    img, txt, cap, labels = make_data(seed=1)
    got = evaluate(img, txt, cap, labels, measure=measure)
    ref = fico_reference(fico, fico.compute_similarity(img, txt, measure), cap, labels)
    assert_same(got, ref)
    assert list(got) == metric_names()
    assert all(type(v) is float for v in got.values())
    rsum = sum(got[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert got["rsum"] == pytest.approx(rsum)
    assert 0 < got["i2t_mAP@N"] < 1 and 0 < got["t2i_R@1"] < 100  # a non-trivial case


def test_evaluate_matches_fico_five_in_order_and_torch_inputs(fico):
    rng = np.random.default_rng(2)
    img = rng.standard_normal((30, 8))
    cap = np.repeat(np.arange(30), 5)
    txt = img[cap] + rng.standard_normal((150, 8))
    labels = (rng.random((30, 4)) < 0.4).astype(np.int64)
    got = evaluate(torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(cap), torch.from_numpy(labels))
    assert_same(got, fico_reference(fico, fico.compute_similarity(img, txt, "cosine"), cap, labels))


def test_evaluate_float32_equals_fico_on_the_same_float32_scores(fico):
    """The fast int64-key path (float32 scores) against fico on float32 features."""
    img, txt, cap, labels = make_data(seed=3, n=60, dim=32, dtype=np.float32)
    got = evaluate(img, txt, cap, labels, measure="inner_product")
    assert_same(got, fico_reference(fico, fico.compute_similarity(img, txt, "inner_product"), cap, labels))


@pytest.mark.filterwarnings("ignore:Transposing similarity matrix")
def test_hamming_equals_fico_on_index_jittered_scores(fico):
    """fico on -distance minus a tiny index jitter: tie-free scores that encode our tie rule."""
    rng = np.random.default_rng(4)
    n, bits = 30, 12  # 12 bits: ties everywhere
    cap = np.repeat(np.arange(n), rng.integers(1, 6, n))
    rng.shuffle(cap)
    img_codes = random_codes(rng, n, bits)
    txt_codes = np.where(rng.random((len(cap), bits)) < 0.2, -img_codes[cap], img_codes[cap])
    labels = (rng.random((n, 5)) < 0.3).astype(np.int64)
    d = hamming_distances(img_codes > 0, txt_codes > 0).astype(np.float64)
    eps = 0.5 / len(cap)
    sim_i2t = -d - eps * np.arange(d.shape[1])[None, :]  # captions x index
    sim_t2i = -d.T - eps * np.arange(d.shape[0])[None, :]  # images x index
    got = evaluate(img_codes, txt_codes, cap, labels, measure="hamming")
    assert_same(got, fico_reference(fico, sim_i2t, cap, labels, sim_t2i=sim_t2i))


def test_hamming_equals_brute_force_stable_sort():
    rng = np.random.default_rng(5)
    n, bits = 25, 10
    cap = np.repeat(np.arange(n), rng.integers(1, 5, n))
    rng.shuffle(cap)
    img_codes, txt_codes = random_codes(rng, n, bits), random_codes(rng, len(cap), bits)
    labels = (rng.random((n, 4)) < 0.35).astype(np.int64)
    d = hamming_distances(img_codes > 0, txt_codes > 0)
    ref = brute_force(-d, -d.T, cap, labels)
    got = evaluate(pack_codes(torch.from_numpy(img_codes)), pack_codes(torch.from_numpy(txt_codes)), cap,
                   labels, measure="hamming", map_ks=MAP_KS + (3,))
    assert_same(got, ref)
    assert got["i2t_mAP@3"] == pytest.approx(brute_force(-d, -d.T, cap, labels, map_ks=(3,))["i2t_mAP@3"])


# --------------------------------------------------------------------------
# the tie rule, pinned
# --------------------------------------------------------------------------
# 3 images, 6 captions; labels: image 0 {A}, image 1 {B}, image 2 {A}.
TIE_CAP = np.array([2, 0, 1, 0, 2, 1])
TIE_LABELS = np.array([[1, 0], [0, 1], [1, 0]])
# With all scores equal, every gallery is in index order:
# i2t ranks = first own caption = [1, 2, 0]; t2i ranks = caption_image = [2, 0, 1, 0, 2, 1].
# i2t AP@N: image 0 -> captions 0..5 relevant [1,1,0,1,1,0] -> (1 + 1 + 3/4 + 4/5) / 4 = 0.8875,
#   image 1 -> [0,0,1,0,0,1] -> (1/3 + 2/6) / 2 = 1/3, image 2 as image 0.
# t2i AP@N: label A -> images [1,0,1] -> (1 + 2/3) / 2 = 5/6; label B -> [0,1,0] -> 1/2.
TIE_EXPECTED = {
    "i2t_R@1": 100 / 3, "i2t_R@5": 100.0, "i2t_MedianR": 2.0, "i2t_MeanR": 2.0,
    "t2i_R@1": 100 / 3, "t2i_R@5": 100.0, "t2i_MedianR": 2.0, "t2i_MeanR": 2.0,
    "i2t_mAP@N": (0.8875 + 1 / 3 + 0.8875) / 3, "i2t_mAP@2": 2 / 3,
    "t2i_mAP@N": (4 * 5 / 6 + 2 * 0.5) / 6, "t2i_mAP@1": 4 / 6,
}


@pytest.mark.parametrize("kind", ["inner_product_zeros", "cosine_equal", "hamming_equal", "hamming_packed"])
def test_tie_rule_constant_scores(kind):
    if kind == "inner_product_zeros":
        img, txt, measure = np.zeros((3, 4), np.float32), np.zeros((6, 4), np.float32), "inner_product"
    elif kind == "cosine_equal":
        img, txt, measure = np.ones((3, 4), np.float32), np.ones((6, 4), np.float32), "cosine"
    elif kind == "hamming_equal":
        img, txt, measure = np.ones((3, 16)), np.ones((6, 16)), "hamming"
    else:
        img, txt, measure = np.full((3, 2), 0xA5, np.uint8), np.full((6, 2), 0xA5, np.uint8), "hamming"
    map_ks = (None, 2, 1)
    got = evaluate(img, txt, TIE_CAP, TIE_LABELS, measure=measure, ks=(1, 5), map_ks=map_ks)
    assert_same(got, {k: v for k, v in TIE_EXPECTED.items() if k in got}, tol=1e-12)
    assert {"i2t_mAP@2", "t2i_mAP@1", "i2t_mAP@N"} <= set(got)
    # without labels the ranks come from counting instead of sorting: same rule
    no_labels = evaluate(img, txt, TIE_CAP, None, measure=measure, ks=(1, 5))
    assert_same(no_labels, {k: v for k, v in TIE_EXPECTED.items() if k in no_labels}, tol=1e-12)


def test_tie_rule_partial_ties_between_codes():
    """Two captions at the same distance: the smaller caption index ranks first."""
    img = np.array([[1, 1, 1, 1, 1, 1, 1, 1]], np.float32)
    txt = np.array([[1, 1, 1, 1, 1, 1, 1, -1],   # distance 1
                    [1, 1, 1, 1, 1, 1, -1, -1],  # distance 2
                    [1, 1, 1, 1, 1, 1, 1, -1]],  # distance 1, tie with caption 0
                   np.float32)
    scores, idx = topk_search(img, txt, 3, "hamming")
    assert idx.tolist() == [[0, 2, 1]] and scores.tolist() == [[-1, -1, -2]]
    # image 0 owns caption 2 only, tied with caption 0 which comes first: rank 1;
    # image 1 (the complement) owns captions 0 and 1 and ranks caption 1 first: rank 0
    got = evaluate(np.concatenate([img, -img]), txt, np.array([1, 1, 0]), None, measure="hamming", ks=(1, 2))
    assert got["i2t_R@1"] == 50.0 and got["i2t_R@2"] == 100.0


# --------------------------------------------------------------------------
# invariances: chunking, threads, kernels, code formats, score dtypes
# --------------------------------------------------------------------------
def test_chunk_size_threads_and_torch_kernels_do_not_change_results(monkeypatch):
    img, txt, cap, labels = make_data(seed=6, n=50, dim=24, dtype=np.float32)
    m = len(cap)
    base = evaluate(img, txt, cap, labels)
    for chunk in (1, m + 1, 7 * m + 3, 10**9):
        for threads in (1, 2):
            assert evaluate(img, txt, cap, labels, chunk_size=chunk, num_threads=threads) == base
    monkeypatch.setattr(ranking_mod, "_SUB_BLOCK", 3 * m)  # several CPU sub-blocks per block
    assert evaluate(img, txt, cap, labels, chunk_size=10 * m) == base
    monkeypatch.setattr(ranking_mod, "_REL_CACHE", 0)  # relevance without the N x N cache
    assert evaluate(img, txt, cap, labels) == base
    monkeypatch.setattr(protocol_mod, "_FORCE_TORCH", True)  # the GPU kernels, run on CPU
    assert evaluate(img, txt, cap, labels, chunk_size=5 * m) == pytest.approx(base, abs=1e-12)


@pytest.mark.parametrize("bits", [16, 60])
def test_packed_pm1_and_01_codes_give_identical_results(bits, monkeypatch):
    rng = np.random.default_rng(7)
    img_codes = random_codes(rng, 20, bits)
    cap = rng.permutation(np.repeat(np.arange(20), 3))
    txt_codes = np.where(rng.random((60, bits)) < 0.3, -img_codes[cap], img_codes[cap])
    labels = (rng.random((20, 3)) < 0.4).astype(np.int64)
    pm1 = evaluate(img_codes, txt_codes, cap, labels, measure="hamming")
    packed = evaluate(pack_codes(img_codes), pack_codes(txt_codes), cap, labels, measure="hamming")
    zero_one = evaluate(img_codes > 0, torch.from_numpy((txt_codes > 0).astype(np.float32)), cap, labels,
                        measure="hamming")
    assert pm1 == packed == zero_one
    monkeypatch.setattr(protocol_mod, "_FORCE_TORCH", True)
    assert evaluate(img_codes, txt_codes, cap, labels, measure="hamming") == pytest.approx(pm1, abs=1e-12)


def test_int64_key_path_equals_stable_argsort_path_with_ties():
    """Small-integer features: float32 and float64 scores are equal and tie a lot."""
    rng = np.random.default_rng(8)
    img = rng.integers(-2, 3, (30, 4)).astype(np.float64)
    cap = rng.permutation(np.repeat(np.arange(30), 4))
    txt = rng.integers(-2, 3, (120, 4)).astype(np.float64)
    labels = (rng.random((30, 3)) < 0.4).astype(np.int64)
    f64 = evaluate(img, txt, cap, labels, measure="inner_product", map_ks=(1, 10, None))
    f32 = evaluate(img.astype(np.float32), txt.astype(np.float32), cap, labels, measure="inner_product",
                   map_ks=(1, 10, None))
    ref = brute_force(img @ txt.T, txt @ img.T, cap, labels, map_ks=(1, 10, None))
    assert_same(f64, ref, tol=1e-12)
    assert_same(f32, ref, tol=1e-12)


def test_no_labels_gives_instance_metrics_only():
    img, txt, cap, _ = make_data(seed=9)
    got = evaluate(img, txt, cap)
    assert list(got) == metric_names(with_map=False)
    with_labels = evaluate(img, txt, cap, np.ones((len(img), 1)))
    assert all(got[k] == with_labels[k] for k in got)
    assert with_labels["i2t_mAP@N"] == 1.0  # everything relevant


def test_invalid_inputs_raise():
    img, txt, cap, _ = make_data(seed=10, n=5)
    with pytest.raises(ValueError, match="no caption"):
        evaluate(np.concatenate([img, img[:1]]), txt, cap)
    with pytest.raises(ValueError, match="NaN"):
        evaluate(np.where(np.arange(img.size).reshape(img.shape) == 3, np.nan, img), txt, cap)
    with pytest.raises(TypeError):
        evaluate(img, txt, cap.astype(np.float32))
    with pytest.raises(ValueError):
        evaluate(img, txt, cap, measure="manhattan")


# --------------------------------------------------------------------------
# retrieval primitives
# --------------------------------------------------------------------------
def test_pack_unpack_conventions():
    codes = torch.tensor([[1.0, -1, 0, 0.3, -0.2, 1, 1, -1, -1, 1]])  # real values: sign, 0 -> +1
    packed = pack_codes(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 2)
    assert packed.tolist() == [[0b10110110, 0b01000000]]  # MSB first, zero padded
    assert np.array_equal(packed.numpy(), np.packbits((codes >= 0).numpy(), axis=1))
    assert unpack_codes(packed, 10).tolist() == [[1.0, -1, 1, 1, -1, 1, 1, -1, -1, 1]]
    zero_one = torch.tensor([[0, 1, 1, 0, 0, 0, 0, 1]])
    assert pack_codes(zero_one).tolist() == [[0b01100001]]  # 0/1 codes: 0 -> bit 0
    assert pack_codes(zero_one, zero_one=False).tolist() == [[0b11111111]]
    assert torch.equal(unpack_codes(pack_codes(zero_one), 8, signed=False).long(), zero_one)


@pytest.mark.parametrize("bits", [64, 77, 256])
def test_hamming_kernels_are_exact(bits):
    """Both kernels: XOR + popcount (CPU) and the ±1 matmul (other devices)."""
    rng = np.random.default_rng(11)
    a, b = rng.random((13, bits)) < 0.5, rng.random((1700, bits)) < 0.5
    want = -hamming_distances(a, b)
    got = score_chunk(pack_codes(torch.from_numpy(a)), torch.from_numpy(b), "hamming")
    assert got.dtype == torch.int32 and np.array_equal(got.numpy(), want)
    qa, gb = prepare(torch.from_numpy(a), "hamming"), prepare(torch.from_numpy(b), "hamming")
    assert qa.shape[1] % 8 == 0
    assert np.array_equal(scores_mod._hamming_matmul(qa, gb).numpy(), want)
    assert np.array_equal(scores_mod._hamming_popcount(qa.numpy(), gb.numpy()), want)


@pytest.mark.parametrize("torch_kernels", [False, True])
@pytest.mark.parametrize("measure", ["cosine", "euclidean", "inner_product", "hamming"])
def test_topk_search_equals_stable_full_sort(measure, torch_kernels, monkeypatch):
    monkeypatch.setattr(exhaustive_mod, "_FORCE_TORCH", torch_kernels)  # GPU path, run on CPU
    rng = np.random.default_rng(12)
    if measure == "hamming":
        q, g = random_codes(rng, 9, 8), random_codes(rng, 203, 8)  # heavy ties
    elif measure == "inner_product":  # small integers: exact in any summation order, so ties
        q = rng.integers(-3, 4, (9, 5)).astype(np.float32)  # between gallery blocks stay exact ties
        g = rng.integers(-3, 4, (203, 5)).astype(np.float32)
        g[50:60] = g[0]
    else:
        q = rng.standard_normal((9, 5)).astype(np.float32)
        g = np.round(rng.standard_normal((203, 5)), 1).astype(np.float32)
        # exact ties inside one block of every chunk size below: BLAS may round a row's score in one
        # block shape differently from the same row's in another (seen on AMD EPYC with chunk 1)
        g[52:60] = g[51]
    full = score_chunk(q, g, measure)
    want = torch.sort(full, dim=1, descending=True, stable=True).indices[:, :17]
    for chunk in (None, 1, 50, 203 * 4 + 1):
        scores, idx = topk_search(q, g, 17, measure, chunk_size=chunk)
        assert torch.equal(idx, want), chunk
        if measure == "hamming":
            assert torch.equal(scores, full.gather(1, want))
        else:  # BLAS may round differently for other block shapes
            torch.testing.assert_close(scores, full.gather(1, want), rtol=1e-6, atol=1e-6)
    s64, i64 = topk_search(q.astype(np.float64), g.astype(np.float64), 17, "inner_product", chunk_size=40)
    assert torch.equal(i64, torch.sort(torch.from_numpy(q.astype(np.float64) @ g.T.astype(np.float64)),
                                       dim=1, descending=True, stable=True).indices[:, :17])


# --------------------------------------------------------------------------
# RetrievalMetrics
# --------------------------------------------------------------------------
def shuffled_updates(img, txt, cap, labels, seed):
    """Updates in random order with ids, duplicates and image-only / text-only pieces."""
    rng = np.random.default_rng(seed)
    img_ids = 1000 + 7 * np.arange(len(img))  # ids are not positions
    txt_ids = 5 + 3 * np.arange(len(txt))
    items = [("img", i) for i in range(len(img))] + [("txt", j) for j in range(len(txt))]
    items += [items[i] for i in rng.choice(len(items), 15)]  # duplicates
    rng.shuffle(items)
    pieces = np.split(np.arange(len(items)), np.sort(rng.choice(np.arange(1, len(items)), 12, replace=False)))
    for piece in pieces:
        ii = np.array([i for kind, i in (items[p] for p in piece) if kind == "img"], dtype=np.int64)
        tt = np.array([j for kind, j in (items[p] for p in piece) if kind == "txt"], dtype=np.int64)
        yield dict(image_feats=torch.from_numpy(img[ii]) if ii.size else None,
                   image_ids=torch.from_numpy(img_ids[ii]),
                   image_labels=None if labels is None else torch.from_numpy(labels[ii]),
                   text_feats=torch.from_numpy(txt[tt]), text_ids=torch.from_numpy(txt_ids[tt]),
                   text_image_ids=torch.from_numpy(img_ids[cap[tt]]))


@pytest.mark.parametrize("measure", ["cosine", "hamming"])
def test_retrieval_metrics_dedups_and_orders_by_id(measure):
    img, txt, cap, labels = make_data(seed=13, n=30, dtype=np.float32)
    if measure == "hamming":
        img, txt = np.sign(img), np.sign(txt)
    want = evaluate(img, txt, cap, labels, measure=measure)
    metric = RetrievalMetrics(measure=measure)
    for update in shuffled_updates(img, txt, cap, labels, seed=14):
        metric.update(**update)
    assert metric.compute() == pytest.approx(want, abs=1e-12)
    metric.reset()
    for update in shuffled_updates(img, txt, cap, None, seed=15):
        metric.update(**update)
    assert metric.compute() == pytest.approx(evaluate(img, txt, cap, measure=measure), abs=1e-12)


def test_retrieval_metrics_caption_of_unseen_image_raises():
    metric = RetrievalMetrics()
    metric.update(torch.randn(2, 4), torch.tensor([1, 2]), None,
                  torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.tensor([1, 2, 9]))
    with pytest.raises(ValueError, match="never seen"):
        metric.compute()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():
    img, txt, cap, labels = make_data(seed=16, n=60, dim=32, dtype=np.float32)
    for measure in ("cosine", "hamming"):
        a, b = (np.sign(img), np.sign(txt)) if measure == "hamming" else (img, txt)
        cpu = evaluate(a, b, cap, labels, measure=measure)
        gpu = evaluate(torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda(), torch.from_numpy(cap).cuda(),
                       torch.from_numpy(labels).cuda(), measure=measure, chunk_size=1000)
        assert gpu == pytest.approx(cpu, abs=1e-9)
    metric = RetrievalMetrics().cuda()
    for update in shuffled_updates(img, txt, cap, labels, seed=17):
        metric.update(**{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in update.items()})
    assert metric.compute() == pytest.approx(evaluate(img, txt, cap, labels), abs=1e-9)


# --------------------------------------------------------------------------
# DDP: 2 gloo processes
# --------------------------------------------------------------------------
def _ddp_worker(rank, world, store_path, out_path, data):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        img, txt, cap, labels = data
        results = []
        # scenario 1: disjoint, uneven shards (rank 0: 2/3 of images, 1/4 of captions), several updates
        metric = RetrievalMetrics()
        img_ids, txt_ids = np.arange(len(img)) * 10, np.arange(len(txt)) + 100
        img_part = np.arange(len(img)) < (2 * len(img)) // 3
        txt_part = np.arange(len(txt)) < len(txt) // 4
        mine_i = np.flatnonzero(img_part if rank == 0 else ~img_part)
        mine_t = np.flatnonzero(txt_part if rank == 0 else ~txt_part)
        for ii, tt in zip(np.array_split(mine_i, 3), np.array_split(mine_t, 3)):
            metric.update(torch.from_numpy(img[ii]), torch.from_numpy(img_ids[ii]), torch.from_numpy(labels[ii]),
                          torch.from_numpy(txt[tt]), torch.from_numpy(txt_ids[tt]),
                          torch.from_numpy(img_ids[cap[tt]]))
        results.append(metric.compute())
        # scenario 2: rank 1 never sees any data
        metric = RetrievalMetrics(measure="hamming")
        if rank == 0:
            metric.update(torch.from_numpy(np.sign(img)), torch.from_numpy(img_ids), torch.from_numpy(labels),
                          torch.from_numpy(np.sign(txt)), torch.from_numpy(txt_ids),
                          torch.from_numpy(img_ids[cap]))
        results.append(metric.compute())
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


def test_retrieval_metrics_ddp_two_gloo_processes():
    img, txt, cap, labels = make_data(seed=18, n=24, dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.pt")
        # torch.multiprocessing.spawn's machinery with the "fork" start method where
        # available: "spawn" re-imports torch and torchmetrics in each child (15-30 s
        # on this busy 2-core machine instead of ~2 s); the children set one thread.
        method = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else "spawn"
        torch.multiprocessing.start_processes(
            _ddp_worker, args=(2, os.path.join(tmp, "store"), out_path, (img, txt, cap, labels)),
            nprocs=2, join=True, start_method=method)
        sharded, rank0_only = torch.load(out_path)
    assert sharded == pytest.approx(evaluate(img, txt, cap, labels), abs=1e-12)
    assert rank0_only == pytest.approx(evaluate(np.sign(img), np.sign(txt), cap, labels, measure="hamming"),
                                       abs=1e-12)
