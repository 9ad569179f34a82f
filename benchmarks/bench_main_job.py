"""The main-job bar: wall time of `python train.py --config X` and its test metrics beside the same
model untrained (random init, run.train=false), evaluated the same way, over seeds.

    python benchmarks/bench_main_job.py [--configs hash_64bit.yaml fine_grained.yaml] [--seeds 0,1,2]
        [--out benchmarks/out/main_job] [--runs-from DIR ...] [--no-train] [--fresh] [--no-untrained]
        [key=value ...]

Each run is the real command in a subprocess, `run.seed=S` and the key=value overrides added, in
OUT/<config stem>[_untrained]_seed<S>; a finished one there (or in a --runs-from folder) trained with
the same settings is reused, --fresh trains this benchmark's own again. The shapes dataset and, for
configs that start from it, each seed's shapes backbone are made first (timed separately: both happen
once per machine) so that the train timings are comparable. Prints markdown tables (mean ± std over
the seeds, then every seed's values) and writes OUT/results.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import seeds  # noqa: E402  (seeded runs, mean and spread)

KEYS = ["i2t_R@1", "i2t_R@10", "t2i_R@1", "t2i_R@10", "rsum", "i2t_mAP@N", "t2i_mAP@N"]


def run_label(config: str, untrained: bool) -> str:
    return Path(config).stem + ("_untrained" if untrained else "")


def summary_table(results: dict[str, dict[int, dict]], walls: dict[str, list[float]], seed_list: list[int]) -> str:
    """One row per run: wall time and every metric as mean ± std over its seeds."""
    header = ["run", "seeds", "wall (s)", *KEYS]
    lines = [f"({seeds.CONVENTION.format(seeds=','.join(map(str, seed_list)))})", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, per_seed in results.items():
        agg = seeds.aggregate(per_seed)
        wall = seeds.spread(walls[name]).fmt(0) if walls[name] else "?"
        cells = [agg[k].fmt(3 if "mAP" in k else 2) for k in KEYS]
        lines.append(f"| {name} | {len(per_seed)} | {wall} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["hash_64bit.yaml", "fine_grained.yaml"])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "main_job")
    p.add_argument("--no-untrained", action="store_true", help="leave out the untrained (run.train=false) rows")
    seeds.add_arguments(p)
    p.add_argument("overrides", nargs="*", help="key=value for every run (e.g. trainer.max_steps=2)")
    args = p.parse_args(argv)
    seeds.move_overrides(args.configs, args.overrides)
    runs = seeds.Runs(args.out, args, args.overrides)
    results: dict[str, dict[int, dict]] = {}
    walls: dict[str, list[float]] = {}
    records = {}
    for config in args.configs:
        for untrained in ([True, False] if not args.no_untrained else [False]):
            label = run_label(config, untrained)
            for seed in args.seeds:
                record = runs.get(label, config, seed, ["run.train=false"] if untrained else [])
                if record is None:
                    continue
                print(seeds.report_line(label, seed, record), flush=True)
                records[seeds.run_name(label, seed)] = record
                results.setdefault(label, {})[seed] = record["metrics"]
                if record["wall_s"] is not None:
                    walls.setdefault(label, []).append(record["wall_s"])
            walls.setdefault(label, [])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({**runs.prepared, "seeds": args.seeds, "runs": records},
                                                      indent=2))
    if runs.prepared["dataset_build_s"] is not None:
        print(f"\nshapes dataset build: {runs.prepared['dataset_build_s']:.1f} s (0 when it already existed)")
    for key, seconds in runs.prepared["backbone_pretrain_s"].items():
        print(f"{key}: python -m pipeline.backbone {seconds:.1f} s (pretrains on a machine's first call for "
              f"this seed; start-up only when cached)")
    if results:
        print("\n" + summary_table(results, walls, args.seeds) + "\n\nPer seed:\n\n"
              + seeds.per_seed_table(results, KEYS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
