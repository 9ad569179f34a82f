"""Hybrid retrieval: hash screen + fine-grained re-rank, screeners, galleries with distractors."""
import numpy as np
import pytest
import torch

from pipeline.comparison.galleries import build_gallery
from pipeline.comparison.hybrid import first_hit_ranks, hybrid_search, recall_at, rerank
from pipeline.comparison.screeners import distill
from pipeline.evaluation.exhaustive import topk_search
from pipeline.evaluation.hamming import hamming_topk
from pipeline.evaluation.scores import pack_codes
from pipeline.metrics import evaluate


def _hybrid_data(seed=0, n=300, d=32, bits=16):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, d))
    q = g[rng.integers(0, n, 40)] + 0.5 * rng.standard_normal((40, d))
    planes = rng.standard_normal((d, bits))
    return q, g, pack_codes(torch.from_numpy(q @ planes)), pack_codes(torch.from_numpy(g @ planes))


def test_hybrid_with_K_equal_to_the_gallery_is_the_fine_grained_ranking():
    q, g, qc, gc = _hybrid_data()
    _, idx, _ = hybrid_search(qc, gc, q, g, K=len(g))
    _, ref = topk_search(q, g, len(g), "cosine")  # float64: exact scores, ties by index
    assert torch.equal(idx, ref)


def test_hybrid_with_K_1_is_the_hash_rankings_first_hit():
    q, g, qc, gc = _hybrid_data(seed=1, bits=8)  # 8 bits: many Hamming ties, the tie rule matters
    _, idx, sec = hybrid_search(qc, gc, q, g, K=1)
    _, ref = topk_search(qc, gc, 1, "hamming")
    assert torch.equal(idx, ref) and set(sec) == {"screen", "rerank"}


def test_hybrid_on_real_tiny_models(tiny_runs):
    """The real models' embeddings, rounded to a 2**-12 grid: every dot product is then exact in float64
    whatever the BLAS path, so scores are bit-identical between the re-rank and the exhaustive search and
    the equality is exact, real ties (a 1-epoch model has many) decided by the tie rule."""
    from pipeline.inference.encoding import encode_split
    from pipeline.inference.runs import load_run

    fg = encode_split(load_run(tiny_runs["fine_grained"]), progress=False)
    hs = encode_split(load_run(tiny_runs["hash_64bit"]), progress=False)
    q, g = (np.round(x.astype(np.float64) * 4096) / 4096 for x in (fg.text, fg.image))
    _, idx, _ = hybrid_search(hs.text_gallery, hs.image_gallery, q, g, K=len(g), measure="inner_product")
    assert torch.equal(idx, topk_search(q, g, len(g), "inner_product")[1])
    _, idx1, _ = hybrid_search(hs.text_gallery, hs.image_gallery, q, g, K=1, measure="inner_product")
    assert torch.equal(idx1, topk_search(hs.text_gallery, hs.image_gallery, 1, "hamming")[1])
    # the full re-ranked list gives the protocol's t2i R@K
    ranks = first_hit_ranks(idx.numpy(), np.arange(len(g)), fg.caption_image)
    ref = evaluate(g, q, fg.caption_image, measure="inner_product", ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert recall_at(ranks, [k])[f"R@{k}"] == pytest.approx(ref[f"t2i_R@{k}"])


def test_rerank_orders_equal_scores_by_gallery_index():
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.5, 0.5]])
    q = torch.tensor([[1.0, 0.0]])
    s, i = rerank(q, g, torch.tensor([[3, 4, 0, 2]]), "inner_product")
    assert i.tolist() == [[0, 2, 3, 4]] and s[0, 0] == 1.0


def test_gallery_with_distractors_keeps_the_test_items_and_owners():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((50, 8)).astype(np.float32)
    cont = np.tanh(rng.standard_normal((50, 16))).astype(np.float32)
    packed = pack_codes(torch.from_numpy(cont)).numpy()
    gal = build_gallery(feats, np.arange(50), 1000, seed=3, run_codes={"h": (cont, packed)})
    real = np.flatnonzero(gal.owner >= 0)
    assert len(gal.owner) == 1000 and len(real) == 50 and real.max() > 50  # spread, not at the front
    order = gal.owner[real]
    assert np.allclose(gal.feats[real].numpy(), feats[order] / np.linalg.norm(feats[order], axis=1, keepdims=True),
                       atol=1e-6)
    assert np.array_equal(gal.codes["h"][real], packed[order])
    assert np.allclose(gal.feats.norm(dim=1).numpy(), 1.0, atol=1e-5)
    again = build_gallery(feats, np.arange(50), 1000, seed=3, run_codes={"h": (cont, packed)})
    assert torch.equal(gal.feats, again.feats)


def test_distilled_screener_finds_instances_that_simhash_misses():
    """Captions = their image + noise in a 64-d space: a 32-bit distilled screener must put the true
    image among its top 10 far more often than 32 random hyperplanes (no training) do."""
    from pipeline.comparison.screeners import SimHash

    rng = np.random.default_rng(0)
    img = rng.standard_normal((400, 64)).astype(np.float32)
    cap = np.repeat(np.arange(400), 2)
    txt = img[cap] + 1.2 * rng.standard_normal((800, 64)).astype(np.float32)
    model = distill(img, txt, cap, bits=32, steps=300, batch_size=128, hidden=256, seed=0)
    recalls = {}
    for name, s in (("distilled", model), ("simhash", SimHash(64, 32))):
        _, idx = hamming_topk(s.codes(txt, "text"), s.codes(img, "image"), 10)
        recalls[name] = recall_at(first_hit_ranks(idx.numpy(), np.arange(400), cap), [10])["R@10"]
    assert recalls["distilled"] > recalls["simhash"] + 10, recalls
