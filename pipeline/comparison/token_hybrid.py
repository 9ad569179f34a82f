"""Hybrid retrieval for token-level runs: a screen picks each query's top K, the token scorer re-ranks
them (the two-stage ranking of `pipeline.evaluation.screened`), against exhaustive token scoring.

Screens: hashing runs on the same test split (Hamming top K on packed codes), screeners derived from the
run's global embedding (distilled, SimHash: `screeners.py`), and the global embedding itself (cosine top
K: the run's own `screened` mode). Quality is the protocol's on every test query (the items outside the
top K keep the screen's order, so R@K counts them too); time per query is measured on a fixed sample:
screen + re-rank against exhaustive token scoring, every method timed in the same process.

On the test split only: token sets cannot be sampled as distractors from a fitted distribution.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.comparison.cascade import PrefixScreen
from pipeline.comparison.hybrid_table import hybrid_row
from pipeline.comparison.measure import median_seconds
from pipeline.evaluation.hamming import hamming_topk
from pipeline.evaluation.protocol import evaluate_blocks, feature_blocks
from pipeline.evaluation.scores import prepare
from pipeline.evaluation.screened import pair_rerank, two_stage
from pipeline.inference.encoding import EncodedSplit
from pipeline.inference.runs import Run


TOKEN_HYBRID_NOTE = (
    "Token-level runs: the reference is `token exhaustive` (every pair scored by the run's token scorer); each "
    "screen's top K is re-ranked by the token scorer and the rest of the gallery keeps the screen's order "
    "(`pipeline/evaluation/screened.py`); `global embedding (cosine)` is the run's own screened mode. On the test "
    "split only: token sets cannot be drawn as distractors.")



def _screen_inputs(screener, enc: EncodedSplit):
    """(image-side, caption-side) screen inputs and their measure for one screener: the run's global
    embedding ("global"), a hashing run's encoded split, or a screener deriving codes from the embedding."""
    if isinstance(screener, str):
        return enc.image_gallery, enc.text_gallery, "cosine"
    if isinstance(screener, EncodedSplit):
        return screener.image_gallery, screener.text_gallery, "hamming"
    img, txt = (F.normalize(torch.as_tensor(x).float(), dim=1) for x in (enc.image, enc.text))
    return screener.codes(img, "image"), screener.codes(txt, "text"), "hamming"


@torch.inference_mode()
def token_hybrid_rows(run: Run, enc: EncodedSplit, screeners: dict, Ks: Sequence[int], timed_queries: int = 100,
                      repeats: int = 3, seed: int = 0, ks: Sequence[int] = (1, 5, 10)) -> list[dict]:
    """Rows of the hybrid table (`hybrid.HYBRID_COLUMNS`) for both directions. `screeners`: name -> a
    hashing run's EncodedSplit of the same test split, a nested run's PrefixScreen (its prefixes screen, its
    two-level cascade is left out: it ranks no more than a top K), or a screener with `.codes(feats, side)`."""
    for name, s in screeners.items():
        if isinstance(s, EncodedSplit) and not (np.array_equal(s.image_ids, enc.image_ids)
                                                and np.array_equal(s.text_ids, enc.text_ids)):
            raise ValueError(f"screener {name}: not the same test split (ids differ) as {run.name}")
    grid, pairs_fn = run.module.token_scorer.cpu().functions()
    img, txt = enc.token_sets()
    n, m, cap = enc.num_images, enc.num_texts, enc.caption_image

    def pairs(i, t):
        return pairs_fn(img.tokens[i], img.mask[i], txt.tokens[t], txt.mask[t]).float()

    full = grid(img.tokens, img.mask, txt.tokens, txt.mask).float()
    exhaustive = evaluate_blocks(lambda a, b: full[a:b], lambda a, b: full[:, a:b].T.contiguous(), n, cap, ks=ks)
    screen_list = {"global": "global"}
    for name, s in screeners.items():  # a nested run's prefix scores every pair alone; its cascade does not
        if not isinstance(s, PrefixScreen):
            screen_list[name] = s
        elif s.then is None:
            screen_list[name] = screeners[s.base].prefix(s.bits)
    rng = np.random.default_rng(seed + 1)
    rows = []
    for direction, (nq, ng) in (("i2t", (n, m)), ("t2i", (m, n))):
        timed = torch.from_numpy(np.sort(rng.choice(nq, min(timed_queries, nq), replace=False)))
        q_set, g_set = (img, txt) if direction == "i2t" else (txt, img)

        def exhaustive_time():
            q = q_set[timed]
            return grid(q.tokens, q.mask, g_set.tokens, g_set.mask) if direction == "i2t" else \
                grid(g_set.tokens, g_set.mask, q.tokens, q.mask)

        ref_ms = 1000 * median_seconds(exhaustive_time, repeats) / len(timed)
        ref = {f"R@{k}": exhaustive[f"{direction}_R@{k}"] for k in ks}
        rows.append(hybrid_row(direction, f"{ng:,}", "token exhaustive", run.scorer_name, ng, ref, 100.0, ref_ms,
                         None, None, ref, ref_ms, len(timed)))
        for name, screener in screen_list.items():
            rows += _screened_rows(direction, name, screener, enc, pairs, Ks, ks, timed, repeats, ref, ref_ms)
    return rows


