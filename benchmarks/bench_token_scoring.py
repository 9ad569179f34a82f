"""Scoring cost of token-level runs on this CPU: exhaustive token scoring against global cosine against
the screened two-stage ranking (global top K re-ranked by the token scorer) at K = 50 / 100 / 200, with
the R@1 each keeps.

For each trained token run (`--run`, e.g. runs/fine_grained_tokens) its test split (shapes: 1,000 images,
5,000 captions) is encoded once, then:
* quality, every test query, by the protocol: R@1 of global cosine, of exhaustive token scoring and of
  the screened ranking at each K (`pipeline.inference.scoring.split_metrics`);
* time at the test split: each query's top 10, for all queries of a direction. Exhaustive token scoring
  scores every (image, caption) pair once (one pass serves both directions, so its time is counted for
  each); the screen is `topk_search` on the global embeddings; re-ranking gathers each query's K
  candidates' token sets and scores the pairs;
* time at larger duplicated galleries (`--sizes`, default 100K images / 500K captions: the test items
  repeated, as the FiCo-ITR paper does), on `--queries` sampled queries, per query: global cosine top 10,
  screened top K + re-ranking, and exhaustive token scoring extrapolated from the cost per pair measured
  at the test split.

    python benchmarks/bench_token_scoring.py --run runs/fine_grained_tokens --run runs/fine_grained_scan \\
        [--K 50,100,200] [--sizes 100000:500000] [--queries 200] [--repeats 3]

Prints one table per run and writes benchmarks/out/token_scoring.json. Medians of --repeats, every
method timed in the same process one after the other.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.cli import int_list  # noqa: E402
from pipeline.comparison.measure import median_seconds  # noqa: E402
from pipeline.evaluation.exhaustive import topk_search  # noqa: E402
from pipeline.evaluation.protocol import evaluate  # noqa: E402
from pipeline.inference.encoding import encode_split  # noqa: E402
from pipeline.inference.runs import load_run  # noqa: E402
from pipeline.inference.scoring import split_metrics  # noqa: E402

RERANK_PAIRS = 1 << 14  # (query, candidate) pairs scored at once: gathered token sets stay ~100s of MiB


def _rerank(scorer, q_set, g_set, queries, cand, images_query: bool):
    """Top 10 of each query's candidates by the token scorer (the candidates' token sets gathered), in
    chunks of queries so that memory does not grow with the number of queries."""
    step = max(1, RERANK_PAIRS // cand.shape[1])
    tops = [_rerank_chunk(scorer, q_set, g_set, queries[a:a + step], cand[a:a + step], images_query)
            for a in range(0, len(queries), step)]
    return torch.cat([t[0] for t in tops]), torch.cat([t[1] for t in tops])


def _rerank_chunk(scorer, q_set, g_set, queries, cand, images_query: bool):
    scores = scorer.candidates(q_set[queries], g_set, cand, images_query)  # as screened evaluation re-ranks
    return torch.topk(scores, min(10, cand.shape[1]), dim=1)


@torch.inference_mode()
def bench_run(run_dir: Path, Ks, sizes, n_queries: int, repeats: int, seed: int) -> dict:
    run = load_run(run_dir, num_workers=0)
    enc = encode_split(run, "test", progress=False)
    scorer = run.module.token_scorer
    (img, txt), g_img, g_txt = enc.token_sets(), torch.from_numpy(enc.image_gallery), torch.from_numpy(enc.text_gallery)
    n, m = enc.num_images, enc.num_texts
    quality = {"global cosine": evaluate(enc.image_gallery, enc.text_gallery, enc.caption_image)}
    quality["token exhaustive"] = split_metrics(run, enc, mode="exhaustive")
    for k in Ks:
        quality[f"token screened K={k}"] = split_metrics(run, enc, mode="screened", k=k)
    rows = []

    # the test split: all queries of each direction
    grid_s = median_seconds(lambda: torch.topk(scorer(img, txt), 10, dim=1), 1)  # one pass, ~seconds
    pair_s = grid_s / (n * m)
    for direction, q_set, g_set, q_emb, g_emb, nq in (("i2t", img, txt, g_img, g_txt, n),
                                                     ("t2i", txt, img, g_txt, g_img, m)):
        times = {"global cosine": median_seconds(lambda: topk_search(q_emb, g_emb, 10), repeats), "token exhaustive": grid_s}
        for k in Ks:
            def screened(k=k):
                _, cand = topk_search(q_emb, g_emb, k)
                return _rerank(scorer, q_set, g_set, torch.arange(nq), cand, direction == "i2t")

            times[f"token screened K={k}"] = median_seconds(screened, repeats)
        for method, seconds in times.items():
            rows.append({"gallery": f"test {n:,}/{m:,}", "direction": direction, "method": method,
                         "ms_per_query": 1000 * seconds / nq, "total_s": seconds,
                         "R@1": quality[method][f"{direction}_R@1"], "extrapolated": False})

    # duplicated galleries: a sample of queries, per-query times
    rng = np.random.default_rng(seed)
    for n_img, n_txt in sizes:
        for direction, q_set, g_set, q_emb, g_emb, n_g, nq in (("i2t", img, txt, g_img, g_txt, n_txt, n),
                                                               ("t2i", txt, img, g_txt, g_img, n_img, m)):
            reps = -(-n_g // len(g_emb))
            gallery = g_emb.repeat(reps, 1)[:n_g].contiguous()
            queries = torch.from_numpy(np.sort(rng.choice(nq, min(n_queries, nq), replace=False)))
            q = q_emb[queries]
            times = {"global cosine": median_seconds(lambda: topk_search(q, gallery, 10), repeats)}
            for k in Ks:
                def screened(k=k):
                    _, cand = topk_search(q, gallery, k)
                    return _rerank(scorer, q_set, g_set, queries, cand % len(g_emb), direction == "i2t")

                times[f"token screened K={k}"] = median_seconds(screened, repeats)
            times["token exhaustive"] = pair_s * n_g * len(queries)
            for method, seconds in times.items():
                rows.append({"gallery": f"duplicated {n_g:,}", "direction": direction, "method": method,
                             "ms_per_query": 1000 * seconds / len(queries), "total_s": None, "R@1": None,
                             "extrapolated": method == "token exhaustive"})
    return {"run": str(run_dir), "scorer": run.scorer_name, "quality": quality, "rows": rows,
            "pair_us": 1e6 * pair_s, "load": os.getloadavg(), "threads": torch.get_num_threads()}


def print_run(result: dict) -> None:
    print(f"\n{result['run']} ({result['scorer']}), {result['threads']} threads, load {result['load'][0]:.1f}; "
          f"exhaustive token scoring: {result['pair_us']:.2f} us per pair")
    print("| gallery | direction | method | ms / query | vs token exhaustive (time) | R@1 | vs token exhaustive (R@1) "
          "| vs global cosine (time) |\n|---|---|---|---|---|---|---|---|")
    rows = result["rows"]
    for r in rows:
        same = [x for x in rows if x["gallery"] == r["gallery"] and x["direction"] == r["direction"]]
        ex = next(x for x in same if x["method"] == "token exhaustive")
        cos = next(x for x in same if x["method"] == "global cosine")
        r1 = "" if r["R@1"] is None else f"{r['R@1']:.1f}"
        keep = "" if r["R@1"] is None or not ex["R@1"] else f"{100 * r['R@1'] / ex['R@1']:.1f} %"
        note = " (extrapolated)" if r["extrapolated"] else ""
        print(f"| {r['gallery']} | {r['direction']} | {r['method']}{note} | {r['ms_per_query']:.3f} | "
              f"{r['ms_per_query'] / ex['ms_per_query']:.3f} | {r1} | {keep} | {r['ms_per_query'] / cos['ms_per_query']:.2f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, type=Path, help="a token-level run directory")
    p.add_argument("--K", type=int_list, default=(50, 100, 200))
    p.add_argument("--sizes", default="100000:500000", help="images:captions of the duplicated galleries")
    p.add_argument("--queries", type=int, default=200, help="sampled queries at the duplicated galleries")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    sizes = [tuple(int(float(x)) for x in s.split(":")) for s in args.sizes.split(",") if s]
    results = [bench_run(r, args.K, sizes, args.queries, args.repeats, args.seed) for r in args.run]
    for result in results:
        print_run(result)
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "token_scoring.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
