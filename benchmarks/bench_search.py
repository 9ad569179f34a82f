"""Search with trained runs: index build speed, query time and index size per item, per family (a
token-level run: the global screen's top K re-ranked by its token scorer).

    python benchmarks/bench_search.py RUN [RUN ...] [--data data/shapes] [--split test] [--queries 200]
        [--repeats 3] [--workers 2] [--threads N] [--out benchmarks/out/bench_search.json]

The gallery is the split's images written out as files (the shard's own bytes), indexed with each run
in turn (`build_image_index`: listing, decoding in --workers processes, encoding, writing the blocks;
images/s over the whole build, median of --repeats builds). Query time: --queries of the split's
captions, one at a time (what `pipeline.search query --text` pays per query once the run is loaded:
tokenise, encode, search the blocks) and as one batch (`--queries FILE`), milliseconds per query,
median of --repeats; and the search alone (the batch's queries already encoded), ms per query. A
token-level run is searched as `pipeline.search` does by default, its config's `tokens.screen_k`
re-ranked, and with --screen-k also at those depths (a depth >= the gallery is exhaustive token
scoring). Index size per item: index.json's `bytes_per_item` (every stored array: the screen, the token
set at its padded length and its mask; items.jsonl, the file names, not counted). Every run is measured
in this one process, one after the other.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_split(data: Path, split: str, folder: Path) -> list[str]:
    """The split's images as files named by index; returns its captions."""
    import webdataset as wds

    from data_prep import read_card

    card = read_card(data)
    captions = []
    for sample in wds.WebDataset([str(data / s) for s in card["splits"][split]["shards"]], shardshuffle=False):
        meta = json.loads(sample["json"])
        (folder / f"{meta['index']:07d}.{card['image_key']}").write_bytes(sample[card["image_key"]])
        captions += meta["captions"]
    return captions


def _median_ms(fn, repeats: int, per: int) -> float:
    """Median over `repeats` calls of fn(), milliseconds per one of `per` queries."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) / per)
    return 1e3 * statistics.median(times)


def measure(run_path: Path, folder: Path, captions: list[str], args) -> list[dict]:
    """One row per way of searching: one for an embedding or hashing run, one per screen depth for a
    token-level run (the same index)."""
    from pipeline.inference.runs import load_run
    from pipeline.inference.search import SearchIndex, build_image_index, encode_texts

    run = load_run(run_path)
    builds = []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            out = Path(tmp) / f"index{r}"
            start = time.perf_counter()
            meta = build_image_index(run, folder, out, workers=args.workers, progress=False)
            builds.append(time.perf_counter() - start)
        index = SearchIndex.open(out, run)
        queries = captions[: args.queries]
        encoded = encode_texts(run, queries)
        depths = [run.cfg.tokens.screen_k, *args.screen_k] if run.tokens else [None]
        for depth in depths:
            def one_at_a_time():
                for q in queries:
                    index.query_texts([q], k=10, screen_k=depth)

            ranking = "exhaustive " + run.measure if depth is None else (
                f"global top {min(depth, meta['count'])} re-ranked by {run.scorer_name}")
            rows.append({"run": run.name, "family": run.family, "representation": run.representation,
                         "ranking": ranking, "screen_k": depth, "items": meta["count"],
                         "images_per_s": meta["count"] / statistics.median(builds),
                         "build_s": statistics.median(builds),
                         "query_ms_single": _median_ms(one_at_a_time, args.repeats, len(queries)),
                         "query_ms_batched": _median_ms(lambda: index.query_texts(queries, k=10, screen_k=depth),
                                                        args.repeats, len(queries)),
                         "search_ms_batched": _median_ms(lambda: index.search(encoded, 10, depth), args.repeats,
                                                         len(queries)),
                         "bytes_per_item": meta["bytes_per_item"]})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--data", type=Path, default=ROOT / "data" / "shapes", help="the runs' dataset (shards)")
    p.add_argument("--split", default="test")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--screen-k", type=int, nargs="*", default=[], help="token-level runs: further screen depths "
                   "to time (the config's tokens.screen_k always)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; on a shared "
                   "machine 1 avoids threads spinning for each other)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "bench_search.json")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        captions = write_split(args.data, args.split, folder)
        rows = [row for run in args.runs for row in measure(run, folder, captions, args)]
    print("| run | representation | ranking | items | index build (images/s) | query, one at a time (ms) | "
          "query, batched (ms/query) | search only, batched (ms/query) | index bytes / item |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['representation']} | {r['ranking']} | {r['items']} | {r['images_per_s']:.0f} | "
              f"{r['query_ms_single']:.2f} | {r['query_ms_batched']:.3f} | {r['search_ms_batched']:.3f} | "
              f"{r['bytes_per_item']:,} |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "load_average": load, "threads": torch.get_num_threads(),
                                    "machine": platform.platform(), "workers": args.workers}, indent=2) + "\n")
    print(f"\nload average {load:.1f}; {torch.get_num_threads()} torch threads; written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
