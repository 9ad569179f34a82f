"""The search page's API under load: latency of /api/query from several client threads against the real
`python -m pipeline.search serve` on 127.0.0.1.

    python benchmarks/bench_serve.py --index photos.index [--requests 2000] [--threads 8] [--image-every 10]
        [--k 10] [--queries FILE] [--run RUN] [--out benchmarks/out/bench_serve.json]

The server is started as a user starts it (a subprocess, any free port; OMP_NUM_THREADS is passed on as
set here) and stopped by its pid at the end. Text queries are the lines of --queries (default: a few
fixed shape descriptions); every --image-every-th request uploads one of the gallery's own images
(fetched from /api/item first). Each request opens its own connection. Printed: p50 / p95 / p99 / max
latency in ms, queries per second over the whole run, errors (any non-200 or a failed connection).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["a red circle", "a small blue square at the top right", "in the lower left corner there is a green star",
         "a big yellow triangle and a small black heart", "two shapes: a purple ring and an orange cross"]


def start(index: str, run: str | None, log) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "pipeline.search", "serve", "--index", index, "--port", "0"]
    proc = subprocess.Popen(cmd + (["--run", run] if run else []), cwd=ROOT, stdout=subprocess.PIPE, stderr=log,
                            text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
            found = re.search(r"http://[\d.]+:(\d+)/", line)
            if found:
                return proc, int(found.group(1))
            if not line:
                break
    proc.kill()
    sys.exit("the server did not start (its stderr: the log file)")


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def upload(image: bytes, k: int) -> tuple[bytes, dict]:
    b = uuid.uuid4().hex
    body = (f'--{b}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n--{b}\r\nContent-Disposition: '
            f'form-data; name="image"; filename="q.png"\r\nContent-Type: application/octet-stream\r\n\r\n').encode()
    return body + image + f"\r\n--{b}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={b}"}


def load(port: int, n: int, threads: int, texts: list[str], images: list[bytes], image_every: int, k: int):
    latencies, errors, lock = [], [], threading.Lock()

    def worker(w: int):
        for i in range(w, n, threads):
            start = time.perf_counter()
            try:
                if images and image_every and i % image_every == 0:
                    body, headers = upload(images[i % len(images)], k)
                    status, _ = request(port, "POST", "/api/query", body, headers)
                else:
                    status, _ = request(port, "GET", "/api/query?" + urlencode({"text": texts[i % len(texts)], "k": k}))
            except OSError as e:
                status = repr(e)
            with lock:
                latencies.append(time.perf_counter() - start)
                if status != 200:
                    errors.append(status)

    pool = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return latencies, errors, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True)
    p.add_argument("--run")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--image-every", type=int, default=10, help="every Nth request uploads an image (0: none)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--queries", type=Path, help="text queries, one per line")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "bench_serve.json")
    args = p.parse_args()
    texts = [t for t in args.queries.read_text().splitlines() if t.strip()] if args.queries else TEXTS
    with tempfile.TemporaryFile("w+") as log:
        proc, port = start(args.index, args.run, log)
        try:
            info = json.loads(request(port, "GET", "/api/info")[1])
            images = ([request(port, "GET", f"/api/item/{i}")[1] for i in range(min(8, info["count"]))]
                      if info["gallery"] == "images" else [])
            load(port, min(50, args.requests), args.threads, texts, images, args.image_every, args.k)  # warm-up
            latencies, errors, wall = load(port, args.requests, args.threads, texts, images, args.image_every,
                                           args.k)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    q = statistics.quantiles(latencies, n=100)
    result = {"requests": args.requests, "threads": args.threads, "image_every": args.image_every, "k": args.k,
              "gallery": f"{info['count']} {info['gallery']}", "run": info["name"], "errors": len(errors),
              "p50_ms": 1000 * q[49], "p95_ms": 1000 * q[94], "p99_ms": 1000 * q[98],
              "max_ms": 1000 * max(latencies), "queries_per_s": args.requests / wall,
              "machine": {"cpus": os.cpu_count(), "load": os.getloadavg()[0], "python": platform.python_version(),
                          "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}}
    print(f"{args.requests} queries ({info['name']}, {result['gallery']}), {args.threads} threads: "
          f"p50 {result['p50_ms']:.1f} ms, p95 {result['p95_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
          f"max {result['max_ms']:.1f} ms; {result['queries_per_s']:.0f} queries/s; errors {len(errors)} "
          f"(load average {result['machine']['load']:.1f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
