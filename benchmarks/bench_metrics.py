"""Time and peak memory of ``pipeline.metrics.evaluate`` versus ``fico_itr``.

    python benchmarks/bench_metrics.py [--quick] [--repeats 3] [--fico-repeats 1] [--measures hamming] [--all]

COCO-size retrieval: 5,000 images x 25,000 captions (5 per image, shuffled),
80-category multi-hot labels with COCO-like skewed frequencies; cosine on
random 256-d float32 embeddings (captions = image + noise) and hamming on
64-bit codes (sign of a random projection of the same embeddings). Both
methods compute everything: R@1/5/10, MedianR, MeanR and mAP@10/100/N in both
directions; fico_itr as documented (compute_similarity + instance_retrieval +
category_retrieval at k = 10, 100, None). ``--all`` also times ``evaluate(..., all_metrics=True)``
(every published convention, docs/protocol.md) in its own subprocess.

Each (method, measure) runs in its own subprocess, so ``ru_maxrss`` is that
method's own peak (imports and the input data included; "rss_inputs" is the
resident size just before the timed calls). ``--quick``: 1,000 x 5,000.
Agreement: on tie-free float64 scores (1,000 x 5,000) the two must agree to
1e-9; at full size on float32 the numbers are compared and the differences
reported (float32 scores tie a few times per 25,000-item row, and fico_itr
orders ties by numpy's unstable sort, we by index; BLAS rounding differs too).
Writes benchmarks/out/bench_metrics[_quick].json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
DIM, BITS, N_LABELS = 256, 64, 80
MAP_KS = (10, 100, None)


# --------------------------------------------------------------------------
# data (regenerated identically in every subprocess)
# --------------------------------------------------------------------------
def make_data(n: int, m: int, measure: str, dtype=np.float32, seed: int = 0):
    rng = np.random.default_rng(seed)
    cap = np.arange(m) % n  # 5 per image at 5K x 25K
    rng.shuffle(cap)
    img = rng.standard_normal((n, DIM), dtype=np.float32)
    txt = img[cap] + 1.5 * rng.standard_normal((m, DIM), dtype=np.float32)
    freq = 0.45 * (np.arange(N_LABELS) + 1.0) ** -0.7  # "person" ~0.45, ~2.7 labels per image
    labels = (rng.random((n, N_LABELS)) < freq).astype(np.uint8)
    if measure == "hamming":
        proj = rng.standard_normal((DIM, BITS), dtype=np.float32)
        return (img @ proj > 0).astype(np.uint8), (txt @ proj > 0).astype(np.uint8), cap, labels
    return img.astype(dtype), txt.astype(dtype), cap, labels


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --------------------------------------------------------------------------
# the two methods
# --------------------------------------------------------------------------
def run_ours(img, txt, cap, labels, measure):
    from pipeline.metrics import evaluate

    # hash codes arrive as 0/1 uint8 per bit, which would read as packed bytes: pass bool
    if measure == "hamming":
        img, txt = img.astype(bool), txt.astype(bool)
    return evaluate(img, txt, cap, labels, measure=measure, map_ks=MAP_KS)


def run_ours_all(img, txt, cap, labels, measure):
    from pipeline.metrics import evaluate

    if measure == "hamming":
        img, txt = img.astype(bool), txt.astype(bool)
    return evaluate(img, txt, cap, labels, measure=measure, map_ks=MAP_KS, all_metrics=True)


def run_fico(img, txt, cap, labels, measure):
    from fico_itr import category_retrieval, compute_similarity, instance_retrieval

    mapping = cap.tolist()  # a Python list: the ndarray path crashes
    sim = compute_similarity(img, txt, measure)
    i2t, t2i = instance_retrieval(sim, captions_per_image=mapping)
    out = {f"i2t_{k}": float(v) for k, v in i2t.items()}
    out.update({f"t2i_{k}": float(v) for k, v in t2i.items()})
    for k in MAP_KS:
        a, b = category_retrieval(sim, labels, k=k, captions_per_image=mapping)
        name = "N" if k is None else k
        out[f"i2t_mAP@{name}"], out[f"t2i_mAP@{name}"] = float(a), float(b)
    return out


def worker(method: str, measure: str, n: int, m: int, repeats: int, dtype: str) -> dict:
    data = make_data(n, m, measure, dtype=np.dtype(dtype))
    if method.startswith("ours"):
        import pipeline.metrics  # noqa: F401  (import cost is not part of the timing)
        from pipeline.evaluation import hamming
        hamming._kernel()  # the one-off build of the compiled loops is not part of the timing either
    else:
        import fico_itr  # noqa: F401
    rss_inputs = rss_mb()
    fn = {"ours": run_ours, "ours_all": run_ours_all, "fico": run_fico}[method]
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = fn(*data, measure)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"method": method, "measure": measure, "n_images": n, "n_captions": m, "dtype": dtype,
            "times_s": times, "cpu_s": cpu, "median_s": float(np.median(times)),
            "peak_rss_mb": peak_rss_mb(), "rss_inputs_mb": rss_inputs, "metrics": metrics}


def kernels_worker(n_q: int = 1000, n_g: int = 25000) -> dict:
    """Hamming kernels on packed 64-bit codes: which is fastest on this CPU."""
    import torch

    from pipeline.evaluation.scores import _hamming_matmul, _hamming_popcount, pack_codes

    rng = np.random.default_rng(1)
    q = pack_codes(torch.from_numpy(rng.random((n_q, BITS)) < 0.5))
    g = pack_codes(torch.from_numpy(rng.random((n_g, BITS)) < 0.5))
    lut = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)

    def lookup_table():
        out = torch.empty(n_q, n_g, dtype=torch.int32)
        for a in range(0, n_q, 16):
            out[a:a + 16] = -lut[(q[a:a + 16, None, :] ^ g[None]).long()].sum(-1)
        return out

    candidates = {
        "xor_popcount_numpy": lambda: torch.from_numpy(_hamming_popcount(q.numpy(), g.numpy())),
        "pm1_matmul_torch": lambda: _hamming_matmul(q, g),
        "xor_lookup_table_torch": lookup_table,
    }
    want = candidates["xor_popcount_numpy"]()
    result = {}
    for name, fn in candidates.items():
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            got = fn()
            times.append(time.perf_counter() - t0)
        assert torch.equal(got, want), name
        result[name] = float(np.median(times))
    return {"shape": [n_q, n_g, BITS], "median_s": result}


def check_worker(n: int, m: int) -> dict:
    """Tie-free float64 scores: both methods must agree to rounding."""
    import torch  # noqa: F401

    data = make_data(n, m, "cosine", dtype=np.float64)
    ours, ref = run_ours(*data, "cosine"), run_fico(*data, "cosine")
    diffs = {k: abs(ours[k] - ref[k]) for k in ref}
    return {"n_images": n, "n_captions": m, "dtype": "float64", "max_abs_diff": max(diffs.values()),
            "ours": ours, "fico": ref}


# --------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------
def spawn(*args: str) -> dict:
    """Run one worker in a fresh interpreter; its last stdout line is JSON."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["loadavg_1min_before"] = load
    return result


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def compare(ours: dict, fico: dict) -> dict:
    diffs = {k: abs(ours[k] - fico[k]) for k in fico}
    return {"max_abs_diff": max(diffs.values()),
            "differing": {k: [ours[k], fico[k]] for k, d in diffs.items() if d > 1e-9}}


