"""The FiCo-ITR comparison of trained runs: quality, encoding time, storage, query time, hybrid.

    python -m pipeline.report RUN_DIR [RUN_DIR ...] --out DIR [--quick] [--device cpu|cuda]

For each run (fine-grained or hashing, any bit length) the test split is encoded with the
run's best checkpoint (``pipeline.inference``) and the report writes to ``DIR``:

* ``report.md``: every table below, the plots, the machine and the method notes;
* ``quality.csv``: the paper's tables 2-4 for these models, instance-level R@1/5/10 and
  R@50/100/200, category-level mAP@10/100/N, both directions, and the largest difference
  to the run's own ``test_metrics.json`` (0 when the checkpoint and data are the ones the
  run was tested with);
* ``encoding.csv``: forward time per item and side (images/s, captions/s), with batch size,
  device and threads; ``storage.csv``: bytes per item and per gallery, float embeddings vs
  packed codes vs the paper's one byte per bit;
* ``query_time.csv``: query time against gallery size (``--sizes``, default 1K/5K ... 1M/5M
  images/captions) for two kinds of gallery: ``duplicated`` (the paper's method: the test
  set repeated) and ``distinct`` (random items drawn from a Gaussian fitted to the model's
  test outputs: embeddings re-normalised, codes = signs). Exhaustive search is ours
  (``topk_search`` for embeddings, ``hamming_topk`` for codes) over the gallery streamed
  in blocks, so memory is bounded by the block, not by gallery x queries; on a CPU a fixed
  sample of real test queries (``--queries``, default 1,000) is timed and the total for the
  size's full query set extrapolated; on a GPU (``--device cuda``) the full query sets are
  run. faiss (``IndexBinaryFlat``, ``IndexBinaryIVF`` for codes; ``IndexFlatIP``,
  ``IndexHNSWFlat`` for embeddings) runs on the same sample, with build time and recall@k
  against the exhaustive result;
* ``hybrid.csv``: hash screening + fine-grained re-ranking (``hybrid.py``) for every
  fine-grained run with every hashing run, a distilled and a SimHash screener, on the test
  gallery and on a large gallery with distractors, against K;
* ``quality_vs_query_time.png``, ``quality_vs_bytes.png``, ``query_time_vs_gallery.png``.

With a W&B logger configured in the first run's config (or ``--wandb on``) the tables and
images are logged to one W&B run (``job_type=report``; offline unless logged in).
``--quick`` shrinks everything (sizes, queries, distillation) to seconds, for tests.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.cli import int_list, progress_bar
from pipeline.comparison import plots
from pipeline.comparison.hybrid import HYBRID_COLUMNS, format_rows, run_hybrid
from pipeline.comparison.measure import machine_info
from pipeline.comparison.panels import panel_markdown, write_panels
from pipeline.comparison.query_time import QUERY_COLUMNS, query_time_rows
from pipeline.comparison.screeners import fine_grained_screeners, run_screeners
from pipeline.comparison.token_costs import TOKEN_QUERY_NOTE, token_storage_rows, with_token_rows
from pipeline.comparison.token_hybrid import TOKEN_HYBRID_NOTE, token_hybrid_rows
from pipeline.comparison.report_wandb import log_wandb
from pipeline.comparison.writers import markdown_table, write_csv
from pipeline.inference.encoding import EncodedSplit, encode_split
from pipeline.inference.runs import Run, RunError, load_run
from pipeline.inference.scoring import split_metrics

DEEP_KS = (1, 5, 10, 50, 100, 200)
MAP_NAMES = ("mAP@10", "mAP@100", "mAP@N")
DEFAULT_SIZES = ((1_000, 5_000), (10_000, 50_000), (100_000, 500_000), (1_000_000, 5_000_000))
QUICK_SIZES = ((500, 2_500), (2_000, 10_000))

QUALITY_COLUMNS = (["model", "family", "representation"]
                   + [f"{d}_{m}" for d in ("i2t", "t2i") for m in [f"R@{k}" for k in DEEP_KS] + ["MedianR", "MeanR"]]
                   + ["rsum"] + [f"{d}_{m}" for d in ("i2t", "t2i") for m in MAP_NAMES]
                   + ["max_abs_diff_vs_test_metrics"])
ENCODING_COLUMNS = ["model", "side", "items", "batch_size", "device", "threads", "seconds", "items_per_s",
                    "ms_per_item"]
STORAGE_COLUMNS = ["model", "storage", "bytes_per_item", "test_gallery_items", "test_gallery_MiB",
                   "gallery_1M_5M_GiB"]


def quality_row(run: Run, enc: EncodedSplit, bits: int | None = None) -> dict:
    """The run's protocol figures re-computed from its encoded split; with `bits`, those of a nested prefix."""
    if bits is not None:
        enc = enc.prefix(bits)
    res = split_metrics(run, enc, DEEP_KS)  # token runs: scored as their test split was (test_scoring.json)
    own = run.test_metrics() or {}
    if bits is not None:  # the run's own figures for this prefix
        own = {k.split("/", 1)[1]: v for k, v in own.items() if k.startswith(f"{bits}bit/")}
    # the run's own numbers were computed with its own ks: compare every name both have
    # (rsum is R@1/5/10 of both directions whatever the ks)
    shared = [k for k in own if k in res]
    diff = max((abs(res[k] - own[k]) for k in shared), default=float("nan"))
    name, representation = ((run.name, run.representation) if bits is None
                            else (f"{run.name}@{bits}", f"first {bits} bits of {run.dim}"))
    return {"model": name, "family": run.family, "representation": representation, **res,
            "max_abs_diff_vs_test_metrics": diff}


