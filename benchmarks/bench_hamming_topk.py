"""Exhaustive top-k: packed 64-bit Hamming codes vs fp32 256-d cosine, 5,000 queries x 1M items.

    python benchmarks/bench_hamming_topk.py [--queries 5000] [--items 1000000] [--float-queries 500]
                                            [--repeats 3] [--k 10] [--quick]

One process, one data set, methods run one after the other, ``--repeats`` times in rotation;
medians of wall and CPU (process) time. The machine is shared, so the ratios between methods
measured side by side are the figures to quote, not the absolute seconds.

* ``hamming_topk`` (pipeline.evaluation.hamming, the C kernel), full size;
* faiss ``IndexBinaryFlat`` (same codes, same k), full size;
* ``pipeline.evaluation.exhaustive.topk_search(..., "hamming")`` (numpy popcount + selection), on the
  float query sample, extrapolated: why the kernel exists;
* fp32 cosine ``topk_search`` on 256-d embeddings (1 GB gallery), and plain torch
  ``mm + topk`` in 65,536-item blocks, and faiss ``IndexFlatIP``: on ``--float-queries``
  queries, extrapolated linearly to ``--queries`` (the work is queries x items x dim).
Also checks that hamming_topk returns exactly topk_search's result on the sample, and that
faiss' distances agree. Writes benchmarks/out/bench_hamming_topk[_quick].json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.comparison.measure import PeakRSS  # noqa: E402
from pipeline.evaluation.exhaustive import topk_search  # noqa: E402
from pipeline.evaluation.hamming import backend, hamming_topk  # noqa: E402


def timed(fn):
    with PeakRSS() as mem:
        c, t = time.process_time(), time.perf_counter()
        out = fn()
        wall, cpu = time.perf_counter() - t, time.process_time() - c
    return out, wall, cpu, mem.mib


def torch_mm_topk(q, g, k, block=65536):
    best_s = best_i = None
    for a in range(0, len(g), block):
        s = q @ g[a:a + block].T
        v, i = torch.topk(s, min(k, s.shape[1]), dim=1)
        i = i + a
        if best_s is None:
            best_s, best_i = v, i
        else:
            v, pos = torch.topk(torch.cat([best_s, v], 1), k, dim=1)
            best_i = torch.cat([best_i, i], 1).gather(1, pos)
            best_s = v
    return best_s, best_i


def _one_thread(faiss, fn):
    """faiss with one OpenMP thread: on a loaded machine a spinning thread team can cost more than it gains."""
    threads = torch.get_num_threads()
    faiss.omp_set_num_threads(1)
    try:
        return fn()
    finally:
        faiss.omp_set_num_threads(threads)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=5000)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--float-queries", type=int, default=500)
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="200 x 100K, for a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.queries, args.items, args.float_queries, args.repeats = 200, 100_000, 50, 1
    import faiss

    rng = np.random.default_rng(0)
    codes_g = rng.integers(0, 256, (args.items, args.bits // 8), dtype=np.uint8)
    codes_q = rng.integers(0, 256, (args.queries, args.bits // 8), dtype=np.uint8)
    emb_g = torch.nn.functional.normalize(torch.randn(args.items, args.dim, generator=torch.Generator().manual_seed(1)),
                                          dim=1)
    emb_q = torch.nn.functional.normalize(torch.randn(args.float_queries, args.dim,
                                                      generator=torch.Generator().manual_seed(2)), dim=1)
    fq = args.float_queries
    scale = args.queries / fq
    index_b = faiss.IndexBinaryFlat(args.bits)
    index_b.add(codes_g)
    index_f = faiss.IndexFlatIP(args.dim)
    index_f.add(emb_g.numpy())
    faiss.omp_set_num_threads(torch.get_num_threads())

    methods = {
        "hamming_topk (C kernel), packed 64-bit": (lambda: hamming_topk(codes_q, codes_g, args.k), 1.0),
        "faiss IndexBinaryFlat, packed 64-bit": (lambda: index_b.search(codes_q, args.k), 1.0),
        "faiss IndexBinaryFlat, 1 OpenMP thread": (lambda: _one_thread(faiss, lambda: index_b.search(codes_q, args.k)),
                                                   1.0),
        "topk_search hamming (numpy popcount), sample": (lambda: topk_search(codes_q[:fq], codes_g, args.k,
                                                                              "hamming"), scale),
        "fp32 cosine topk_search, 256-d, sample": (lambda: topk_search(emb_q, emb_g, args.k, "cosine"), scale),
        "fp32 torch mm + topk, 256-d, sample": (lambda: torch_mm_topk(emb_q, emb_g, args.k), scale),
        "faiss IndexFlatIP fp32, 256-d, sample": (lambda: index_f.search(emb_q.numpy(), args.k), scale),
    }
    results = {name: {"wall": [], "cpu": [], "mem": []} for name in methods}
    outputs = {}
    for rep in range(args.repeats):
        for name, (fn, _) in methods.items():
            out, wall, cpu, mem = timed(fn)
            results[name]["wall"].append(wall)
            results[name]["cpu"].append(cpu)
            results[name]["mem"].append(mem)
            outputs[name] = out
            print(f"rep {rep}: {name}: {wall:.2f} s wall, {cpu:.2f} s cpu", file=sys.stderr, flush=True)

    # correctness on the sample: exact equality with topk_search, faiss distances agree
    ours = hamming_topk(codes_q[:fq], codes_g, args.k)
    ref = outputs["topk_search hamming (numpy popcount), sample"]
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1]), "hamming_topk != topk_search"
    D, _ = outputs["faiss IndexBinaryFlat, packed 64-bit"]
    assert np.array_equal(-D[:fq], ours[0].numpy()), "faiss distances differ"

    rows = []
    for name, (fn, factor) in methods.items():
        r = results[name]
        rows.append({"method": name, "measured_queries": fq if factor != 1.0 else args.queries,
                     "wall_s_median": float(np.median(r["wall"])), "cpu_s_median": float(np.median(r["cpu"])),
                     "extrapolated_wall_s": float(np.median(r["wall"])) * factor,
                     "extrapolated_cpu_s": float(np.median(r["cpu"])) * factor,
                     "peak_extra_MiB": max((m for m in r["mem"] if m is not None), default=None)})
    ref_name = "hamming_topk (C kernel), packed 64-bit"
    base = {k: next(r for r in rows if r["method"] == ref_name)[k] for k in ("extrapolated_wall_s",
                                                                               "extrapolated_cpu_s")}
    for r in rows:
        r["x_vs_hamming_topk_wall"] = r["extrapolated_wall_s"] / base["extrapolated_wall_s"]
        r["x_vs_hamming_topk_cpu"] = r["extrapolated_cpu_s"] / base["extrapolated_cpu_s"]
    info = {"queries": args.queries, "items": args.items, "bits": args.bits, "dim": args.dim, "k": args.k,
            "repeats": args.repeats, "float_queries": fq, "torch_threads": torch.get_num_threads(),
            "kernel": backend(), "load_average": os.getloadavg(), "faiss": faiss.__version__}
    print(f"\n{args.queries:,} queries x {args.items:,} items, k={args.k}; medians of {args.repeats} "
          f"(sample rows: {fq} queries x{scale:g}); load average {info['load_average']}\n")
    print("| method | measured queries | wall s (for all queries) | cpu s (for all queries) | x vs hamming_topk "
          "(wall / cpu) | peak extra MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mem = "–" if r["peak_extra_MiB"] is None else f"{r['peak_extra_MiB']:.0f}"
        print(f"| {r['method']} | {r['measured_queries']:,} | {r['extrapolated_wall_s']:.2f} | "
              f"{r['extrapolated_cpu_s']:.2f} | {r['x_vs_hamming_topk_wall']:.1f} / {r['x_vs_hamming_topk_cpu']:.1f} | "
              f"{mem} |")
    out = ROOT / "benchmarks" / "out" / f"bench_hamming_topk{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "rows": rows, "raw": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
