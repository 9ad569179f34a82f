"""The protocol on supplied score blocks, the two-stage ranking (screen top K, re-rank, the rest in screen
order), token-level evaluation and its Metric, on one process and on 2 gloo processes."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch

from pipeline.evaluation.protocol import evaluate, evaluate_blocks, metric_names
from pipeline.evaluation.screened import two_stage
from pipeline.evaluation.token_level import evaluate_tokens
from pipeline.evaluation.token_metric import TokenRetrievalMetrics
from pipeline.models.token_scorers import LateInteraction, TokenSet


def _data(seed=0, n=12, dim=6):
    """Images with 1-4 captions each (shuffled), labels, and score matrices full of ties."""
    rng = np.random.default_rng(seed)
    cap = np.repeat(np.arange(n), rng.integers(1, 5, n))
    rng.shuffle(cap)
    img = rng.standard_normal((n, dim))
    txt = img[cap] + 0.8 * rng.standard_normal((len(cap), dim))
    labels = (rng.random((n, 4)) < 0.4).astype(np.int64)
    fine = torch.from_numpy(np.round(img @ txt.T)).float()  # integers: many exact ties
    screen = torch.from_numpy(np.round(2 * rng.standard_normal((n, len(cap))) + img @ txt.T / 3)).float()
    return cap, labels, fine, screen


def _blocks(matrix):
    return (lambda a, b: matrix[a:b].clone()), (lambda a, b: matrix[:, a:b].T.contiguous())


def _rerank(matrix, queries_are_images):
    def rerank(a, b, cand):
        rows = torch.arange(a, b)[:, None].expand_as(cand)
        return matrix[rows, cand] if queries_are_images else matrix.T[rows, cand]

    return rerank


def _two_stage_blocks(fine, screen, k):
    s_i2t, s_t2i = _blocks(screen)
    return (two_stage(s_i2t, _rerank(fine, True), k), two_stage(s_t2i, _rerank(fine, False), k))


def test_blocks_equal_evaluate_on_the_same_scores():
    cap, labels, fine, _ = _data()
    img = torch.randn(len(labels), 5, dtype=torch.float64)
    txt = img[torch.from_numpy(cap)] + torch.randn(len(cap), 5, dtype=torch.float64)
    scores = img @ txt.T
    got = evaluate_blocks(*_blocks(scores), len(labels), cap, labels, chunk_size=17)  # many small blocks
    assert got == pytest.approx(evaluate(img, txt, cap, labels, measure="inner_product"), abs=1e-12)
    assert list(got) == metric_names()


def test_two_stage_with_k_equal_to_the_gallery_is_exhaustive():
    cap, labels, fine, screen = _data(seed=1)
    exhaustive = evaluate_blocks(*_blocks(fine), len(labels), cap, labels)
    k_all = max(fine.shape)
    assert evaluate_blocks(*_two_stage_blocks(fine, screen, k_all), len(labels), cap, labels) == exhaustive
    # and a shallow screen is a different ranking (the test can tell them apart)
    assert evaluate_blocks(*_two_stage_blocks(fine, screen, 2), len(labels), cap, labels) != exhaustive


def _tie_rule_order(row):
    return sorted(range(len(row)), key=lambda j: (-float(row[j]), j))


@pytest.mark.parametrize("k", [1, 3, 7])
def test_two_stage_order_top_k_re_ranked_and_the_screen_order_below(k):
    """Sorting a block by the tie rule gives: the screen's top k (by its own tie rule), ordered by the
    re-ranking score (ties by index), then every other item in the screen's order."""
    _, _, fine, screen = _data(seed=2)
    block = two_stage(lambda a, b: screen[a:b].clone(), _rerank(fine, True), k)(0, fine.shape[0])
    for q in range(fine.shape[0]):
        screen_order = _tie_rule_order(screen[q])
        top = sorted(screen_order[:k], key=lambda j: (-float(fine[q, j]), j))
        assert _tie_rule_order(block[q]) == top + screen_order[k:]


def _token_data(seed=3, n=10, dim=4):
    """Integer-valued token sets (every score exact in float32 on every path) with padding, one screen."""
    gen = torch.Generator().manual_seed(seed)
    cap = torch.repeat_interleave(torch.arange(n), torch.randint(1, 4, (n,), generator=gen))
    m = len(cap)
    img_tok = torch.randint(-2, 3, (n, 3, dim), generator=gen).float()
    txt_tok = img_tok[cap][:, torch.tensor([0, 1, 2, 0, 1])] + torch.randint(-1, 2, (m, 5, dim), generator=gen)
    img_mask = torch.arange(3)[None] < torch.randint(1, 4, (n, 1), generator=gen)
    txt_mask = torch.arange(5)[None] < torch.randint(1, 6, (m, 1), generator=gen)
    screen_img, screen_txt = torch.randn(n, 8, generator=gen), torch.randn(m, 8, generator=gen)
    labels = torch.randint(0, 2, (n, 3), generator=gen)
    return img_tok, img_mask, txt_tok, txt_mask, cap, labels, screen_img, screen_txt


