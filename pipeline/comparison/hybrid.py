"""Hybrid coarse-to-fine retrieval: hash codes screen the gallery, the fine-grained model re-ranks.

    python -m pipeline.hybrid --fine-grained runs/fine_grained [--hash runs/hash_64bit ...] \\
        [--distill-bits 64] [--simhash-bits 64] [--gallery 1000000] [--K 10,100,1000] \\
        [--queries 500] [--out DIR]

Token-level runs (`model.kind: fine_grained_tokens`) re-rank with their token scorer instead, on the
test split (`token_hybrid.py`). The FiCo-ITR paper's future work: a Hamming top-K screen (cheap: packed codes, XOR + popcount)
picks K candidates per query and the fine-grained model orders only those. With K = the
gallery size it *is* the fine-grained ranking; with K = 1 it is the hash ranking's first hit.
Everything in between is a quality / time trade-off, reported here as a curve over K.

Screening works only when the codes keep instance-level structure (the paper: ADV-64, trained
with an instance loss, keeps R@100 high; UCCH / DADH do not). Three kinds of screener:

* a trained hashing run (UCCH-style, ``--hash``): its own encoders, its own codes;
* ``distill``: a hash head on the fine-grained model's *frozen* embeddings, trained with an
  instance-level contrastive loss (positives = the image's captions) plus a distillation
  loss that matches the code similarities' in-batch softmax to the fine-grained model's
  (``DistilledHasher``). It trains on embeddings only (seconds to minutes on a CPU), keeps
  the fine-grained model's notion of "the same instance", and any item the fine-grained
  model can embed gets a code from it (so the index is built from the same embeddings);
* ``simhash``: sign of random projections of the fine-grained embeddings (no training;
  Hamming distance estimates the angle). The baseline that shows what training adds.

Large galleries (``build_gallery``): the test split plus distractors drawn with the models'
own statistics, a joint Gaussian fitted on the test items of that side over the fine-grained
embedding and each hashing run's continuous (tanh) output, so a distractor has an embedding
and a code that belong together; embeddings are re-normalised, codes are signs; codes of
embedding-derived screeners come from the distractor's embedding. The test items are put at
random positions, so the tie rule (equal scores: lower index first) favours neither real
items nor distractors. The true matches stay unique (distractors are never positives).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.cli import int_list, progress_bar
from pipeline.comparison.cascade import PrefixScreen
from pipeline.comparison.galleries import build_gallery
from pipeline.comparison.hybrid_table import HYBRID_COLUMNS, format_rows, hybrid_row
from pipeline.comparison.screeners import fine_grained_screeners, run_screeners
from pipeline.comparison.token_hybrid import token_hybrid_rows
from pipeline.comparison.writers import write_csv
from pipeline.evaluation.exhaustive import topk_search
from pipeline.evaluation.hamming import hamming_topk
from pipeline.evaluation.scores import as_tensor, prepare
from pipeline.inference.encoding import encode_split
from pipeline.inference.runs import RunError, load_run


@torch.no_grad()
def rerank(q_feats, g_feats, candidates, measure: str = "cosine", k: int | None = None,
           block_bytes: int = 1 << 22):
    """Order each query's candidates by the fine-grained score: ``(scores [nq, k], indices [nq, k])``.

    ``candidates`` [nq, K] are gallery indices (any order, no repeats). The order is the
    project's tie rule (score descending, then gallery index ascending), so with every
    gallery item as a candidate this equals exhaustive ``topk_search`` (exactly, up to the
    last bit of float rounding, which BLAS may do differently for different shapes).
    ``measure``: cosine | inner_product | euclidean. Candidate embeddings are gathered
    ``block_bytes`` at a time into one reused buffer (the gather is random access into the
    gallery and dominates the cost: fresh buffers would add page faults on top).
    """
    if measure == "hamming":
        raise ValueError("rerank scores continuous embeddings; hamming is the screening stage")
    cand = as_tensor(candidates).to(torch.int64)
    q, g = as_tensor(q_feats), as_tensor(g_feats)
    dt = torch.float64 if torch.float64 in (q.dtype, g.dtype) else torch.float32
    q, g = prepare(q, measure, dt), g if _prepared(g, measure, dt) else prepare(g, measure, dt)
    nq, K = cand.shape
    k = K if k is None else min(k, K)
    cand = torch.sort(cand, dim=1).values  # index order first: a stable score sort then applies the tie rule
    rows = max(1, min(nq, block_bytes // max(1, K * g.shape[1] * g.element_size())))
    buf = torch.empty(rows * K, g.shape[1], dtype=dt)
    out_s = torch.empty(nq, k, dtype=dt)
    out_i = torch.empty(nq, k, dtype=torch.int64)
    for a in range(0, nq, rows):
        c = cand[a:a + rows]
        n = c.shape[0]
        G = torch.index_select(g, 0, c.reshape(-1), out=buf[:n * K]).view(n, K, -1)
        qa = q[a:a + rows]
        dot = torch.bmm(G, qa.unsqueeze(2)).squeeze(2)
        if measure == "euclidean":
            sq = (qa * qa).sum(1, keepdim=True) + (G * G).sum(2) - 2 * dot
            dot = 1.0 / (1.0 + sq.clamp_min_(0).sqrt_())
        order = torch.sort(dot, dim=1, descending=True, stable=True).indices[:, :k]
        out_s[a:a + rows] = dot.gather(1, order)
        out_i[a:a + rows] = c.gather(1, order)
    return out_s, out_i


def _prepared(g: torch.Tensor, measure: str, dt) -> bool:
    """Skip re-normalising a big gallery that is already in the right form (a cheap sample check)."""
    if g.dtype != dt:
        return False
    if measure != "cosine":
        return True
    sample = g[:: max(1, g.shape[0] // 256)]
    return bool(torch.allclose(sample.norm(dim=1), torch.ones((), dtype=dt), atol=1e-4))


def hybrid_search(q_codes, g_codes, q_feats, g_feats, K: int, k: int | None = None,
                  measure: str = "cosine", screen=hamming_topk):
    """Hamming top-``K`` screen, then fine-grained re-rank: ``(scores, indices, seconds)`` with
    ``seconds = {"screen": .., "rerank": ..}``. ``k`` (default ``K``) results per query. ``screen(q, g, K)``:
    the screen (default the exhaustive Hamming top-K; a nested run's prefix or cascade: ``cascade.py``)."""
    t0 = time.perf_counter()
    _, cand = screen(q_codes, g_codes, K)
    t1 = time.perf_counter()
    scores, idx = rerank(q_feats, g_feats, cand, measure, k)
    return scores, idx, {"screen": t1 - t0, "rerank": time.perf_counter() - t1}


NOT_FOUND = np.iinfo(np.int64).max


def first_hit_ranks(ranked, gallery_owner, query_owner) -> np.ndarray:
    """Position (0-based) of the first item of each ranked list whose owner is the query's
    owner (its own image, or one of its own captions); ``NOT_FOUND`` when the list has none."""
    ranked = np.asarray(ranked)
    hit = np.asarray(gallery_owner)[ranked] == np.asarray(query_owner)[:, None]
    found = hit.any(axis=1)
    return np.where(found, hit.argmax(axis=1), NOT_FOUND)


def recall_at(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    return {f"R@{k}": 100.0 * float(np.mean(ranks < k)) for k in ks}


def run_hybrid(fg, screeners: dict, gallery_size: int, Ks: Sequence[int], timed_queries: int = 500,
               repeats: int = 3, seed: int = 0, ks: Sequence[int] = (1, 5, 10), progress: bool = False) -> list[dict]:
    """Rows of :data:`HYBRID_COLUMNS` for both directions.

    ``fg``: the fine-grained model's encoded test split (``EncodedSplit``); ``screeners``:
    name -> a hashing run's ``EncodedSplit`` (same test split), an object with ``.codes(feats, side)``,
    or a ``PrefixScreen`` over a nested run among them (its prefixes, a cascade). Quality: every test query; time: ``timed_queries`` fixed queries,
    median of ``repeats``, every method timed in the same process one after the other."""
    max_k = max(ks)
    run_codes = {}
    derived, views = [], {}
    for name, s in screeners.items():
        if isinstance(s, PrefixScreen):
            views[name] = s
        elif hasattr(s, "codes"):
            derived.append(s)
        else:
            if not np.array_equal(s.image_ids, fg.image_ids) or not np.array_equal(s.text_ids, fg.text_ids):
                raise ValueError(f"screener {name}: not the same test split (ids differ) as the fine-grained run")
            run_codes[name] = s
    rows = []
    bar = progress_bar(2 * (len(screeners) + repeats), f"hybrid at {gallery_size:,} (screeners, timing rounds)", progress)
    directions = {
        # t2i: caption queries, image gallery; i2t: image queries, caption gallery
        "t2i": (fg.text, fg.caption_image, "image", fg.image, np.arange(fg.num_images), "text"),
        "i2t": (fg.image, np.arange(fg.num_images), "text", fg.text, fg.caption_image, "image"),
    }
    for direction, (q_feats, q_owner, g_side, g_feats, g_owner, q_side) in directions.items():
        codes_in = {n: ((s.image if g_side == "image" else s.text),
                        (s.image_gallery if g_side == "image" else s.text_gallery)) for n, s in run_codes.items()}
        gal = build_gallery(g_feats, g_owner, gallery_size, seed, codes_in, derived, g_side, progress)
        G = gal.feats.shape[0]
        q = F.normalize(as_tensor(q_feats).float(), dim=1)
        q_codes = {n: (s.text_gallery if q_side == "text" else s.image_gallery) for n, s in run_codes.items()}
        q_codes.update({s.name: s.codes(q, q_side) for s in derived})
        timed = np.random.default_rng(seed + 1).choice(len(q), min(timed_queries, len(q)), replace=False)
        label = f"{G:,}"

        # quality: every query. The fine-grained exhaustive ranking is the reference.
        _, fg_idx = topk_search(q, gal.feats, max_k, "cosine")
        fg_r = recall_at(first_hit_ranks(fg_idx.numpy(), gal.owner, q_owner), ks)
        # name -> (query codes, gallery codes, screen); a nested run's views screen with its full codes
        screens = {n: (q_codes[n], gal.codes[n], hamming_topk) for n in gal.codes}
        screens.update({n: (q_codes[v.base], gal.codes[v.base], v.topk) for n, v in views.items()})
        quality = {}
        for name, (qc, gc, screen) in screens.items():
            Kmax = min(max(max(Ks), max_k), G)
            cand = screen(qc, gc, Kmax)[1].numpy()
            h_ranks = first_hit_ranks(cand, gal.owner, q_owner)
            quality[(name, None)] = (recall_at(h_ranks, ks), 100.0 * float(np.mean(h_ranks < max_k)))
            for K in sorted({min(k, G) for k in Ks}):
                # a plain screen's top K is the head of its top Kmax; a cascade's is screened afresh
                cand_k = cand[:, :K] if screen is hamming_topk else screen(qc, gc, K)[1].numpy()
                _, idx = rerank(q, gal.feats, cand_k, "cosine", max_k)
                quality[(name, K)] = (recall_at(first_hit_ranks(idx.numpy(), gal.owner, q_owner), ks),
                                      100.0 * float(np.mean(first_hit_ranks(cand_k, gal.owner, q_owner) < K)))
            bar.update(1)

        # time: a fixed query sample, every method once per round, rounds repeated (medians), so that
        # a change of load on a shared machine hits all methods alike
        qt = q[timed]
        jobs = {("fg", "topk_search"): lambda: topk_search(qt, gal.feats, max_k, "cosine"),
                ("fg", "mm+topk"): lambda: dense_topk(qt, gal.feats, max_k)}
        for name, (qc, gc, screen) in screens.items():
            qc = qc[timed]
            jobs[(name, None)] = lambda qc=qc, gc=gc, screen=screen: screen(qc, gc, max_k)
            for K in sorted({min(k, G) for k in Ks}):
                jobs[(name, K)] = lambda qc=qc, gc=gc, K=K, screen=screen: hybrid_search(
                    qc, gc, qt, gal.feats, K, max_k, screen=screen)[2]
        times: dict = {key: [] for key in jobs}
        for _ in range(repeats):
            for key, fn in jobs.items():
                t = time.perf_counter()
                out = fn()
                total = time.perf_counter() - t
                times[key].append(out if isinstance(out, dict) else {"screen": total, "rerank": 0.0})
            bar.update(1)
        ms = {key: {part: 1000.0 * float(np.median([t[part] for t in v])) / len(timed) for part in v[0]}
              for key, v in times.items()}
        fg_ts, fg_mm = ms[("fg", "topk_search")]["screen"], ms[("fg", "mm+topk")]["screen"]
        ref = min(fg_ts, fg_mm)  # the faster exhaustive search is the reference time
        rows.append(hybrid_row(direction, label, "fine-grained exhaustive", "topk_search", G, fg_r, 100.0, fg_ts, None,
                         None, fg_r, ref, len(timed)))
        rows.append(hybrid_row(direction, label, "fine-grained exhaustive", "mm+topk", G, fg_r, 100.0, fg_mm, None,
                         None, fg_r, ref, len(timed)))
        for name in screens:
            r, cr = quality[(name, None)]
            t = ms[(name, None)]
            rows.append(hybrid_row(direction, label, "hash only", name, max_k, r, cr, t["screen"], t["screen"], 0.0,
                             fg_r, ref, len(timed)))
            for K in sorted({min(k, G) for k in Ks}):
                r, cr = quality[(name, K)]
                t = ms[(name, K)]
                rows.append(hybrid_row(direction, label, "hybrid", name, K, r, cr, t["screen"] + t["rerank"], t["screen"],
                                 t["rerank"], fg_r, ref, len(timed)))
    bar.close()
    return rows


@torch.no_grad()
def dense_topk(q, g, k: int, block: int = 1 << 16):
    """Plain exhaustive top-k (blocked matmul + ``torch.topk``): the leanest fp32 baseline for timing.
    No tie rule (``topk_search`` has it, and is the one used for quality)."""
    best_s = best_i = None
    for a in range(0, g.shape[0], block):
        v, i = torch.topk(q @ g[a:a + block].T, min(k, g[a:a + block].shape[0]), dim=1)
        if best_s is None:
            best_s, best_i = v, i + a
        else:
            best_s, pos = torch.topk(torch.cat([best_s, v], 1), min(k, best_s.shape[1] + v.shape[1]), dim=1)
            best_i = torch.cat([best_i, i + a], 1).gather(1, pos)
    return best_s, best_i


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.hybrid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fine-grained", required=True, type=Path, help="a fine-grained run directory")
    p.add_argument("--hash", nargs="*", type=Path, default=[], help="hashing run directories (same dataset)")
    p.add_argument("--distill-bits", type=int_list, default=(64,), help="distilled screeners to train (0: none)")
    p.add_argument("--distill-steps", type=int, default=2000)
    p.add_argument("--simhash-bits", type=int_list, default=(64,), help="SimHash screeners (0: none)")
    p.add_argument("--gallery", type=int, default=100_000, help="gallery items per side (test + distractors)")
    p.add_argument("--K", type=int_list, default=None, help="screening depths (default 1,10,30,100,300,1000,3000; "
                   "token-level runs 10,30,100,300)")
    p.add_argument("--queries", type=int, default=500, help="timed queries per direction (quality: all)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="device for encoding the splits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="folder for hybrid.csv / hybrid.json and the distilled heads")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    progress = not args.no_progress
    try:
        fg_run = load_run(args.fine_grained)
        if fg_run.family != "fine_grained":  # token-level runs are fine-grained too
            raise RunError(f"{args.fine_grained}: --fine-grained needs a fine-grained run, got a {fg_run.family} run")
        fg = encode_split(fg_run, "test", device=args.device, progress=progress)
        screeners = {}
        for path in args.hash:
            run = load_run(path)
            if run.family != "hash":
                raise RunError(f"{path}: --hash needs a hashing run")
            screeners.update(run_screeners(run.name, encode_split(run, "test", device=args.device, progress=progress),
                                           run.module.prefixes))
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    screeners.update(fine_grained_screeners(fg_run, fg, args.distill_bits, args.simhash_bits, args.distill_steps,
                                            args.device, args.out, progress, args.seed))
    if fg.has_tokens:  # token re-ranking, on the test split only (token sets have no distractors)
        rows = token_hybrid_rows(fg_run, fg, screeners, args.K or (10, 30, 100, 300), min(args.queries, 100),
                                 args.repeats, args.seed)
    else:
        rows = run_hybrid(fg, screeners, args.gallery, args.K or (1, 10, 30, 100, 300, 1000, 3000), args.queries,
                          args.repeats, args.seed, progress=progress)
    print(format_rows(rows))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_csv(args.out / "hybrid.csv", rows, HYBRID_COLUMNS)
        (args.out / "hybrid.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
