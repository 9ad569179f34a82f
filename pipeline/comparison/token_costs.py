"""What a token-level run costs to store and to query, beside what the report measures for every run.

Storage: a token set per item (tokens x width x 4 bytes, mean over the test items of each side) plus the
global embedding that screens.

Query time, at the report's gallery sizes, on duplicated galleries only (the test items repeated, the
paper's method; a Gaussian fitted to vectors says nothing about token sets):
* `token exhaustive`: every (query, item) pair scored by the token scorer. The cost per pair is measured
  on a sample of test queries against a sample of test items and extrapolated to the gallery and the
  size's full query set; a total above `cap_s` is marked "does not finish", as the paper marks SCAN-type
  scoring at 100K / 500K.
* `token screened`: the global embedding's exhaustive top-K search (the run's own `exhaustive (ours)`
  row at that size and direction: it grows with the gallery) plus K token pairs per query (measured on
  the sample: gathering the candidates' token sets and scoring them).
"""
from __future__ import annotations


import numpy as np
import torch

from pipeline.comparison.measure import median_seconds
from pipeline.comparison.writers import size_label
from pipeline.inference.encoding import EncodedSplit
from pipeline.inference.runs import Run


TOKEN_QUERY_NOTE = (
    "Token-level runs: `screen: ...` rows are their global embedding's searches (the screen); `token exhaustive` "
    "scores every (query, item) pair with the token scorer, timed per pair on a sample of test queries and items "
    "and extrapolated to the gallery and the full query set, marked `does not finish` above {cap:,.0f} s; `token "
    "screened (K)` adds to the screen's time per query the re-ranking of K candidates (their token sets "
    "gathered and scored, timed on the sample). Duplicated galleries only: a distribution fitted to vectors says "
    "nothing about token sets.")


def token_storage_rows(run: Run, enc: EncodedSplit) -> list[dict]:
    """Rows of the report's storage table: the token sets (fp32, as stored) and the screen embedding."""
    n_img, n_txt = enc.num_images, enc.num_texts
    width = enc.image_tokens.shape[2]
    img_tokens, txt_tokens = float(enc.image_mask.sum(1).mean()), float(enc.text_mask.sum(1).mean())
    per_item = width * 4 * (img_tokens * n_img + txt_tokens * n_txt) / (n_img + n_txt)
    scaled = 1_000_000 * img_tokens + 5_000_000 * txt_tokens
    screen = run.dim * 4
    return [
        {"model": run.name, "storage": f"token sets, {width}-d fp32 (images {img_tokens:.1f}, captions "
                                       f"{txt_tokens:.1f} tokens on average)", "bytes_per_item": per_item,
         "test_gallery_items": n_img + n_txt, "test_gallery_MiB": (n_img + n_txt) * per_item / 2**20,
         "gallery_1M_5M_GiB": scaled * width * 4 / 2**30},
        {"model": run.name, "storage": f"+ screen: {run.dim}-d float32", "bytes_per_item": screen,
         "test_gallery_items": n_img + n_txt, "test_gallery_MiB": (n_img + n_txt) * screen / 2**20,
         "gallery_1M_5M_GiB": 6_000_000 * screen / 2**30},
    ]


def _sides(enc: EncodedSplit, direction: str):
    img, txt = enc.token_sets()
    return (img, txt) if direction == "i2t" else (txt, img)



@torch.inference_mode()
def pair_costs(run: Run, enc: EncodedSplit, direction: str, queries: int, items: int, Ks, repeats: int = 3,
               seed: int = 0) -> dict:
    """Seconds per exhaustively scored pair, and per query for re-ranking each K, on test samples."""
    scorer = run.module.token_scorer.cpu()
    q_side, g_side = _sides(enc, direction)
    rng = np.random.default_rng(seed)
    q_idx = torch.from_numpy(np.sort(rng.choice(len(q_side), min(queries, len(q_side)), replace=False)))
    g_idx = torch.from_numpy(np.sort(rng.choice(len(g_side), min(items, len(g_side)), replace=False)))
    q, g = q_side[q_idx], g_side[g_idx]

    def grid():
        return scorer(q, g) if direction == "i2t" else scorer(g, q)

    out = {"pair_s": median_seconds(grid, repeats) / (len(q) * len(g))}
    for k in Ks:
        cand = torch.from_numpy(rng.integers(0, len(g_side), (len(q), k)))
        flat_q = q_idx.repeat_interleave(k)

        def rerank():  # gather each query's K candidates' token sets, score the pairs
            pairs = (q_side[flat_q], g_side[cand.reshape(-1)])
            return scorer.pairs(*pairs) if direction == "i2t" else scorer.pairs(*reversed(pairs))

        out[k] = median_seconds(rerank, repeats) / len(q)
    return out


def with_token_rows(run: Run, enc: EncodedSplit, screen_rows: list[dict], sizes, Ks, cap_s: float, seed: int = 0,
                    queries: int = 32, sample_items: int = 2000) -> list[dict]:
    """The run's query-time rows (its global embedding's searches, relabelled as the screen's) and the rows
    of exhaustive and screened token scoring, in the report's QUERY_COLUMNS."""
    rows = [{**r, "method": f"screen: {r['method']}"} for r in screen_rows]
    for direction in ("i2t", "t2i"):
        costs = pair_costs(run, enc, direction, queries, sample_items, Ks, seed=seed)
        for n_img, n_txt in sizes:
            label = f"{size_label(n_img)}/{size_label(n_txt)}"
            n_g, n_full = (n_txt, n_img) if direction == "i2t" else (n_img, n_txt)
            base = {"model": run.name, "gallery": "duplicated", "size": label, "direction": direction,
                    "gallery_items": n_g, "full_queries": n_full, "device": "cpu", "timed_queries": queries,
                    "build_s": 0.0, "extrapolated": True}
            per_query = costs["pair_s"] * n_g
            total = per_query * n_full
            late = "" if total <= cap_s else f"; does not finish (> {cap_s:,.0f} s: {total:,.0f} s extrapolated)"
            rows.append({**base, "method": "token exhaustive", "params": f"{run.scorer_name}{late}",
                         "ms_per_query": 1000 * per_query, "total_s": None if late else total})
            screen = next((r for r in screen_rows if r["method"] == "exhaustive (ours)" and r["gallery"] == "duplicated"
                           and r["size"] == label and r["direction"] == direction), None)
            for k in Ks if screen is not None else ():
                per_query = screen["ms_per_query"] / 1000 + costs[k]
                rows.append({**base, "method": f"token screened (K={k})", "k": k,
                             "params": f"{run.dim}-d cosine search (timed at top-{screen['k']}) + {k} pairs of "
                                       f"{run.scorer_name}",
                             "ms_per_query": 1000 * per_query, "total_s": per_query * n_full})
    return rows