SCORER = LateInteraction("both")


def _grid(it, im, tt, tm):
    return SCORER(TokenSet(it, im), TokenSet(tt, tm))


def _pairs(it, im, tt, tm):
    return SCORER.pairs(TokenSet(it, im), TokenSet(tt, tm))


def _evaluate_token_data(data, **kwargs):
    img_tok, img_mask, txt_tok, txt_mask, cap, labels, screen_img, screen_txt = data
    return evaluate_tokens(img_tok, img_mask, txt_tok, txt_mask, cap, _grid, _pairs, image_labels=labels,
                           screen_image=screen_img, screen_text=screen_txt, **kwargs)


def test_token_evaluation_screened_at_full_depth_equals_exhaustive():
    data = _token_data()
    exhaustive = _evaluate_token_data(data, mode="exhaustive")
    assert _evaluate_token_data(data, mode="screened", k=len(data[4])) == exhaustive
    # the exhaustive numbers are the protocol's on the scorer's full matrix
    img_tok, img_mask, txt_tok, txt_mask, cap, labels, _, _ = data
    full = _grid(img_tok, img_mask, txt_tok, txt_mask)
    assert exhaustive == evaluate_blocks(*_blocks(full), len(img_tok), cap, labels)


def test_token_evaluation_screened_equals_a_brute_force_two_stage_ranking():
    data = _token_data(seed=4)
    img_tok, img_mask, txt_tok, txt_mask, cap, labels, screen_img, screen_txt = data
    fine = _grid(img_tok, img_mask, txt_tok, txt_mask)
    screen = torch.nn.functional.normalize(screen_img, dim=1) @ torch.nn.functional.normalize(screen_txt, dim=1).T
    k = 3

    def ranks(fine_rows, screen_rows, positive):
        out = []
        for q in range(fine_rows.shape[0]):
            order = _tie_rule_order(screen_rows[q])
            order = sorted(order[:k], key=lambda j: (-float(fine_rows[q, j]), j)) + order[k:]
            out.append(min(order.index(int(p)) for p in positive(q)))
        return np.array(out)

    i2t = ranks(fine, screen, lambda q: torch.nonzero(cap == q).flatten())
    t2i = ranks(fine.T, screen.T, lambda q: [cap[q]])
    got = _evaluate_token_data(data, mode="screened", k=k)
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for kk in (1, 5, 10):
            assert got[f"{name}_R@{kk}"] == pytest.approx(100.0 * np.mean(r < kk))
        assert got[f"{name}_MeanR"] == pytest.approx(r.mean() + 1)


def _metric_updates(metric, data, parts):
    """Feed `metric` the (image rows, caption rows) of each part; each part's captions padded only to their
    own longest (batches differ in token length)."""
    img_tok, img_mask, txt_tok, txt_mask, cap, labels, screen_img, screen_txt = data
    for ii, tt in parts:
        length = int(txt_mask[tt].sum(1).max())
        metric.update(screen_img[ii], ii * 10, labels[ii], screen_txt[tt], tt + 100, cap[tt] * 10,
                      img_tok[ii], img_mask[ii], txt_tok[tt, :length], txt_mask[tt, :length])


def _parts(n, m, rank=None):
    img_rows, txt_rows = torch.arange(n), torch.arange(m)
    if rank is not None:
        img_rows, txt_rows = img_rows[rank::2], txt_rows[(1 - rank)::2]
    return list(zip(torch.tensor_split(img_rows, 3), torch.tensor_split(txt_rows, 3)))


@pytest.mark.parametrize("mode", ["exhaustive", "screened"])
def test_token_metric_equals_evaluate_tokens(mode):
    data = _token_data(seed=5)
    metric = TokenRetrievalMetrics(_grid, _pairs, mode=mode, k=3)
    _metric_updates(metric, data, _parts(len(data[0]), len(data[4])))
    assert metric.compute() == _evaluate_token_data(data, mode=mode, k=3)


def _ddp_worker(rank, world, store_path, out_path, data):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        metric = TokenRetrievalMetrics(_grid, _pairs, mode="screened", k=3)
        _metric_updates(metric, data, _parts(len(data[0]), len(data[4]), rank))
        result = metric.compute()
        if rank == 0:
            torch.save(result, out_path)
    finally:
        dist.destroy_process_group()


def test_token_metric_ddp_two_gloo_processes_with_different_token_lengths():
    data = _token_data(seed=6)
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.pt")
        method = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else "spawn"
        torch.multiprocessing.start_processes(_ddp_worker, args=(2, os.path.join(tmp, "store"), out_path, data),
                                              nprocs=2, join=True, start_method=method)
        result = torch.load(out_path)
    assert result == _evaluate_token_data(data, mode="screened", k=3)
