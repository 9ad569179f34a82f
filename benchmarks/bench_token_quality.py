"""Token-level models against the global one on the shapes data, the same number of epochs: test R@1,
R@10 and rsum of `fine_grained_tokens.yaml` (late interaction) and `fine_grained_scan.yaml`
(cross-attention) beside `fine_grained.yaml` and the untrained copies of all three, each the real
`python train.py` command in a subprocess, with its wall time.

    python benchmarks/bench_token_quality.py [--configs fine_grained_tokens.yaml fine_grained_scan.yaml]
        [--baseline fine_grained.yaml] [--out benchmarks/out/token_quality] [key=value ...]

The baseline trains as many epochs as the token configs (they must agree). The shapes set and backbone
are made first and timed apart (once per machine), so the wall times are the runs alone; a fresh clone
pays both once (see the printed line). Token runs are tested as their config says (exhaustive token
scoring by default; test_scoring.json). Prints a markdown table, writes results.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_main_job import run  # noqa: E402  (the real command in a subprocess, its metrics)

KEYS = ["i2t_R@1", "i2t_R@10", "t2i_R@1", "t2i_R@10", "rsum"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["fine_grained_tokens.yaml", "fine_grained_scan.yaml"])
    p.add_argument("--baseline", default="fine_grained.yaml")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "token_quality")
    p.add_argument("overrides", nargs="*", help="key=value for every run (e.g. data.num_workers=2)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from data_prep import build_shapes
    from pipeline.config import load_config

    epochs = {load_config(c, args.overrides).trainer.max_epochs for c in args.configs}
    if len(epochs) != 1:
        raise SystemExit(f"the token configs train different numbers of epochs: {sorted(epochs)}")
    epochs = epochs.pop()
    start = time.perf_counter()
    build_shapes(ROOT / "data" / "shapes")
    results = {"epochs": epochs, "dataset_build_s": time.perf_counter() - start, "runs": {}}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.backbone", "--config", args.configs[0]], cwd=ROOT, check=True)
    results["backbone_pretrain_s"] = time.perf_counter() - start
    for config in [args.baseline, *args.configs]:
        extra = [*args.overrides, f"trainer.max_epochs={epochs}"]
        for label, more in (("untrained", ["run.train=false"]), ("trained", [])):
            wall, metrics = run(config, args.out, extra + more)
            results["runs"][f"{config} {label}"] = {"wall_s": wall, **metrics}
            print(f"{config} {label}: {wall:.0f} s, rsum {metrics['rsum']:.2f}", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nshapes dataset build {results['dataset_build_s']:.1f} s (0 when it already existed), backbone "
          f"{results['backbone_pretrain_s']:.1f} s (start-up only when cached); {epochs} epochs each\n")
    base = results["runs"][f"{args.baseline} trained"]["rsum"]
    print("| run | wall (s) | " + " | ".join(KEYS) + " | rsum - global |\n|" + "---|" * (len(KEYS) + 3))
    for name, r in results["runs"].items():
        print(f"| {name} | {r['wall_s']:.0f} | " + " | ".join(f"{r[k]:.2f}" for k in KEYS)
              + f" | {r['rsum'] - base:+.2f} |")


if __name__ == "__main__":
    main()
