"""The hashing family side by side on the shapes data, every run the real `python train.py --config X
run.seed=S` with the config's own epochs, over seeds: instance-level 64-bit codes against UCCH-64 and the
fine-grained model (R@1 / R@10), the supervised 64-bit codes against UCCH-64 (mAP@N), and each prefix of
the nested 128-bit model against the dedicated model of that length (mAP@N, R@10).

    python benchmarks/bench_hash_family.py [--out benchmarks/out/hash_family] [--seeds 0,1,2] [--only NAME ...]
        [--runs-from DIR ...] [--no-train] [--fresh] [key=value ...]

Runs live in OUT/runs/<name>_seed<S>; a finished one there or in a --runs-from folder, trained with the
same settings, is reused (so an interrupted benchmark continues), --fresh trains this benchmark's own
again. --only trains only the named runs (the tables show whatever else exists). The distilled instance
run learns from the fine-grained run of the same seed. Prints markdown tables (mean ± std over the seeds;
a gap inside the combined spread marked "tie"; then every seed's values) and writes OUT/results.json
(metrics, wall time and the load average after each run).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import seeds  # noqa: E402  (seeded runs, mean and spread)

# name -> (config, extra overrides); order matters: the distilled run needs the fine-grained one
RUNS = {
    "fine_grained": ("fine_grained.yaml", []),
    "hash_64bit": ("hash_64bit.yaml", []),
    "hash_instance_64bit": ("hash_instance_64bit.yaml", []),
    "hash_instance_64bit_distilled": ("hash_instance_64bit.yaml", []),  # + the teacher, fine_grained
    "hash_supervised_64bit": ("hash_supervised_64bit.yaml", []),
    "hash_nested": ("hash_nested.yaml", []),
    "hash_16bit": ("hash_16bit.yaml", []),
    "hash_32bit": ("hash_32bit.yaml", []),
    "hash_128bit": ("hash_128bit.yaml", []),
}


def table(header: list[str], rows: list[list]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                      + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def cells(metrics: dict, keys: list[str]) -> list[str]:
    return [metrics[k].fmt(seeds.digits(k)) for k in keys]


def percent_of(runs: dict, name: str, key: str) -> str:
    """`name`'s `key` as % of the fine-grained model's at the same seed (mean ± std of the per-seed ratios),
    "(tie)" when the two models' figures are inside their combined spread."""
    if name == "fine_grained":
        return "100"
    per_seed = {s: m[key] for s, m in runs[name].items()}
    fg = {s: m[key] for s, m in runs["fine_grained"].items()}
    pct = seeds.spread(100 * v for v in seeds.ratio(per_seed, fg).values)
    tie = seeds.is_tie(seeds.spread(per_seed.values()), seeds.spread(fg.values()))
    return pct.fmt(0) + (" (tie)" if tie else "")


def instance_table(runs: dict, agg: dict) -> str:
    rows = []
    for name in ("fine_grained", "hash_instance_64bit", "hash_instance_64bit_distilled", "hash_64bit"):
        if name in agg:
            r = agg[name]
            rows.append([name, len(runs[name]), *cells(r, ["i2t_R@1", "i2t_R@10", "t2i_R@1", "t2i_R@10"]),
                         f"{percent_of(runs, name, 'i2t_R@1')} / {percent_of(runs, name, 't2i_R@1')}",
                         *cells(r, ["i2t_mAP@N", "t2i_mAP@N"])])
    return table(["run", "seeds", "i2t R@1", "i2t R@10", "t2i R@1", "t2i R@10",
                  "R@1 % of fine-grained (i2t / t2i)", "i2t mAP@N", "t2i mAP@N"], rows)


def category_table(runs: dict, agg: dict) -> str:
    rows = [[name, len(runs[name]), *cells(agg[name], ["i2t_mAP@N", "t2i_mAP@N", "i2t_mAP@100", "t2i_mAP@100",
                                                       "i2t_R@10", "t2i_R@10"])]
            for name in ("hash_supervised_64bit", "hash_64bit", "hash_instance_64bit", "fine_grained") if name in agg]
    return table(["run", "seeds", "i2t mAP@N", "t2i mAP@N", "i2t mAP@100", "t2i mAP@100", "i2t R@10", "t2i R@10"],
                 rows)


