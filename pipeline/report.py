"""The FiCo-ITR comparison of trained runs: quality, encoding time, storage, query time, hybrid.

    python -m pipeline.report RUN_DIR [RUN_DIR ...] --out DIR [--quick] [--device cpu|cuda]

For each run (fine-grained or hashing, any bit length) the test split is encoded with the
run's best checkpoint (``pipeline.encode``) and the report writes to ``DIR``:

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
* ``hybrid.csv``: hash screening + fine-grained re-ranking (``pipeline.hybrid``) for every
  fine-grained run with every hashing run, a distilled and a SimHash screener, on the test
  gallery and on a large gallery with distractors, against K;
* ``quality_vs_query_time.png``, ``quality_vs_bytes.png``, ``query_time_vs_gallery.png``.

With a W&B logger configured in the first run's config (or ``--wandb on``) the tables and
images are logged to one W&B run (``job_type=report``; offline unless logged in).
``--quick`` shrinks everything (sizes, queries, distillation) to seconds, for tests.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.cli import int_list, progress_bar
from pipeline.encode import EncodedSplit, Run, RunError, encode_split, load_run
from pipeline.hamming import backend as hamming_backend
from pipeline.hamming import hamming_topk
from pipeline.metrics import evaluate
from pipeline.retrieval import pack_codes, topk_search

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
QUERY_COLUMNS = ["model", "gallery", "size", "direction", "gallery_items", "method", "params", "device",
                 "timed_queries", "build_s", "search_s", "ms_per_query", "full_queries", "total_s", "extrapolated",
                 "recall@k", "k", "peak_extra_MiB", "block_items"]


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: _csv_value(r.get(c)) for c in columns})


def _csv_value(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)  # shortest exact form: CSV numbers round-trip
    return "" if v is None else v


def markdown_table(rows: Sequence[dict], columns: Sequence[str], formats: dict | None = None) -> str:
    formats = formats or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("–")
            elif c in formats:
                cells.append(formats[c](v))
            elif isinstance(v, float):
                cells.append(f"{v:.2f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _size_label(n: int) -> str:
    for div, suffix in ((1_000_000, "M"), (1_000, "K")):
        if n >= div and n % (div // 10) == 0:
            v = n / div
            return f"{v:g}{suffix}"
    return str(n)


class PeakRSS:
    """Peak resident memory above the level at entry (Linux: VmHWM reset via clear_refs);
    ``mib`` is None where the kernel does not allow the reset."""

    def __enter__(self):
        self.mib = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = self._read("VmRSS")
        except OSError:
            self.base = None
        return self

    @staticmethod
    def _read(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise OSError(key)

    def __exit__(self, *exc):
        if self.base is not None:
            try:
                self.mib = max(0.0, (self._read("VmHWM") - self.base) / 1024.0)
            except OSError:
                pass


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "numpy": np.__version__, "device": str(device),
            "hamming_kernel": hamming_backend(), "python": platform.python_version()}
    try:
        info["load_average_at_start"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        pass
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except ImportError:
        info["faiss"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# --------------------------------------------------------------------------------------------
# quality, encoding, storage
# --------------------------------------------------------------------------------------------
def quality_row(run: Run, enc: EncodedSplit) -> dict:
    res = evaluate(enc.image_gallery, enc.text_gallery, enc.caption_image, enc.labels, measure=run.measure,
                   ks=DEEP_KS)
    own = run.test_metrics() or {}
    # the run's own numbers were computed with its own ks: compare every name both have
    # (rsum is R@1/5/10 of both directions whatever the ks)
    shared = [k for k in own if k in res]
    diff = max((abs(res[k] - own[k]) for k in shared), default=float("nan"))
    return {"model": run.name, "family": run.family, "representation": run.representation, **res,
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
    n = enc.num_images + enc.num_texts
    scaled = 1_000_000 + 5_000_000
    if run.family == "hash":
        bits = run.dim
        kinds = [(f"packed codes, {bits} bits (ours)", bits // 8), ("one int8 per bit (paper's count)", bits)]
    else:
        kinds = [(f"{run.dim}-d float32", run.dim * 4)]
    return [{"model": run.name, "storage": name, "bytes_per_item": b, "test_gallery_items": n,
             "test_gallery_MiB": n * b / 2**20, "gallery_1M_5M_GiB": scaled * b / 2**30} for name, b in kinds]


# --------------------------------------------------------------------------------------------
# query time against gallery size
# --------------------------------------------------------------------------------------------
class ItemSource:
    """Gallery (or query) items of one side of one model, produced in blocks.

    ``duplicated``: the test items repeated (row i is test item i mod n), the paper's method;
    ``distinct``: rows drawn from a Gaussian fitted to the model's continuous test outputs of
    this side, re-normalised (embeddings) or signed and packed (codes); block b of the
    stream always gets the same seed, so a gallery is the same whichever block size reads it.
    """

    BLOCK = 1 << 16  # generation granularity (rows per seed)

    def __init__(self, enc: EncodedSplit, side: str, kind: str, hashed: bool, seed: int = 0):
        from pipeline.hybrid import GaussianSampler

        self.kind, self.hashed, self.seed = kind, hashed, seed
        self.test = np.ascontiguousarray(enc.image_gallery if side == "image" else enc.text_gallery)
        cont = enc.image if side == "image" else enc.text
        self.sampler = GaussianSampler(cont, block=self.BLOCK) if kind == "distinct" else None
        self.side_seed = 0 if side == "image" else 1
        self._cached = (None, None)  # (block number, its rows): streamed reads come in small sequential pieces

    @property
    def item_bytes(self) -> int:
        return self.test.shape[1] * self.test.itemsize

    def rows(self, a: int, b: int) -> np.ndarray:
        if self.kind == "duplicated":
            return self.test[np.arange(a, b) % len(self.test)]
        out = []
        for blk in range(a // self.BLOCK, (b - 1) // self.BLOCK + 1):
            lo, hi = blk * self.BLOCK, (blk + 1) * self.BLOCK
            out.append(self._block(blk)[max(a, lo) - lo:min(b, hi) - lo])
        return np.concatenate(out)

    def _block(self, blk: int) -> np.ndarray:
        if self._cached[0] != blk:
            x = self.sampler.sample(self.BLOCK, self.seed * 1_000_003 + blk * 2 + self.side_seed)
            rows = pack_codes(x, zero_one=False).numpy() if self.hashed else F.normalize(x, dim=1).numpy()
            self._cached = (blk, rows)
        return self._cached[1]


def _merge(best, new, k: int):
    """Top-k of two (scores, indices) lists under the tie rule; ``best`` holds lower indices."""
    if best is None:
        return new
    s = torch.cat([best[0], new[0]], 1)
    i = torch.cat([best[1], new[1]], 1)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return s.gather(1, order), i.gather(1, order)


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
            best = _merge(best, (s, i + a), k)
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
            best = _merge(best, (s, i + a), k)
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
            label = f"{_size_label(n_img)}/{_size_label(n_txt)}"
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


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_quality_vs_time(hybrid: list[dict], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    galleries = sorted({r["gallery"] for r in hybrid}, key=lambda s: int(s.replace(",", "")))
    biggest = galleries[-1] if galleries else None
    for ax, direction in zip(axes, ("i2t", "t2i")):
        rows = [r for r in hybrid if r["direction"] == direction and r["gallery"] == biggest]
        for r in rows:
            if r["method"] == "fine-grained exhaustive":
                ax.scatter(r["ms_per_query"], r["R@10"], marker="*" if r["screener"] == "mm+topk" else "P", s=150,
                           color="k", zorder=3, label=f"fine-grained exhaustive ({r['screener']})")
        screeners = sorted({r["screener"] for r in rows if r["method"] != "fine-grained exhaustive"})
        for idx, name in enumerate(screeners):
            color = f"C{idx}"
            h = [r for r in rows if r["screener"] == name and r["method"] == "hybrid"]
            h.sort(key=lambda r: r["K"])
            ax.plot([r["ms_per_query"] for r in h], [r["R@10"] for r in h], "-o", color=color, ms=4,
                    label=f"hybrid: {name} screen + fine-grained re-rank")
            for r in h:
                ax.annotate(f"K={r['K']}", (r["ms_per_query"], r["R@10"]), fontsize=7, color=color,
                            xytext=(3, -9), textcoords="offset points")
            for r in rows:
                if r["screener"] == name and r["method"] == "hash only":
                    ax.scatter(r["ms_per_query"], r["R@10"], marker="s", color=color, s=40,
                               label=f"{name} alone")
        ax.set_xscale("log")
        ax.set_xlabel("query time per query (ms, log)")
        ax.set_ylabel("R@10 (%)")
        ax.set_title(f"{direction}: gallery {biggest} items per side")
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Quality against query time (hybrid curves run over K)")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quality_vs_bytes(quality: list[dict], storage: list[dict], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (metric, label) in zip(axes, ((("i2t_R@10", "t2i_R@10"), "R@10 (%), mean of i2t and t2i"),
                                          (("i2t_mAP@N", "t2i_mAP@N"), "mAP@N, mean of i2t and t2i"))):
        for idx, q in enumerate(quality):
            y = (q[metric[0]] + q[metric[1]]) / 2
            st = [s for s in storage if s["model"] == q["model"]]
            ours = st[0]["bytes_per_item"]
            ax.scatter(ours, y, color=f"C{idx}", s=60, label=f"{q['model']} ({q['representation']})")
            if len(st) > 1:  # the paper's one byte per bit
                ax.scatter(st[1]["bytes_per_item"], y, facecolors="none", edgecolors=f"C{idx}", s=60)
                ax.annotate("", xy=(ours, y), xytext=(st[1]["bytes_per_item"], y),
                            arrowprops={"arrowstyle": "->", "color": f"C{idx}", "alpha": 0.6})
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes per item (log2); hollow = the paper's one byte per bit")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle("Quality against storage (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_time_vs_gallery(rows: list[dict], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    keys = sorted({(r["model"], r["method"]) for r in rows})
    for ax, direction in zip(axes, ("i2t", "t2i")):
        for idx, key in enumerate(keys):
            for kind, style in (("distinct", "-"), ("duplicated", ":")):
                pts = sorted((r["gallery_items"], r["ms_per_query"]) for r in rows
                             if (r["model"], r["method"]) == key and r["gallery"] == kind
                             and r["direction"] == direction)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", ms=3, color=f"C{idx % 10}",
                            label=f"{key[0]}: {key[1]}" if kind == "distinct" else None)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("gallery items (log)")
        ax.set_title(f"{direction} (solid: distinct items, dotted: duplicated test set)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("ms per query (log)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# W&B
# --------------------------------------------------------------------------------------------
def log_wandb(runs: list[Run], out: Path, tables: dict, images: dict, info: dict, mode: str | None) -> str | None:
    """One W&B run holding every table and plot; returns its directory (None when W&B is missing)."""
    try:
        import wandb
    except ImportError:
        return None
    from pipeline.run import wandb_mode

    cfg = runs[0].cfg
    run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, dir=str(out), job_type="report",
                     mode=mode or wandb_mode(cfg.logger.mode), name=f"report-{'-'.join(r.name for r in runs)}"[:120],
                     config={"runs": [str(r.path) for r in runs], **info}, reinit="finish_previous")
    for name, (columns, rows) in tables.items():
        run.log({f"report/{name}": wandb.Table(columns=list(columns),
                                               data=[[_csv_value(r.get(c)) for c in columns] for r in rows])})
    for name, path in images.items():
        run.log({f"report/{name}": wandb.Image(str(path))})
    run.summary.update({f"report/{q['model']}/rsum": q["rsum"] for q in tables["quality"][1]})
    directory = run.dir
    run.finish()
    return directory


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------
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

    quality = [quality_row(r, e) for r, e in zip(runs, encoded)]
    encoding = [row for r, e in zip(runs, encoded) for row in encoding_rows(r, e)]
    storage = [row for r, e in zip(runs, encoded) for row in storage_rows(r, e)]

    n_points = len(runs) * len(opt.kinds) * len(opt.sizes) * 2
    bar = progress_bar(n_points, "query time (model x gallery x size x direction)", progress, unit="point")
    query = []
    for r, e in zip(runs, encoded):
        query += query_time_rows(r, e, opt.sizes, opt.kinds, opt.queries, opt.k, device, opt.block_items,
                                 opt.faiss and _has_faiss(), opt.faiss_max_float, opt.hnsw_max, opt.quick,
                                 args.seed, bar)
    bar.close()

    hybrid = hybrid_section(runs, encoded, opt, device, out, progress, args.seed)

    paths = {"quality_vs_query_time": out / "quality_vs_query_time.png",
             "quality_vs_bytes": out / "quality_vs_bytes.png",
             "query_time_vs_gallery": out / "query_time_vs_gallery.png"}
    if hybrid:
        plot_quality_vs_time(hybrid, paths["quality_vs_query_time"])
    else:
        paths.pop("quality_vs_query_time")
    plot_quality_vs_bytes(quality, storage, paths["quality_vs_bytes"])
    plot_time_vs_gallery(query, paths["query_time_vs_gallery"])

    from pipeline.hybrid import HYBRID_COLUMNS

    tables = {"quality": (QUALITY_COLUMNS, quality), "encoding": (ENCODING_COLUMNS, encoding),
              "storage": (STORAGE_COLUMNS, storage), "query_time": (QUERY_COLUMNS, query),
              "hybrid": (HYBRID_COLUMNS, hybrid)}
    for name, (cols, rows) in tables.items():
        write_csv(out / f"{name}.csv", rows, cols)
    info["report_seconds"] = time.perf_counter() - started
    (out / "report.md").write_text(render_markdown(runs, tables, paths, info, opt))
    (out / "report.json").write_text(json.dumps({"machine": info, **{n: rows for n, (_, rows) in tables.items()}},
                                                indent=1, default=str) + "\n")
    use_wandb = args.wandb == "on" or (args.wandb == "auto" and bool(runs[0].cfg.logger.wandb))
    wandb_dir = log_wandb(runs, out, tables, paths, info, args.wandb_mode) if use_wandb else None
    return {"out": out, "tables": tables, "images": paths, "wandb_dir": wandb_dir, "info": info}


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        print("faiss is not installed (pip install -e '.[report]'): faiss rows skipped", file=sys.stderr)
        return False
    return True


def hybrid_section(runs, encoded, opt: Options, device, out: Path, progress: bool, seed: int) -> list[dict]:
    from pipeline.hybrid import fine_grained_screeners, run_hybrid

    fgs = [(r, e) for r, e in zip(runs, encoded) if r.family == "fine_grained"]
    hashes = {r.name: e for r, e in zip(runs, encoded) if r.family == "hash"}
    rows = []
    for fg_run, fg in fgs:
        screeners = {n: e for n, e in hashes.items()
                     if np.array_equal(e.image_ids, fg.image_ids) and np.array_equal(e.text_ids, fg.text_ids)}
        screeners.update(fine_grained_screeners(fg_run, fg, opt.distill_bits, opt.simhash_bits, opt.distill_steps,
                                                device, out / "distilled", progress, seed))
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
    lines.append(markdown_table(q_rows, ["model", "gallery", "size", "direction", "method", "params", "timed_queries",
                                         "build_s", "ms_per_query", "total_s", "recall@k", "peak_extra_MiB"],
                                {"ms_per_query": lambda v: f"{v:.4f}", "build_s": lambda v: f"{v:.2f}",
                                 "total_s": lambda v: f"{v:,.1f}", "recall@k": lambda v: f"{v:.3f}",
                                 "peak_extra_MiB": lambda v: f"{v:.0f}"}))
    hybrid = tables["hybrid"][1]
    lines += ["", "## 4. Hybrid: hash screening, fine-grained re-ranking", ""]
    if hybrid:
        from pipeline.hybrid import format_rows

        lines += ["Hamming top-K screen, then the fine-grained model orders the K candidates. Quality over every "
                  "test query, time per query over a fixed sample (median of repeats, same process). "
                  "`candidate recall` = queries whose true match is among the K candidates. The reference time "
                  "(`time vs fine grained` = 100) is the faster of two exhaustive fp32 searches: `topk_search` "
                  "(tie rule) and a plain blocked matmul + `torch.topk`. Large galleries: the "
                  "test split plus distractors drawn with the models' own statistics (`pipeline.hybrid`). "
                  "Screeners: hashing runs as trained, `distilled-B` = a B-bit hash head trained on the "
                  "fine-grained model's frozen embeddings with an instance-level contrastive + distillation loss, "
                  "`simhash-B` = random hyperplanes on the same embeddings (no training).", ""]
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
