"""Token-level models against the global one on the shapes data, the same number of epochs: test R@1,
R@10 and rsum of `fine_grained_tokens.yaml` (late interaction) and `fine_grained_scan.yaml`
(cross-attention) beside `fine_grained.yaml` and the untrained copies of all three, each the real
`python train.py` command in a subprocess (run.seed=S added), with its wall time, over seeds.

    python benchmarks/bench_token_quality.py [--configs fine_grained_tokens.yaml fine_grained_scan.yaml]
        [--baseline fine_grained.yaml] [--seeds 0,1,2] [--out benchmarks/out/token_quality]
        [--runs-from DIR ...] [--no-train] [--fresh] [--no-untrained] [key=value ...]

The baseline trains as many epochs as the token configs (they must agree). The shapes set and each
seed's backbone are made first and timed apart (once per machine), so the wall times are the runs
alone; a fresh clone pays both once (see the printed line). Runs live in OUT/<config stem>[_untrained]
_seed<S>; a finished one there or in a --runs-from folder, trained with the same settings, is reused.
Token runs are tested as their config says (exhaustive token scoring by default; test_scoring.json).
Prints markdown tables (mean ± std over the seeds; gaps to the global model inside the combined spread
marked "tie"; then every seed's values), writes OUT/results.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import seeds  # noqa: E402  (seeded runs, mean and spread)

KEYS = ["i2t_R@1", "i2t_R@10", "t2i_R@1", "t2i_R@10", "rsum"]
GAPS = ["rsum", "i2t_R@1", "t2i_R@1"]  # each against the trained global model


def summary_table(results: dict[str, dict[int, dict]], walls: dict[str, list[float]], base: str,
                  seed_list: list[int]) -> str:
    glob = seeds.aggregate(results[base]) if base in results else None
    header = ["run", "seeds", "wall (s)", *KEYS] + [f"{k} - global" for k in GAPS]
    lines = [f"({seeds.CONVENTION.format(seeds=','.join(map(str, seed_list)))})", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, per_seed in results.items():
        agg = seeds.aggregate(per_seed)
        wall = seeds.spread(walls[name]).fmt(0) if walls.get(name) else "?"
        gaps = [seeds.gap(agg[k], glob[k]) if glob else "?" for k in GAPS]
        lines.append(f"| {name} | {len(per_seed)} | {wall} | " + " | ".join(agg[k].fmt(2) for k in KEYS)
                     + " | " + " | ".join(gaps) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["fine_grained_tokens.yaml", "fine_grained_scan.yaml"])
    p.add_argument("--baseline", default="fine_grained.yaml")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "token_quality")
    p.add_argument("--no-untrained", action="store_true", help="leave out the untrained (run.train=false) rows")
    seeds.add_arguments(p)
    p.add_argument("overrides", nargs="*", help="key=value for every run (e.g. data.num_workers=2)")
    args = p.parse_args(argv)
    seeds.move_overrides(args.configs, args.overrides)
    from pipeline.config import ConfigError, load_config

    try:
        epochs = {load_config(c, args.overrides).trainer.max_epochs for c in args.configs}
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
    if len(epochs) != 1:
        raise SystemExit(f"the token configs train different numbers of epochs: {sorted(epochs)}")
    epochs = epochs.pop()
    runs = seeds.Runs(args.out, args, args.overrides)
    results: dict[str, dict[int, dict]] = {}
    walls: dict[str, list[float]] = {}
    records = {}
    labels = ([] if args.no_untrained else [("untrained", ["run.train=false"])]) + [("trained", [])]
    for config in [args.baseline, *args.configs]:
        for label, more in labels:
            name = Path(config).stem + ("_untrained" if label == "untrained" else "")
            row = f"{config} {label}"
            for seed in args.seeds:
                record = runs.get(name, config, seed, [f"trainer.max_epochs={epochs}", *more])
                if record is None:
                    continue
                print(seeds.report_line(name, seed, record) + f", rsum {record['metrics']['rsum']:.2f}", flush=True)
                records[seeds.run_name(name, seed)] = record
                results.setdefault(row, {})[seed] = record["metrics"]
                if record["wall_s"] is not None:
                    walls.setdefault(row, []).append(record["wall_s"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"epochs": epochs, **runs.prepared, "seeds": args.seeds,
                                                       "runs": records}, indent=2))
    build = runs.prepared["dataset_build_s"]
    print(f"\nshapes dataset build {'-' if build is None else f'{build:.1f}'} s (0 when it already existed, "
          f"- when nothing was trained), backbone " + (", ".join(
              f"{k} {v:.1f} s" for k, v in runs.prepared["backbone_pretrain_s"].items()) or "-")
          + f" (start-up only when cached); {epochs} epochs each\n")
    if results:
        print(summary_table(results, walls, f"{args.baseline} trained", args.seeds) + "\n\nPer seed:\n\n"
              + seeds.per_seed_table(results, KEYS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