def table(runs: list[dict], agreement: dict) -> str:
    lines = ["| measure | method | median wall (s) | median CPU (s) | runs | peak RSS (MB) | RSS above inputs (MB) "
             "| wall fico/ours | peak RSS ours/fico | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["measure"], r["method"]): r for r in runs}
    names = {"ours": "evaluate", "ours_all": "evaluate all_metrics", "fico": "fico_itr"}
    for measure in ("cosine", "hamming"):
        ours, ref = by.get((measure, "ours")), by.get((measure, "fico"))
        for r in (ours, by.get((measure, "ours_all")), ref):
            if r is None:
                continue
            speed = mem = diff = ""
            if r is not ref and ref is not None:
                speed = f"{ref['median_s'] / r['median_s']:.1f}x"
                mem = f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.3f}"
                diff = f"{agreement[measure]['max_abs_diff']:.2g}" if r is ours else ""
            lines.append(f"| {measure} | {names[r['method']]} "
                         f"| {r['median_s']:.2f} | {np.median(r['cpu_s']):.2f} | {len(r['times_s'])} "
                         f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['rss_inputs_mb']:.0f} "
                         f"| {speed} | {mem} | {diff} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 x 5,000 instead of 5,000 x 25,000")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of evaluate (median reported)")
    parser.add_argument("--fico-repeats", type=int, default=None, help="timed runs of fico_itr (default 1, quick 2)")
    parser.add_argument("--skip-fico", action="store_true", help="time evaluate only")
    parser.add_argument("--measures", default="cosine,hamming")
    parser.add_argument("--all", action="store_true", help="also time evaluate(..., all_metrics=True)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, *rest = args.worker
        if kind == "kernels":
            result = kernels_worker()
        elif kind == "check":
            result = check_worker(*map(int, rest))
        else:
            measure, n, m, repeats, dtype = rest
            result = worker(kind, measure, int(n), int(m), int(repeats), dtype)
        print(json.dumps(result))
        return

    n, m = (1000, 5000) if args.quick else (5000, 25000)
    fico_repeats = args.fico_repeats or (2 if args.quick else 1)
    started = time.time()
    runs, agreement, notes = [], {}, []
    for measure in args.measures.split(","):
        ours = spawn("ours", measure, str(n), str(m), str(args.repeats), "float32")
        runs.append(ours)
        print(f"evaluate  {measure:8s} median {ours['median_s']:.2f} s  peak {ours['peak_rss_mb']:.0f} MB",
              flush=True)
        if args.all:
            every = spawn("ours_all", measure, str(n), str(m), str(args.repeats), "float32")
            runs.append(every)
            print(f"evaluate all_metrics {measure:8s} median {every['median_s']:.2f} s "
                  f"({every['median_s'] / ours['median_s']:.2f}x the default set)", flush=True)
        if args.skip_fico:
            continue
        need_gb = n * m * BITS * 1.3 / 2**30 if measure == "hamming" else n * m * 24 / 2**30
        if mem_available_gb() < need_gb + 2:
            notes.append(f"fico_itr {measure} skipped: needs ~{need_gb:.0f} GB, {mem_available_gb():.0f} GB available")
            print(notes[-1], flush=True)
            continue
        ref = spawn("fico", measure, str(n), str(m), str(fico_repeats), "float32")
        runs.append(ref)
        agreement[measure] = compare(ours["metrics"], ref["metrics"])
        print(f"fico_itr  {measure:8s} median {ref['median_s']:.2f} s  peak {ref['peak_rss_mb']:.0f} MB  "
              f"max |diff| {agreement[measure]['max_abs_diff']:.2g}", flush=True)
    check = None if args.skip_fico else spawn("check", "1000", "5000")
    kernels = spawn("kernels")

    report = {
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "numpy": np.__version__, "torch": _version("torch"), "fico_itr": _version("fico_itr")},
        "size": [n, m], "runs": runs, "agreement_float32": agreement, "check_float64_tie_free": check,
        "hamming_kernels": kernels, "notes": notes, "wall_s": time.time() - started,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"bench_metrics{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps(report, indent=1))

    print(f"\n{n} images x {m} captions, {os.cpu_count()}-core CPU ({_cpu_name()}), "
          f"load average at start {runs[0]['loadavg_1min_before']:.1f}\n")
    print(table(runs, agreement))
    if check:
        print(f"\ntie-free float64 check at 1000 x 5000: max |evaluate - fico_itr| = {check['max_abs_diff']:.2g}")
    for measure, a in agreement.items():
        if a["differing"]:
            print(f"{measure} float32: metrics that differ (ours, fico): {a['differing']}")
    print("hamming kernels (1000 x 25000 x 64 bits, median s): "
          + ", ".join(f"{k} {v:.3f}" for k, v in kernels["median_s"].items()))
    for note in notes:
        print(note)
    print(f"\nwrote {path.relative_to(ROOT)}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - reporting only
        return "?"


if __name__ == "__main__":
    main()
