"""The main-job bar: wall time of `python train.py --config X` and its test metrics beside the same
model untrained (random init, run.train=false), evaluated the same way.

    python benchmarks/bench_main_job.py [--configs hash_64bit.yaml fine_grained.yaml] [--out benchmarks/out/main_job]

Each run is the real command in a subprocess; the shapes dataset and, for configs that start from
it, the shapes backbone are made first (timed separately: both happen once per machine) so that the
train timings are comparable. Prints a markdown table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEYS = ["i2t_R@1", "i2t_R@10", "t2i_R@1", "t2i_R@10", "rsum", "i2t_mAP@N", "t2i_mAP@N"]


def run(config: str, out: Path, extra: list[str]) -> tuple[float, dict]:
    name = Path(config).stem + ("_untrained" if "run.train=false" in extra else "")
    cmd = [sys.executable, "train.py", "--config", config, f"run.root={out}", f"run.name={name}", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    run_dir = sorted(out.glob(f"{name}*"), key=lambda p: p.stat().st_mtime)[-1]
    return wall, json.loads((run_dir / "test_metrics.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--configs", nargs="+", default=["hash_64bit.yaml", "fine_grained.yaml"])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "main_job")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from data_prep import build_shapes
    from pipeline.config import load_config

    start = time.perf_counter()
    build_shapes(ROOT / "data" / "shapes")
    results = {"dataset_build_s": time.perf_counter() - start, "backbone_pretrain_s": {}, "runs": {}}
    for config in args.configs:
        if load_config(config).model.image_encoder.init == "shapes":  # made once, like the dataset: timed apart
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "pipeline.backbone", "--config", config], cwd=ROOT, check=True)
            results["backbone_pretrain_s"][config] = time.perf_counter() - start
        for label, extra in (("untrained", ["run.train=false"]), ("trained", [])):
            wall, metrics = run(config, args.out, extra)
            results["runs"][f"{config} {label}"] = {"wall_s": wall, **metrics}
            print(f"{config} {label}: {wall:.0f} s", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nshapes dataset build: {results['dataset_build_s']:.1f} s (0 when it already existed)")
    for config, seconds in results["backbone_pretrain_s"].items():
        print(f"{config}: python -m pipeline.backbone {seconds:.1f} s (pretrains on a machine's first call; "
              f"start-up only when cached)")
    print()
    print("| run | wall (s) | " + " | ".join(KEYS) + " |\n|" + "---|" * (len(KEYS) + 2))
    for name, r in results["runs"].items():
        print(f"| {name} | {r['wall_s']:.0f} | " + " | ".join(f"{r[k]:.3f}" if "mAP" in k else f"{r[k]:.2f}"
                                                           for k in KEYS) + " |")


if __name__ == "__main__":
    main()
