"""Query time against gallery size: our exhaustive search over a gallery streamed in blocks (memory
bounded by the block), and faiss indexes on the same queries with their recall against it."""
from __future__ import annotations

import math
import time
from typing import Iterable

import numpy as np
import torch

from pipeline.comparison.galleries import ItemSource
from pipeline.comparison.measure import PeakRSS
from pipeline.comparison.writers import size_label
from pipeline.evaluation.exhaustive import merge_topk, topk_search
from pipeline.evaluation.hamming import backend as hamming_backend
from pipeline.evaluation.hamming import hamming_topk
from pipeline.inference.encoding import EncodedSplit
from pipeline.inference.runs import Run

QUERY_COLUMNS = ["model", "gallery", "size", "direction", "gallery_items", "method", "params", "device",
                 "timed_queries", "build_s", "search_s", "ms_per_query", "full_queries", "total_s", "extrapolated",
                 "recall@k", "k", "peak_extra_MiB", "block_items"]


def _search(q, g, k: int, hashed: bool, device: torch.device):
    if hashed and device.type == "cpu":
        return hamming_topk(q, g, k)
    s, i = topk_search(q, g, k, "hamming" if hashed else "cosine")
    return s.cpu(), i.cpu()


def exhaustive_search(queries: np.ndarray, source: ItemSource, n_gallery: int, k: int, device: torch.device,
                      block_items: int, query_blocks: Iterable[np.ndarray] | None = None):
    """Our exhaustive top-k over a gallery streamed in blocks of ``block_items``.

    Returns ``(scores, indices, search_seconds, generate_seconds, queries_run)``; only the
    search is timed (generation is the benchmark's cost, not the method's). With
    ``query_blocks`` (full query sets, GPU) the gallery blocks are generated once and kept
    on the device; otherwise every block lives only while it is searched."""
    search_s = gen_s = 0.0
    n_run = 0

    def timed(qd, g):
        nonlocal search_s
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        out = _search(qd, g, k, source.hashed, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        search_s += time.perf_counter() - t
        return out

    def to_dev(x):
        return x if device.type == "cpu" else torch.as_tensor(x).to(device)

    if query_blocks is None:
        best = None
        qd = to_dev(queries)
        for a in range(0, n_gallery, block_items):
            t = time.perf_counter()
            g = to_dev(source.rows(a, min(n_gallery, a + block_items)))
            gen_s += time.perf_counter() - t
            s, i = timed(qd, g)
            best = merge_topk(best, (s, i + a), k)
        return best[0], best[1], search_s, gen_s, len(queries)
    t = time.perf_counter()
    blocks = [(a, to_dev(source.rows(a, min(n_gallery, a + block_items)))) for a in range(0, n_gallery, block_items)]
    gen_s += time.perf_counter() - t
    first = None
    for qb in query_blocks:
        qd = to_dev(qb)
        best = None
        for a, g in blocks:
            s, i = timed(qd, g)
            best = merge_topk(best, (s, i + a), k)
        if first is None:
            first = best
        n_run += len(qb)
    return first[0], first[1], search_s, gen_s, n_run


def tie_aware_recall(found_scores: np.ndarray, exact_scores: np.ndarray, tol: float) -> float:
    """Share of returned items scoring at least the exact k-th best score (minus ``tol``):
    equal to set recall without ties, and fair to Hamming ties (any item at the k-th
    distance is a correct k-th neighbour)."""
    kth = exact_scores[:, -1:]
    return float(np.mean(found_scores >= kth - tol))


def faiss_rows(q: np.ndarray, g: np.ndarray, exact_s: np.ndarray, k: int, hashed: bool, dim: int,
               hnsw_ok: bool, quick: bool) -> list[dict]:
    """Build + search time and recall@k of faiss indexes on the sample queries ``q``."""
    import faiss

    faiss.omp_set_num_threads(1 if quick else torch.get_num_threads())
    n = len(g)
    out = []
    if hashed:
        # ~sqrt(n) lists, at least 39 training points per list (faiss' k-means minimum)
        nlist = int(max(1, min(4096, math.sqrt(n), n // 39)))
        specs = [("faiss IndexBinaryFlat", "", lambda: faiss.IndexBinaryFlat(dim), None),
                 ("faiss IndexBinaryIVF", f"nlist={nlist}, nprobe=16",
                  lambda: faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(dim), dim, nlist), 16)]
    else:
        specs = [("faiss IndexFlatIP", "", lambda: faiss.IndexFlatIP(dim), None)]
        if hnsw_ok:
            m, efc, efs = (8, 16, 32) if quick else (32, 80, 64)
            specs.append(("faiss IndexHNSWFlat", f"M={m}, efConstruction={efc}, efSearch={efs}",
                          lambda: _hnsw(faiss, dim, m, efc), efs))
    for name, params, make, param in specs:
        t = time.perf_counter()
        index = make()
        if not index.is_trained:
            train = g[np.random.default_rng(0).choice(n, min(n, 64 * index.nlist), replace=False)]
            index.train(train)
        index.add(g)
        if param is not None:
            if hashed:
                index.nprobe = param
            else:
                index.hnsw.efSearch = param
        build = time.perf_counter() - t
        t = time.perf_counter()
        D, _ = index.search(q, k)
        search = time.perf_counter() - t
        found = -D.astype(np.float64) if hashed else D.astype(np.float64)
        found = np.where(np.isfinite(found) & (_faiss_valid(D, hashed)), found, -np.inf)
        out.append({"method": name, "params": params, "build_s": build, "search_s": search,
                    "recall@k": tie_aware_recall(found, exact_s.astype(np.float64), 0.0 if hashed else 1e-5)})
        del index
    return out


def _faiss_valid(D: np.ndarray, hashed: bool) -> np.ndarray:
    # faiss pads missing results with -1 labels and extreme distances
    return D < np.iinfo(np.int32).max if hashed else D > -3e38


def _hnsw(faiss, dim: int, m: int, efc: int):
    index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = efc
    return index


def query_time_rows(run: Run, enc: EncodedSplit, sizes, kinds, n_queries: int, k: int, device: torch.device,
                    block_items: int, use_faiss: bool, faiss_max_float: int, hnsw_max: int, quick: bool,
                    seed: int, bar) -> list[dict]:
    hashed = run.family == "hash"
    rng = np.random.default_rng(seed)
    rows = []
    for kind in kinds:
        sources = {side: ItemSource(enc, side, kind, hashed, seed) for side in ("image", "text")}
        for n_img, n_txt in sizes:
            label = f"{size_label(n_img)}/{size_label(n_txt)}"
            for direction, q_side, g_side, n_g, n_full in (("i2t", "image", "text", n_txt, n_img),
                                                           ("t2i", "text", "image", n_img, n_txt)):
                test_q = sources[q_side].test
                full = n_queries <= 0
                if full:  # every query of the size; faiss and recall use the first 1,000 of them
                    qsrc = sources[q_side]
                    sample = qsrc.rows(0, min(n_full, 1000))
                    qblocks = (qsrc.rows(a, min(n_full, a + 8192)) for a in range(0, n_full, 8192))
                else:
                    pick = np.sort(rng.choice(len(test_q), min(n_queries, len(test_q)), replace=False))
                    sample, qblocks = test_q[pick], None
                with PeakRSS() as mem:
                    s, i, search_s, _, n_run = exhaustive_search(sample, sources[g_side], n_g, k, device,
                                                                 block_items, qblocks)
                per_q = search_s / max(n_run, 1)
                method = "exhaustive (ours)"
                params = ("hamming_topk, C kernel" if hashed and device.type == "cpu" and hamming_backend() == "c"
                          else "topk_search")
                base = {"model": run.name, "gallery": kind, "size": label, "direction": direction,
                        "gallery_items": n_g, "full_queries": n_full, "k": k, "block_items": block_items}
                rows.append({**base, "method": method, "params": params, "device": str(device), "timed_queries": n_run,
                             "build_s": 0.0, "search_s": search_s, "ms_per_query": 1000 * per_q,
                             "total_s": per_q * n_full, "extrapolated": not full,
                             "recall@k": 1.0, "peak_extra_MiB": mem.mib})
                bar.update(1)
                limit = n_g if hashed else min(faiss_max_float, n_g)
                if use_faiss and limit == n_g:
                    g_all = sources[g_side].rows(0, n_g)
                    dim = run.dim
                    qs = np.ascontiguousarray(sample[:min(len(sample), n_queries if n_queries > 0 else 1000)])
                    exact = s[:len(qs)].numpy()
                    for fr in faiss_rows(qs, np.ascontiguousarray(g_all), exact, k, hashed, dim,
                                         n_g <= hnsw_max, quick):
                        per = fr["search_s"] / len(qs)
                        rows.append({**base, **fr, "device": "cpu", "timed_queries": len(qs),
                                     "ms_per_query": 1000 * per, "total_s": per * n_full + fr["build_s"],
                                     "extrapolated": True, "peak_extra_MiB": None})
                    del g_all
    return rows