def nested_table(agg: dict) -> str:
    nested = agg["hash_nested"]
    rows = []
    for bits in (16, 32, 64, 128):
        own = {k.split("/", 1)[1]: v for k, v in nested.items() if k.startswith(f"{bits}bit/")} if bits < 128 \
            else nested
        dedicated = agg.get(f"hash_{bits}bit")
        keys = ["i2t_mAP@N", "t2i_mAP@N", "i2t_R@10", "t2i_R@10"]
        row = [bits, *cells(own, keys)]
        if dedicated:
            row += [*cells(dedicated, keys),
                    f"{seeds.gap(own['i2t_mAP@N'], dedicated['i2t_mAP@N'], 3)} / "
                    f"{seeds.gap(own['t2i_mAP@N'], dedicated['t2i_mAP@N'], 3)}"]
        rows.append(row)
    return table(["bits", "nested i2t mAP@N", "nested t2i mAP@N", "nested i2t R@10", "nested t2i R@10",
                  "dedicated i2t mAP@N", "dedicated t2i mAP@N", "dedicated i2t R@10", "dedicated t2i R@10",
                  "nested - dedicated mAP@N (i2t / t2i)"], rows)


def collect(args) -> tuple[dict, dict]:
    """{name: {seed: metrics}} and {name_seed<S>: record} of every run trained now or found."""
    runs = seeds.Runs(args.out / "runs", args, args.overrides)
    per_seed: dict[str, dict[int, dict]] = {}
    records = {}
    for seed in args.seeds:
        for name, (config, extra) in RUNS.items():
            wanted = args.only is None or name in args.only
            allowed, may_train = (), wanted
            if name == "hash_instance_64bit_distilled":  # the teacher: the fine-grained run of this seed
                teacher = records.get(seeds.run_name("fine_grained", seed))
                extra = [f"hash.instance.teacher={teacher['run_dir'] if teacher else 'none-found'}"]
                allowed = ("hash.instance.teacher",)  # where the teacher lives does not change the recipe
                may_train = wanted and teacher is not None
            record = runs.get(name, config, seed, extra, allowed, train=may_train)
            if record is None and wanted and not may_train and not args.no_train:
                raise SystemExit(f"error: {seeds.run_name(name, seed)} distils from "
                                 f"{seeds.run_name('fine_grained', seed)}, which is neither found nor in --only")
            if record is None:
                continue
            print(seeds.report_line(name, seed, record), flush=True)
            records[seeds.run_name(name, seed)] = record
            per_seed.setdefault(name, {})[seed] = record["metrics"]
    (args.out / "results.json").write_text(json.dumps({**runs.prepared, "seeds": args.seeds, "runs": records},
                                                      indent=1))
    return per_seed, records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "hash_family")
    p.add_argument("--only", nargs="*", metavar="NAME",
                   help=f"train only these runs (the tables show what exists): {', '.join(RUNS)}")
    seeds.add_arguments(p)
    p.add_argument("overrides", nargs="*", help="key=value for every run (e.g. trainer.max_steps=2)")
    args = p.parse_args(argv)
    if args.only is not None:
        seeds.move_overrides(args.only, args.overrides)
        unknown = sorted(set(args.only) - set(RUNS))
        if unknown:
            p.error(f"--only: unknown run {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    per_seed, _ = collect(args)
    agg = {name: seeds.aggregate(m) for name, m in per_seed.items()}
    print(f"\n({seeds.CONVENTION.format(seeds=','.join(map(str, args.seeds)))})")
    if {"fine_grained", "hash_instance_64bit"} <= set(agg):
        print("\nInstance level (test split, R@K in %):\n\n" + instance_table(per_seed, agg))
    if {"hash_supervised_64bit", "hash_64bit"} <= set(agg):
        print("\nCategory level (mAP as fractions, R@10 in %):\n\n" + category_table(per_seed, agg))
    if "hash_nested" in agg:
        print("\nNested 128-bit codes, each prefix against the dedicated UCCH model of its length:\n\n"
              + nested_table(agg))
    if per_seed:
        print("\nPer seed:\n\n" + seeds.per_seed_table(per_seed, ["i2t_R@1", "t2i_R@1", "i2t_R@10", "t2i_R@10",
                                                                    "i2t_mAP@N", "t2i_mAP@N"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
