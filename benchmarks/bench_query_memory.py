"""Memory of the 1M/5M query-time benchmark: bounded by the block, not by gallery x queries.

    python benchmarks/bench_query_memory.py [--queries 100] [--blocks 65536,262144,1048576] [--quick]

Runs ``pipeline.comparison.query_time.exhaustive_search`` (the report's streamed exhaustive search) on
``distinct`` galleries of the 1M/5M point, i2t (5M captions) and t2i (1M images), for
256-d fp32 embeddings and packed 64-bit codes, once per block size, and records the peak
resident memory above the level before the search (Linux VmHWM, reset per run). For scale:
the whole fp32 score matrix of the timed queries would take queries x gallery x 4 bytes,
and the gallery itself items x bytes per item; neither is ever held. Writes
benchmarks/out/bench_query_memory[_quick].json.
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

from pipeline.comparison.galleries import ItemSource  # noqa: E402
from pipeline.comparison.measure import PeakRSS  # noqa: E402
from pipeline.comparison.query_time import exhaustive_search  # noqa: E402
from pipeline.evaluation.scores import pack_codes  # noqa: E402
from pipeline.inference.encoding import EncodedSplit  # noqa: E402


def fake_split(dim: int, n: int = 1000, seed: int = 0) -> EncodedSplit:
    """Correlated Gaussian features standing in for a model's test outputs (statistics only)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((dim, dim)).astype(np.float32) / np.sqrt(dim)
    x = rng.standard_normal((n, dim)).astype(np.float32) @ mix + 0.3
    norm = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return EncodedSplit(x, x, norm, norm, np.arange(n), np.zeros((n, 1), np.uint8), np.arange(n), np.arange(n))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--images", type=int, default=1_000_000)
    p.add_argument("--captions", type=int, default=5_000_000)
    p.add_argument("--blocks", default="65536,262144,1048576")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.queries, args.images, args.captions, args.blocks = 20, 50_000, 250_000, "16384,65536"
    blocks = [int(b) for b in args.blocks.split(",")]
    rows = []
    for hashed, dim in ((True, 64), (False, 256)):
        enc = fake_split(dim)
        if hashed:
            packed = pack_codes(torch.from_numpy(enc.image), zero_one=False).numpy()
            enc = EncodedSplit(np.tanh(enc.image), np.tanh(enc.text), packed, packed, *(
                getattr(enc, f) for f in ("caption_image", "labels", "image_ids", "text_ids")))
        src = ItemSource(enc, "image", "distinct", hashed)
        q = src.test[:args.queries]
        for direction, n in (("i2t", args.captions), ("t2i", args.images)):
            for block in blocks:
                src._cached = (None, None)
                with PeakRSS() as mem:
                    t = time.perf_counter()
                    _, _, search_s, gen_s, _ = exhaustive_search(q, src, n, 10, torch.device("cpu"), block)
                    wall = time.perf_counter() - t
                item_bytes = src.item_bytes
                row = {"representation": "64-bit packed codes" if hashed else "256-d fp32", "direction": direction,
                       "gallery_items": n, "queries": len(q), "block_items": block,
                       "block_MiB": block * item_bytes / 2**20, "peak_extra_MiB": mem.mib,
                       "gallery_MiB_if_held": n * item_bytes / 2**20,
                       "score_matrix_MiB_if_held": len(q) * n * 4 / 2**20,
                       "search_s": search_s, "generate_s": gen_s, "wall_s": wall}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print("\n| representation | direction | gallery items | queries | block items | block MiB | peak extra MiB "
          "| gallery MiB (never held) | scores MiB (never held) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['representation']} | {r['direction']} | {r['gallery_items']:,} | {r['queries']} | "
              f"{r['block_items']:,} | {r['block_MiB']:.1f} | {r['peak_extra_MiB']:.0f} | "
              f"{r['gallery_MiB_if_held']:,.0f} | {r['score_matrix_MiB_if_held']:,.0f} |")
    out = ROOT / "benchmarks" / "out" / f"bench_query_memory{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "load_average": os.getloadavg()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