def encoding_rows(run: Run, enc: EncodedSplit) -> list[dict]:
    t = enc.timing
    rows = []
    for side, items, seconds, bs in (("image", t["images"], t["image_seconds"], t["batch_size"]),
                                     ("text", t["texts"], t["text_seconds"], round(t["captions_per_batch"]))):
        rows.append({"model": run.name, "side": side, "items": items, "batch_size": bs, "device": t["device"],
                     "threads": t["threads"], "seconds": seconds, "items_per_s": items / max(seconds, 1e-12),
                     "ms_per_item": 1000.0 * seconds / max(items, 1)})
    return rows


def storage_rows(run: Run, enc: EncodedSplit) -> list[dict]:
    if enc.has_tokens:
        return token_storage_rows(run, enc)
    n = enc.num_images + enc.num_texts
    scaled = 1_000_000 + 5_000_000
    if run.family == "hash":
        bits = run.dim
        kinds = [(f"packed codes, {bits} bits (ours)", bits // 8), ("one int8 per bit (paper's count)", bits)]
        kinds += [(f"packed codes, first {p} bits (nested prefix)", p // 8) for p in run.module.prefixes]
    else:
        kinds = [(f"{run.dim}-d float32", run.dim * 4)]
    return [{"model": run.name, "storage": name, "bytes_per_item": b, "test_gallery_items": n,
             "test_gallery_MiB": n * b / 2**20, "gallery_1M_5M_GiB": scaled * b / 2**30} for name, b in kinds]


@dataclass
class Options:
    sizes: tuple
    kinds: tuple
    queries: int
    k: int
    block_items: int
    faiss: bool
    faiss_max_float: int
    hnsw_max: int
    hybrid_galleries: tuple
    hybrid_K: tuple
    hybrid_queries: int
    token_K: tuple
    token_cap_s: float
    distill_bits: tuple
    distill_steps: int
    simhash_bits: tuple
    repeats: int
    quick: bool


def _parse_sizes(text: str) -> tuple:
    out = []
    for part in text.split(","):
        a, _, b = part.partition(":")
        out.append((int(float(a)), int(float(b or float(a) * 5))))
    return tuple(out)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories written by train.py")
    p.add_argument("--out", required=True, type=Path, help="report folder")
    p.add_argument("--quick", action="store_true", help="tiny sizes and sample counts (seconds; for tests)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (encoding and exhaustive search)")
    p.add_argument("--batch-size", type=int, help="encoding batch size (default: the run's eval_batch_size)")
    p.add_argument("--data-root", help="the dataset folder, when it moved since training")
    p.add_argument("--workers", type=int, default=None, help="data workers for encoding (default: the run's)")
    p.add_argument("--sizes", type=_parse_sizes, help="images:captions gallery sizes, e.g. 1e3:5e3,1e4:5e4")
    p.add_argument("--kinds", default="duplicated,distinct", help="gallery kinds: duplicated,distinct")
    p.add_argument("--queries", type=int, help="timed queries per point (default 1000 on CPU; 0 = full query "
                   "sets, the default on CUDA)")
    p.add_argument("--k", type=int, default=10, help="k of the timed top-k searches and of recall@k")
    p.add_argument("--block-items", type=int, default=1 << 18, help="gallery items per streamed block")
    p.add_argument("--no-faiss", action="store_true", help="skip the faiss indexes")
    p.add_argument("--faiss-max-float", type=int, default=1_000_000, help="largest float gallery given to faiss")
    p.add_argument("--hnsw-max", type=int, default=100_000, help="largest gallery given to IndexHNSWFlat")
    p.add_argument("--hybrid-gallery", type=int_list, default=None,
                   help="hybrid gallery sizes per side besides the test split (default 100000; quick 2000)")
    p.add_argument("--hybrid-K", type=int_list, default=None, help="screening depths K")
    p.add_argument("--hybrid-queries", type=int, default=None, help="timed hybrid queries per direction")
    p.add_argument("--token-K", type=int_list, default=None, help="screen depths of token runs (default "
                   "10,30,100,300; quick 10,50)")
    p.add_argument("--token-cap-s", type=float, default=86_400.0, help="token runs: an exhaustive total above this "
                   "is reported as 'does not finish' (default one day)")
    p.add_argument("--distill-bits", type=int_list, default=(64,), help="distilled screeners (0: none)")
    p.add_argument("--distill-steps", type=int, default=None)
    p.add_argument("--simhash-bits", type=int_list, default=(64,), help="SimHash screeners (0: none)")
    p.add_argument("--repeats", type=int, default=None, help="timing repeats for the hybrid (median)")
    p.add_argument("--wandb", choices=("auto", "on", "off"), default="auto",
                   help="auto: when the first run's config has logger.wandb=true")
    p.add_argument("--wandb-mode", choices=("online", "offline", "disabled"), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def options(args, device: torch.device) -> Options:
    q = args.quick
    queries = args.queries if args.queries is not None else ((0 if device.type == "cuda" else 1000) if not q else 16)
    return Options(
        sizes=args.sizes or (QUICK_SIZES if q else DEFAULT_SIZES),
        kinds=tuple(k for k in args.kinds.split(",") if k),
        queries=queries, k=args.k, block_items=args.block_items if not q else 4096,
        faiss=not args.no_faiss, faiss_max_float=args.faiss_max_float, hnsw_max=args.hnsw_max,
        hybrid_galleries=args.hybrid_gallery or ((2_000,) if q else (100_000,)),
        hybrid_K=args.hybrid_K or ((1, 10, 100) if q else (1, 10, 30, 100, 300, 1000, 3000)),
        hybrid_queries=args.hybrid_queries or (16 if q else 500),
        token_K=args.token_K or ((10, 50) if q else (10, 30, 100, 300)), token_cap_s=args.token_cap_s,
        distill_bits=args.distill_bits, distill_steps=args.distill_steps or (30 if q else 2000),
        simhash_bits=args.simhash_bits, repeats=args.repeats or (1 if q else 3), quick=q)


def build_report(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda, but no CUDA device is available")
    opt = options(args, device)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    info = machine_info(device)
    started = time.perf_counter()

    runs = [load_run(p, data_root=args.data_root, num_workers=args.workers) for p in args.runs]
    names = [r.name for r in runs]
    for r in runs:  # two runs of one config: tell them apart by folder
        if names.count(r.name) > 1:
            r.name = r.path.name
    encoded = [encode_split(r, "test", device=device, batch_size=args.batch_size, progress=progress) for r in runs]

    quality = [quality_row(r, e, bits) for r, e in zip(runs, encoded) for bits in (*r.module.prefixes, None)]
    encoding = [row for r, e in zip(runs, encoded) for row in encoding_rows(r, e)]
    storage = [row for r, e in zip(runs, encoded) for row in storage_rows(r, e)]

    n_points = len(runs) * len(opt.kinds) * len(opt.sizes) * 2
    bar = progress_bar(n_points, "query time (model x gallery x size x direction)", progress, unit="point")
    query = []
    for r, e in zip(runs, encoded):
        rows = query_time_rows(r, e, opt.sizes, opt.kinds, opt.queries, opt.k, device, opt.block_items,
                               opt.faiss and _has_faiss(), opt.faiss_max_float, opt.hnsw_max, opt.quick, args.seed, bar)
        query += with_token_rows(r, e, rows, opt.sizes, opt.token_K, opt.token_cap_s, args.seed) if r.tokens else rows
    bar.close()

    hybrid = hybrid_section(runs, encoded, opt, device, out, progress, args.seed)

    paths, panels, panel_paths = {}, [], {}
    if plots.available():
        panels, panel_paths = write_panels(runs, encoded, out, args.seed)  # what each run retrieves, drawn
        if hybrid:
            paths["quality_vs_query_time"] = out / "quality_vs_query_time.png"
            plots.plot_quality_vs_time(hybrid, paths["quality_vs_query_time"])
        paths["quality_vs_bytes"] = out / "quality_vs_bytes.png"
        plots.plot_quality_vs_bytes(quality, storage, paths["quality_vs_bytes"])
        paths["query_time_vs_gallery"] = out / "query_time_vs_gallery.png"
        plots.plot_time_vs_gallery(query, paths["query_time_vs_gallery"])
        if curves := plots.load_curves(runs):  # each run's test_curves.json, one line per run
            paths["test_curves"] = out / "test_curves.png"
            plots.plot_curves(curves, paths["test_curves"])

    tables = {"quality": (QUALITY_COLUMNS, quality), "encoding": (ENCODING_COLUMNS, encoding),
              "storage": (STORAGE_COLUMNS, storage), "query_time": (QUERY_COLUMNS, query),
              "hybrid": (HYBRID_COLUMNS, hybrid)}
    for name, (cols, rows) in tables.items():
        write_csv(out / f"{name}.csv", rows, cols)
    info["report_seconds"] = time.perf_counter() - started
    (out / "report.md").write_text(render_markdown(runs, tables, paths, info, opt)
                                   + "\n".join(panel_markdown(panels, panel_paths)))
    paths.update(panel_paths)  # W&B and the caller get the panels with the plots
    (out / "report.json").write_text(json.dumps({"machine": info, **{n: rows for n, (_, rows) in tables.items()}},
                                                indent=1, default=str) + "\n")
    use_wandb = args.wandb == "on" or (args.wandb == "auto" and bool(runs[0].cfg.logger.wandb))
    wandb_dir = log_wandb(runs, out, tables, paths, info, args.wandb_mode) if use_wandb else None
    return {"out": out, "tables": tables, "images": paths, "wandb_dir": wandb_dir, "info": info}


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401  (is it installed?)
    except ImportError:
        print("faiss is not installed (pip install -e '.[report]'): faiss rows skipped", file=sys.stderr)
        return False
    return True


def hybrid_section(runs, encoded, opt: Options, device, out: Path, progress: bool, seed: int) -> list[dict]:
    fgs = [(r, e) for r, e in zip(runs, encoded) if r.family == "fine_grained"]
    hashes = [(r, e) for r, e in zip(runs, encoded) if r.family == "hash"]
    rows = []
    for fg_run, fg in fgs:
        screeners = {}
        for r, e in hashes:  # every hashing run of the same test split screens, a nested one also by its prefixes
            if np.array_equal(e.image_ids, fg.image_ids) and np.array_equal(e.text_ids, fg.text_ids):
                screeners.update(run_screeners(r.name, e, r.module.prefixes))
        screeners.update(fine_grained_screeners(fg_run, fg, opt.distill_bits, opt.simhash_bits, opt.distill_steps,
                                                device, out / "distilled", progress, seed))
        if fg.has_tokens:  # token re-ranking, on the test split (token sets have no distractors)
            queries = min(opt.hybrid_queries, 100)
            rows += [{"fine_grained": fg_run.name, **r} for r in token_hybrid_rows(
                fg_run, fg, screeners, opt.token_K, queries, opt.repeats, seed)]
            continue
        if not screeners:
            continue
        for size in (0, *opt.hybrid_galleries):  # 0: the test split alone
            for r in run_hybrid(fg, screeners, size, opt.hybrid_K, opt.hybrid_queries, opt.repeats, seed,
                                progress=progress):
                rows.append({"fine_grained": fg_run.name, **r})
    return rows


def render_markdown(runs, tables: dict, paths: dict, info: dict, opt: Options) -> str:
    quality = tables["quality"][1]
    pct = {c: (lambda v: f"{100 * v:.1f}") for c in QUALITY_COLUMNS if "mAP" in c}
    lines = ["# FiCo-ITR comparison report", ""]
    lines += ["Runs: " + ", ".join(f"`{r.name}` ({r.family}, {r.representation}, {r.checkpoint})" for r in runs), ""]
    lines += ["Machine: " + ", ".join(f"{k} = {v}" for k, v in info.items()), ""]
    lines += ["## 1. Retrieval quality (test split, each run's checkpoint re-encoded)", "",
              "Instance level (paper Table 2), R@K in %. `check` is the largest absolute difference to the run's "
              "own `test_metrics.json` over the names both have (0: the same numbers).", ""]
    inst = [{**q, "check": q["max_abs_diff_vs_test_metrics"]} for q in quality]
    lines.append(markdown_table(inst, ["model", "family", "representation", "i2t_R@1", "i2t_R@5", "i2t_R@10",
                                       "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum", "check"],
                                {"check": lambda v: f"{v:.1e}"}))
    lines += ["", "Deep instance lists (paper Table 3), R@K in %:", ""]
    lines.append(markdown_table(quality, ["model", "i2t_R@50", "i2t_R@100", "i2t_R@200", "t2i_R@50", "t2i_R@100",
                                          "t2i_R@200"]))
    lines += ["", "Category level (paper Table 4), mAP in % (relevant: shares a label):", ""]
    lines.append(markdown_table(quality, ["model"] + [f"{d}_{m}" for d in ("i2t", "t2i") for m in MAP_NAMES], pct))
    lines += ["", "## 2. Encoding time and storage", "",
              "Model forward only (encoder + head), data loading excluded, first batch warm-up untimed. "
              "Text batch size = captions per batch (mean).", ""]
    lines.append(markdown_table(tables["encoding"][1], ENCODING_COLUMNS,
                                {"seconds": lambda v: f"{v:.3f}", "items_per_s": lambda v: f"{v:,.0f}",
                                 "ms_per_item": lambda v: f"{v:.3f}"}))
    lines += ["", "Storage: test gallery = test images + captions; 1M/5M = 6M items as in the paper's Table 5.", ""]
    lines.append(markdown_table(tables["storage"][1], STORAGE_COLUMNS,
                                {"test_gallery_MiB": lambda v: f"{v:.3f}", "gallery_1M_5M_GiB": lambda v: f"{v:.2f}"}))
    q_rows = tables["query_time"][1]
    lines += ["", "## 3. Query time against gallery size", "",
              f"Top-{opt.k} per query. `duplicated`: the test set repeated (the paper's method); `distinct`: random "
              "items with the model's statistics. Exhaustive rows are our chunked search over the gallery streamed "
              f"in blocks of {opt.block_items:,} items (peak extra memory measured; it is bounded by the block, not "
              "by gallery x queries). "
              + ("Timed on a fixed sample of real test queries; `total_s` extrapolates to the size's full query "
                 "set (images for i2t, captions for t2i). " if opt.queries > 0 else "Full query sets. ")
              + "faiss rows: same sample, CPU, `total_s` = build + extrapolated search; recall@k against our "
                "exhaustive result (tie-aware: an item scoring at least the exact k-th score counts).", ""]
    if any(r.tokens for r in runs):
        lines += [TOKEN_QUERY_NOTE.format(cap=opt.token_cap_s), ""]
    lines.append(markdown_table(q_rows, ["model", "gallery", "size", "direction", "method", "params", "timed_queries",
                                         "build_s", "ms_per_query", "total_s", "recall@k", "peak_extra_MiB"],
                                {"ms_per_query": lambda v: f"{v:.4f}", "build_s": lambda v: f"{v:.2f}",
                                 "total_s": lambda v: f"{v:,.1f}", "recall@k": lambda v: f"{v:.3f}",
                                 "peak_extra_MiB": lambda v: f"{v:.0f}"}))
    hybrid = tables["hybrid"][1]
    lines += ["", "## 4. Hybrid: hash screening, fine-grained re-ranking", ""]
    if hybrid:
        lines += ["Hamming top-K screen, then the fine-grained model orders the K candidates. Quality over every "
                  "test query, time per query over a fixed sample (median of repeats, same process). "
                  "`candidate recall` = queries whose true match is among the K candidates. The reference time "
                  "(`time vs fine grained` = 100) is the faster of two exhaustive fp32 searches: `topk_search` "
                  "(tie rule) and a plain blocked matmul + `torch.topk`. Large galleries: the "
                  "test split plus distractors drawn with the models' own statistics (`pipeline/comparison/galleries.py`). "
                  "Screeners: hashing runs as trained (a nested run also by each prefix, `NAME@L`, and in two "
                  "levels, `NAME@16>64`: the top 10 x K by 16 bits, then the top K of those by 64), "
                  "`distilled-B` = a B-bit hash head trained on the "
                  "fine-grained model's frozen embeddings with an instance-level contrastive + distillation loss, "
                  "`simhash-B` = random hyperplanes on the same embeddings (no training).", ""]
        lines += [TOKEN_HYBRID_NOTE, ""] if any(r.tokens for r in runs) else []
        lines.append(format_rows(hybrid))
    else:
        lines.append("No fine-grained run among the inputs: nothing to re-rank with.")
    lines += ["", "## 5. Plots", ""]
    for name, path in paths.items():
        lines.append(f"![{name}]({path.name})")
    lines += ["", "CSV files: " + ", ".join(f"`{n}.csv`" for n in tables), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = build_report(args)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {result['out'] / 'report.md'} ({result['info']['report_seconds']:.1f} s)")
    if result["wandb_dir"]:
        print(f"W&B: {result['wandb_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
