"""Hybrid retrieval at a 1M gallery: hash screen + fine-grained re-rank, the whole curve over K.

    python benchmarks/bench_hybrid.py --fine-grained RUN [--hash RUN ...] [--gallery 1000000]
        [--K 10,30,100,300,1000,3000] [--queries 500] [--repeats 3] [--distill-bits 64,128]
        [--simhash-bits 64] [--distill-steps 3000] [--out benchmarks/out/bench_hybrid.json]

Gallery per direction: the test split's items of that side plus distractors drawn with the
models' own statistics (``pipeline.comparison.galleries.build_gallery``) up to ``--gallery`` items, the
test items at random positions. Quality (R@1/5/10, candidate recall) over every test
query; time per query over ``--queries`` fixed queries, median of ``--repeats``, every
method timed in this process one after the other. Summaries: the smallest K that keeps >= 95% of
the fine-grained R@10 for each screener, and the screeners that do so at <= 20% of its exhaustive query time.
A nested hashing run screens with each of its prefixes and with the two-level cascade (shortest prefix, then
longest, then the fine-grained re-rank).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.comparison.hybrid import format_rows, run_hybrid  # noqa: E402
from pipeline.comparison.screeners import fine_grained_screeners, run_screeners  # noqa: E402


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(float(v)) for v in text.split(",") if v.strip())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fine-grained", required=True, type=Path)
    p.add_argument("--hash", nargs="*", type=Path, default=[])
    p.add_argument("--gallery", type=int, default=1_000_000)
    p.add_argument("--K", type=_ints, default=(10, 30, 100, 300, 1000, 3000))
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--distill-bits", type=_ints, default=(64,))
    p.add_argument("--distill-steps", type=int, default=3000)
    p.add_argument("--simhash-bits", type=_ints, default=(64,))
    p.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / "out" / "distilled")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "bench_hybrid.json")
    args = p.parse_args(argv)
    from pipeline.inference.encoding import encode_split
    from pipeline.inference.runs import load_run

    start = time.perf_counter()
    fg_run = load_run(args.fine_grained)
    fg = encode_split(fg_run, "test")
    screeners = {}
    for path in args.hash:  # every hashing run; a nested one also by its prefixes and a cascade
        run = load_run(path)
        screeners.update(run_screeners(run.name, encode_split(run, "test"), run.module.prefixes))
    screeners.update(fine_grained_screeners(fg_run, fg, args.distill_bits, args.simhash_bits, args.distill_steps,
                                            cache_dir=args.cache, progress=True))
    rows = run_hybrid(fg, screeners, args.gallery, args.K, args.queries, args.repeats, progress=True)
    print(format_rows(rows))
    print("\nthe smallest K that keeps >= 95% of the fine-grained R@10, per screener:\n")
    print(format_smallest_k(rows))
    best = {}
    for r in rows:
        if r["method"] == "hybrid" and r["R@10_vs_fine_grained"] >= 95 and r["time_vs_fine_grained"] <= 20:
            key = (r["direction"], r["screener"])
            if key not in best or r["time_vs_fine_grained"] < best[key]["time_vs_fine_grained"]:
                best[key] = r
    print("\nmeets the target (>= 95% of fine-grained R@10 at <= 20% of its time):")
    for (direction, screener), r in sorted(best.items()):
        print(f"  {direction} {screener}: K={r['K']} R@10 {r['R@10']:.2f} ({r['R@10_vs_fine_grained']:.1f}%) "
              f"at {r['time_vs_fine_grained']:.1f}% of the time")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "load_average": os.getloadavg(), "gallery": args.gallery,
                                    "seconds": time.perf_counter() - start, "fine_grained": str(args.fine_grained),
                                    "hash": [str(h) for h in args.hash]}, indent=1) + "\n")
    return 0


def format_smallest_k(rows: list[dict], share: float = 95.0) -> str:
    """Per direction and screener: the smallest screening depth K whose re-ranked R@10 is at least `share` %
    of the fine-grained model's, its R@10 and time per query (or the best it reached)."""
    lines = ["| direction | screener | K for >= 95% | R@10 | % of fine-grained | ms / query | % of exhaustive time |",
             "|---|---|---|---|---|---|---|"]
    hybrid = [r for r in rows if r["method"] == "hybrid"]
    for direction, screener in dict.fromkeys((r["direction"], r["screener"]) for r in hybrid):
        mine = sorted((r for r in hybrid if (r["direction"], r["screener"]) == (direction, screener)),
                      key=lambda r: r["K"])
        hit = next((r for r in mine if r["R@10_vs_fine_grained"] >= share), None)
        r = hit or max(mine, key=lambda r: r["R@10_vs_fine_grained"])
        k = str(r["K"]) if hit else f"none (best: K={r['K']})"
        lines.append(f"| {direction} | {screener} | {k} | {r['R@10']:.1f} | {r['R@10_vs_fine_grained']:.1f} | "
                     f"{r['ms_per_query']:.3f} | {r['time_vs_fine_grained']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
