"""The hashing family side by side on the shapes data, every run the real `python train.py --config X` with the
config's own epochs: instance-level 64-bit codes against UCCH-64 and the fine-grained model (R@1 / R@10), the
supervised 64-bit codes against UCCH-64 (mAP@N), and each prefix of the nested 128-bit model against the
dedicated model of that length (mAP@N, R@10).

    python benchmarks/bench_hash_family.py [--out benchmarks/out/hash_family] [--fresh] [--only NAME ...]

Runs live in OUT/runs/<name>; a finished one is reused (so an interrupted benchmark continues), --fresh trains
all again. The distilled instance run learns from the fine-grained run of the same benchmark. Prints three
markdown tables and writes OUT/results.json (metrics, wall time and the load average after each run).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# name -> (config, extra overrides); order matters: the distilled run needs the fine-grained one
RUNS = {
    "fine_grained": ("fine_grained.yaml", []),
    "hash_64bit": ("hash_64bit.yaml", []),
    "hash_instance_64bit": ("hash_instance_64bit.yaml", []),
    "hash_instance_64bit_distilled": ("hash_instance_64bit.yaml", ["hash.instance.teacher={runs}/fine_grained"]),
    "hash_supervised_64bit": ("hash_supervised_64bit.yaml", []),
    "hash_nested": ("hash_nested.yaml", []),
    "hash_16bit": ("hash_16bit.yaml", []),
    "hash_32bit": ("hash_32bit.yaml", []),
    "hash_128bit": ("hash_128bit.yaml", []),
}


def train(name: str, runs: Path, fresh: bool) -> dict:
    """The finished run `name` (trained now unless it already finished): its test metrics, wall time, load."""
    run_dir = runs / name
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    record = run_dir / "bench.json"
    if (run_dir / "test_metrics.json").is_file() and record.is_file():
        return {**json.loads(record.read_text()), "reused": True}
    config, extra = RUNS[name]
    cmd = [sys.executable, "train.py", "--config", config, f"run.root={runs}", f"run.name={name}",
           *(e.format(runs=runs) for e in extra)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    result = {"wall_s": wall, "load_after": os.getloadavg(), "command": " ".join(cmd[1:]),
              "metrics": json.loads((run_dir / "test_metrics.json").read_text())}
    record.write_text(json.dumps(result, indent=1))
    return result


def table(header: list[str], rows: list[list]) -> str:
    cells = [[f"{v:.3f}" if isinstance(v, float) and abs(v) < 1.5 else f"{v:.1f}" if isinstance(v, float) else str(v)
              for v in row] for row in rows]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in cells])


def instance_table(m: dict) -> str:
    fg = m["fine_grained"]
    rows = []
    for name in ("fine_grained", "hash_instance_64bit", "hash_instance_64bit_distilled", "hash_64bit"):
        if name in m:
            r = m[name]
            rows.append([name, r["i2t_R@1"], r["i2t_R@10"], r["t2i_R@1"], r["t2i_R@10"],
                         f"{100 * r['i2t_R@1'] / fg['i2t_R@1']:.0f} / {100 * r['t2i_R@1'] / fg['t2i_R@1']:.0f}",
                         r["i2t_mAP@N"], r["t2i_mAP@N"]])
    return table(["run", "i2t R@1", "i2t R@10", "t2i R@1", "t2i R@10", "R@1 % of fine-grained (i2t / t2i)",
                  "i2t mAP@N", "t2i mAP@N"], rows)


def category_table(m: dict) -> str:
    rows = [[name, m[name]["i2t_mAP@N"], m[name]["t2i_mAP@N"], m[name]["i2t_mAP@100"], m[name]["t2i_mAP@100"],
             m[name]["i2t_R@10"], m[name]["t2i_R@10"]]
            for name in ("hash_supervised_64bit", "hash_64bit", "hash_instance_64bit", "fine_grained") if name in m]
    return table(["run", "i2t mAP@N", "t2i mAP@N", "i2t mAP@100", "t2i mAP@100", "i2t R@10", "t2i R@10"], rows)


def nested_table(m: dict) -> str:
    nested = m["hash_nested"]
    rows = []
    for bits in (16, 32, 64, 128):
        own = {k.split("/", 1)[1]: v for k, v in nested.items() if k.startswith(f"{bits}bit/")} if bits < 128 \
            else nested
        dedicated = m.get(f"hash_{bits}bit")
        row = [bits, own["i2t_mAP@N"], own["t2i_mAP@N"], own["i2t_R@10"], own["t2i_R@10"]]
        if dedicated:
            row += [dedicated["i2t_mAP@N"], dedicated["t2i_mAP@N"], dedicated["i2t_R@10"], dedicated["t2i_R@10"],
                    f"{own['i2t_mAP@N'] - dedicated['i2t_mAP@N']:+.3f} / {own['t2i_mAP@N'] - dedicated['t2i_mAP@N']:+.3f}"]
        rows.append(row)
    return table(["bits", "nested i2t mAP@N", "nested t2i mAP@N", "nested i2t R@10", "nested t2i R@10",
                  "dedicated i2t mAP@N", "dedicated t2i mAP@N", "dedicated i2t R@10", "dedicated t2i R@10",
                  "nested - dedicated mAP@N (i2t / t2i)"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "hash_family")
    p.add_argument("--fresh", action="store_true", help="train every run again")
    p.add_argument("--only", nargs="*", choices=sorted(RUNS), help="train only these (the tables show what exists)")
    args = p.parse_args(argv)
    runs = (args.out / "runs").resolve()
    runs.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in RUNS:
        if args.only is None or name in args.only:
            results[name] = train(name, runs, args.fresh)
        elif (runs / name / "bench.json").is_file():
            results[name] = json.loads((runs / name / "bench.json").read_text())
        if name in results:
            r = results[name]
            print(f"{name}: {r['wall_s']:.0f} s, load after {r['load_after'][0]:.1f}"
                  + (" (reused)" if r.get("reused") else ""), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    m = {name: r["metrics"] for name, r in results.items()}
    if {"fine_grained", "hash_instance_64bit"} <= set(m):
        print("\nInstance level (test split, R@K in %):\n\n" + instance_table(m))
    if {"hash_supervised_64bit", "hash_64bit"} <= set(m):
        print("\nCategory level (mAP as fractions, R@10 in %):\n\n" + category_table(m))
    if "hash_nested" in m:
        print("\nNested 128-bit codes, each prefix against the dedicated UCCH model of its length:\n\n"
              + nested_table(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
