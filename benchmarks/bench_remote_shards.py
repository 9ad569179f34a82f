"""Shards read over HTTP against the same shards read from the folder: samples/s.

The shapes dataset (built once into --work at its default size: 10,000 training images at 64 px, shards
of 1,000) is served by `python -m http.server` in its own process on 127.0.0.1 (a free port). Two
measurements, each run --reps times with the folder and the server interleaved, so that load from
other processes hits both alike; medians are printed:

1. the training loader alone (`pipeline.data.build_stream` as training uses it: batch --batch,
   --workers loader processes), samples/s after the first batch, over --samples samples;
2. the same short training run (`python train.py --config hash_64bit.yaml`, --steps steps of batch
   --batch) with data.root the folder or the URL: the samples/s the run logs (`train/samples_per_sec`,
   every 5 steps; its median over the run, the first window left out).

    python benchmarks/bench_remote_shards.py [--workers 0 2] [--samples 4096] [--steps 60] [--reps 3]

A server on the same machine measures what HTTP and the shard reader cost (request, copy through a
socket, the reader's checks), not a network: a remote server adds its bandwidth and latency, which the
loader's workers hide as long as one worker's shard arrives faster than the step consumes it.
"""
from __future__ import annotations

import argparse
import csv
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from data_prep import build_shapes  # noqa: E402
from pipeline.data import DatasetCard, SharedEpoch, build_stream, image_transform, load_tokenizer  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "dataset.json", timeout=1).read()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the HTTP server did not start")


def loader_rate(root, batch: int, workers: int, samples: int, seed: int) -> tuple[float, float]:
    """Samples/s of the training stream after its first batch (worker start-up apart), and the CPU ms per
    sample of this process (with 0 workers all the reading and decoding; the server's own work is in
    its process, as it would be on another machine): CPU time does not depend on what the neighbours do."""
    card = DatasetCard.read(root)
    loader, _ = build_stream(card, "train", train=True, batch_size=batch, rank=0, world=1, num_workers=workers,
                             seed=seed, epoch=SharedEpoch(), tokenizer=load_tokenizer(card), max_text_len=48,
                             transform=image_transform(64, [0.5] * 3, [0.25] * 3),
                             steps_per_epoch=samples // batch + 1)
    it = iter(loader)
    next(it)
    start, cpu, seen = time.perf_counter(), time.process_time(), 0
    for b in it:
        seen += len(b["image_ids"])
        if seen >= samples:
            break
    rate, cpu_ms = seen / (time.perf_counter() - start), 1e3 * (time.process_time() - cpu) / seen
    del it
    return rate, cpu_ms


def run_rate(root, work: Path, runs: Path, name: str, batch: int, steps: int, workers: int) -> float:
    """The median samples/s a short training run logs (every 5 steps; the first window left out)."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    args = ["--config", "hash_64bit.yaml", f"data.root={root}", f"data.batch_size={batch}", "trainer.max_epochs=1",
            f"data.steps_per_epoch={steps}", f"data.num_workers={workers}", "trainer.log_every_n_steps=5",
            "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "logger.wandb=false",
            f"run.root={runs}", f"run.name={name}"]
    # from --work: the shapes backbone is cached in its data/backbones once for every run
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=work, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"train.py failed: {proc.stderr[-2000:]}")
    with open(runs / name / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    key = next(k for k in rows[0] if k.startswith("train/samples_per_s"))  # the throughput the run logs
    rates = [float(r[key]) for r in rows if r.get(key)]
    return statistics.median(rates[1:] or rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--samples", type=int, default=4096, help="samples timed per loader measurement")
    p.add_argument("--steps", type=int, default=60, help="training steps per run")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "remote_shards")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    folder = build_shapes(args.work / "shapes")
    runs_dir = args.work / time.strftime("runs-%Y%m%d-%H%M%S")  # fresh run folders: never a resume
    runs_dir.mkdir()
    server, url = start_server(folder)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; shapes served at {url}; "
          f"batch {args.batch}, medians of {args.reps}", flush=True)
    loader, cpu, runs = {}, {}, {}
    try:
        for rep in range(args.reps):
            for workers in args.workers:
                for where, root in (("folder", folder), ("http", url)):
                    r, cpu_ms = loader_rate(root, args.batch, workers, args.samples, rep)
                    loader.setdefault((where, workers), []).append(r)
                    cpu.setdefault((where, workers), []).append(cpu_ms)
                    print(f"  rep {rep} loader {where:>6} workers={workers}: {r:8.1f} samples/s, "
                          f"{cpu_ms:.2f} CPU ms/sample here", flush=True)
            for where, root in (("folder", folder), ("http", url)):
                r = run_rate(root, args.work, runs_dir, f"{where}-{rep}", args.batch, args.steps, max(args.workers))
                runs.setdefault(where, []).append(r)
                print(f"  rep {rep} train.py {where:>6}: {r:8.1f} samples/s", flush=True)
    finally:
        server.kill()
        server.wait()
    med = statistics.median
    print(f"\n| measurement | folder (samples/s) | HTTP, 127.0.0.1 (samples/s) | HTTP / folder | HTTP / folder, "
          f"each rep |\n|---|---|---|---|---|")

    def row(label, f_all, h_all, fmt=".0f"):
        f, h = med(f_all), med(h_all)
        reps = ", ".join(f"{b / a:.2f}" for a, b in zip(f_all, h_all))
        print(f"| {label} | {f:{fmt}} | {h:{fmt}} | {h / f:.2f}x | {reps} |")

    for workers in args.workers:
        row(f"training loader, {workers} workers", loader[("folder", workers)], loader[("http", workers)])
    row(f"train.py hash_64bit, {max(args.workers)} workers", runs["folder"], runs["http"])
    if 0 in args.workers:
        row("CPU ms per sample, loader with 0 workers (lower is better)", cpu[("folder", 0)], cpu[("http", 0)],
            ".2f")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