def _screened_rows(direction, name, screener, enc, pairs, Ks, ks, timed, repeats, ref, ref_ms):
    img_s, txt_s, measure = _screen_inputs(screener, enc)
    q_s, g_s = (img_s, txt_s) if direction == "i2t" else (txt_s, img_s)
    qp, gp = (prepare(torch.as_tensor(x), measure) for x in (q_s, g_s))
    n, cap = enc.num_images, enc.caption_image
    ng = len(gp)

    def screen_block(q, g):
        score = feature_blocks(q, g, measure)
        return lambda a, b: score(a, b).float()  # hamming: -distance as floats (exact)

    screen = {"i2t": screen_block(*(qp, gp) if direction == "i2t" else (gp, qp)),
              "t2i": screen_block(*(gp, qp) if direction == "i2t" else (qp, gp))}
    depths = sorted({min(k, ng) for k in Ks})
    alone = evaluate_blocks(screen["i2t"], screen["t2i"], n, cap, ks=sorted({*ks, *depths}), map_ks=())
    label = "global embedding (cosine)" if name == "global" else name
    max_k, gallery = max(ks), f"{ng:,}"
    r_alone = {f"R@{k}": alone[f"{direction}_R@{k}"] for k in ks}
    screen_ms = _screen_ms(qp, gp, measure, timed, max_k, repeats)
    rows = [hybrid_row(direction, gallery, "screen only", label, max_k, r_alone, r_alone[f"R@{max_k}"], screen_ms,
                 screen_ms, 0.0, ref, ref_ms, len(timed))]
    for k in depths:  # candidate recall: the share of queries whose match is in the screen's top k
        blocks = {d: two_stage(screen[d], pair_rerank(pairs, queries_are_images=d == "i2t"), k) for d in screen}
        res = evaluate_blocks(blocks["i2t"], blocks["t2i"], n, cap, ks=ks, map_ks=())
        r = {f"R@{kk}": res[f"{direction}_R@{kk}"] for kk in ks}
        screen_ms = _screen_ms(qp, gp, measure, timed, k, repeats)
        rerank_ms = _rerank_ms(pairs, qp, gp, measure, timed, k, direction, repeats)
        rows.append(hybrid_row(direction, gallery, "hybrid", label, k, r, alone[f"{direction}_R@{k}"],
                         screen_ms + rerank_ms, screen_ms, rerank_ms, ref, ref_ms, len(timed)))
    return rows


def _top_k(qp, gp, measure, k):
    if measure == "hamming":
        return hamming_topk(qp, gp, k)[1]
    return torch.topk(qp @ gp.T, k, dim=1).indices


def _screen_ms(qp, gp, measure, timed, k, repeats) -> float:
    q = qp[timed]
    return 1000 * median_seconds(lambda: _top_k(q, gp, measure, k), repeats) / len(timed)


def _rerank_ms(pairs, qp, gp, measure, timed, k, direction, repeats):
    cand = torch.as_tensor(_top_k(qp[timed], gp, measure, k))
    flat_q = timed.repeat_interleave(cand.shape[1])

    def rerank():
        return pairs(flat_q, cand.reshape(-1)) if direction == "i2t" else pairs(cand.reshape(-1), flat_q)

    return 1000 * median_seconds(rerank, repeats) / len(timed)
