"""Seeds for the benchmarks that train: each config at each seed is the real `python train.py --config X
run.seed=S` (or a finished run folder found where the user points), and each figure is the mean and spread
over the seeds.

The convention of every table: **mean ± sample standard deviation** over the seeds (n - 1 in the
denominator; 0 for one seed), the per-seed values beside them in a table of their own and in results.json.
Two figures **tie** when their gap is smaller than their combined spread, the sum of the two standard
deviations (their mean ± std intervals overlap), or when they are equal. With one seed there is no spread,
and only equal figures tie.

Run folders are `<root>/<name>_seed<S>` (train.py's `-2`, `-3`, ... when that name already holds a finished
run). A run found in `--runs-from` folders or in the benchmark's own is reused only when its config.yaml says
it trained what the benchmark would train (the same config, overrides and seed); otherwise one line names the
keys that differ.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONVENTION = "mean ± std over seeds {seeds} (sample std; a gap smaller than the two stds together: tie)"


# ---- mean, spread, tie ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Spread:
    """One metric over seeds: its per-seed values, their mean and sample standard deviation."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def std(self) -> float:
        n = len(self.values)
        if n < 2:
            return 0.0
        return math.sqrt(sum((v - self.mean) ** 2 for v in self.values) / (n - 1))

    def fmt(self, digits: int | None = None) -> str:
        if digits is None:
            digits = 3 if abs(self.mean) < 1.5 else 1  # mAP as a fraction, R@K in %
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"

    def __str__(self) -> str:
        return self.fmt()


def digits(key: str) -> int:
    """Decimals a metric is shown with: mAP as a fraction (3), R@K in % and rsum (1)."""
    return 3 if "mAP" in key else 1


def spread(values) -> Spread:
    values = tuple(float(v) for v in values)
    if not values:
        raise ValueError("a spread needs at least one value")
    return Spread(values)


def is_tie(a: Spread, b: Spread) -> bool:
    """The gap between the two means is smaller than the two standard deviations together (or none at all)."""
    d = abs(a.mean - b.mean)
    return d < a.std + b.std or d == 0


def gap(a: Spread, b: Spread, digits: int = 1) -> str:
    """`a - b` as "+21.8", or "+1.2 (tie)" when the gap is inside the combined spread."""
    return f"{a.mean - b.mean:+.{digits}f}" + (" (tie)" if is_tie(a, b) else "")


def ratio(a: dict[int, float], b: dict[int, float]) -> Spread:
    """a / b per seed, over the seeds both have (the same seed's runs compared with each other)."""
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("no seed in common")
    return spread(a[s] / b[s] for s in common)


def aggregate(per_seed: dict[int, dict]) -> dict[str, Spread]:
    """{metric: Spread} over the seeds' metric dicts, for the numeric metrics every seed has."""
    keys = set.intersection(*(set(m) for m in per_seed.values())) if per_seed else set()
    return {k: spread(m[k] for m in per_seed.values()) for k in sorted(keys)
            if all(isinstance(m[k], (int, float)) for m in per_seed.values())}


def per_seed_table(results: dict[str, dict[int, dict]], keys: list[str]) -> str:
    """A markdown table: one row per run and seed, the raw values the mean ± std came from."""
    lines = ["| run | seed | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for name, seeds in results.items():
        for seed, metrics in sorted(seeds.items()):
            cells = ["—" if k not in metrics else f"{metrics[k]:.{digits(k)}f}" for k in keys]
            lines.append(f"| {name} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- the command line every seeded benchmark shares -----------------------------------------------

def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes integers separated by commas (0,1,2), not {text!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds takes distinct integers separated by commas, not {text!r}")
    return seeds


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=parse_seeds, default=[0, 1, 2], help="run.seed of each run (default 0,1,2)")
    p.add_argument("--runs-from", type=Path, action="append", default=None, metavar="DIR",
                   help="a folder holding finished runs <name>_seed<S>/ to reuse instead of training them "
                        "(repeatable; searched in order, before the benchmark's own)")
    p.add_argument("--no-train", action="store_true", help="train nothing: tables from the runs found only")
    p.add_argument("--fresh", action="store_true", help="train again the runs this benchmark trained before")


def move_overrides(names: list[str], overrides: list[str]) -> None:
    """key=value arguments that a greedy `--configs a b` took in go back to the overrides (no config name
    holds '=')."""
    overrides += [n for n in names if "=" in n]
    names[:] = [n for n in names if "=" not in n]


# ---- run folders: found or trained ----------------------------------------------------------------

def run_name(name: str, seed: int) -> str:
    return f"{name}_seed{seed}"


def find_run(folder: Path, name: str) -> Path | None:
    """The finished run `name` in `folder`: `name` itself, else the newest finished `name-N`."""
    exact = folder / name
    if (exact / "test_metrics.json").is_file():
        return exact
    numbered = [p for p in folder.glob(f"{name}-*") if p.name[len(name) + 1:].isdigit()
                and (p / "test_metrics.json").is_file()]
    return max(numbered, key=lambda p: (p / "test_metrics.json").stat().st_mtime) if numbered else None


def expected_config(config: str, overrides: list[str]) -> dict:
    """The resolved config train.py would save for these arguments."""
    sys.path.insert(0, str(ROOT))
    from pipeline.config import ConfigError, load_config, to_dict
    from pipeline.training.build import complete_config

    try:
        return to_dict(complete_config(load_config(config, overrides)))
    except ConfigError as e:
        raise SystemExit(f"error: {config} {' '.join(overrides)}: {e}")


def check_same_recipe(run_dir: Path, expected: dict, allowed=()) -> None:
    """One line and exit when the run in `run_dir` was trained with settings other than `expected`."""
    import yaml

    from pipeline.training.run_dir import config_changes

    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    changes = config_changes(saved, expected, allowed)
    if changes:
        listed = "; ".join(f"{k}: {a!r} (run) vs {b!r} (benchmark)" for k, (a, b) in changes.items())
        raise SystemExit(f"error: {run_dir} was trained with other settings ({listed}): pass the same overrides, "
                         f"point --runs-from elsewhere, or --fresh to train the benchmark's own again")


def record_of(run_dir: Path) -> dict:
    """What a finished run folder says: test metrics and, from bench.json or the start stamp, its wall time."""
    bench = run_dir / "bench.json"
    if bench.is_file():
        return {**json.loads(bench.read_text()), "run_dir": str(run_dir), "reused": True}
    metrics_file = run_dir / "test_metrics.json"
    wall = None
    provenance = run_dir / "provenance.json"
    if provenance.is_file():  # first start to the test metrics; includes any pause of a resumed run
        started = json.loads(provenance.read_text()).get("started")
        if started:
            wall = metrics_file.stat().st_mtime - time.mktime(time.strptime(started, "%Y-%m-%d %H:%M:%S"))
    return {"wall_s": wall, "load_after": None, "command": None, "metrics": json.loads(metrics_file.read_text()),
            "run_dir": str(run_dir), "reused": True}


class Runs:
    """The runs of one benchmark: each (name, seed) found finished or trained into `root`."""

    def __init__(self, root: Path, args, overrides: list[str]):
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.search = [Path(d).resolve() for d in args.runs_from or []]
        missing = [str(d) for d in self.search if not d.is_dir()]
        if missing:
            raise SystemExit(f"error: --runs-from {', '.join(missing)}: no such folder")
        self.train_missing = not args.no_train
        self.fresh = args.fresh
        self.overrides = list(overrides)
        self.prepared: dict = {"dataset_build_s": None, "backbone_pretrain_s": {}}
        self._fresh_done: set[str] = set()
        self._backbones: set[str] = set()

    def get(self, name: str, config: str, seed: int, extra=(), allowed=(), train: bool = True) -> dict | None:
        """The record of run `name` at `seed` ({"metrics", "wall_s", "run_dir", ...}), or None when it is
        not found and may not be trained (--no-train, or `train` false)."""
        full = run_name(name, seed)
        args = [*self.overrides, *extra, f"run.seed={seed}"]
        expected = expected_config(config, args)
        for folder in self.search:
            found = find_run(folder, full)
            if found:
                check_same_recipe(found, expected, allowed)
                return record_of(found)
        if self.fresh and full not in self._fresh_done:  # the folder and train.py's numbered siblings
            for old in [self.root / full, *self.root.glob(f"{full}-*")]:
                shutil.rmtree(old, ignore_errors=True)
            self._fresh_done.add(full)
        found = find_run(self.root, full)
        if found:
            check_same_recipe(found, expected, allowed)
            return record_of(found)
        if not train:  # the caller only wants it if it exists
            return None
        if not self.train_missing:
            print(f"{full}: not found, not trained (--no-train)", flush=True)
            return None
        self.prepare(config, seed, args, expected)
        return self.train(full, config, args)

    def prepare(self, config: str, seed: int, args: list[str], cfg: dict) -> None:
        """The shapes dataset and the seed's shapes backbone, made before the run and timed apart (both are
        made once per machine: each seed pretrains its own backbone), so that run timings compare. `cfg`: the
        run's resolved config."""
        if cfg["data"]["root"] is None and self.prepared["dataset_build_s"] is None:
            from data_prep import build_shapes

            start = time.perf_counter()
            build_shapes(ROOT / Path(cfg["data"]["shapes_dir"]).expanduser(), image_size=cfg["data"]["image_size"])
            self.prepared["dataset_build_s"] = time.perf_counter() - start
        enc = cfg["model"]["image_encoder"]
        if enc["init"] == "shapes":
            # configs with the same backbone recipe share one cached file: made (or found) once
            recipe = json.dumps([enc["width"], enc["init_steps"], cfg["data"]["image_size"], cfg["data"]["mean"],
                                 cfg["data"]["std"], cfg["data"]["shapes_dir"], seed])
            key = f"{config} seed {seed}"
            if recipe not in self._backbones:
                self._backbones.add(recipe)
                cmd = [sys.executable, "-m", "pipeline.backbone", "--config", config, *args]
                start = time.perf_counter()
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
                self.prepared["backbone_pretrain_s"][key] = time.perf_counter() - start

    def train(self, full: str, config: str, args: list[str]) -> dict:
        cmd = [sys.executable, "train.py", "--config", config, f"run.root={self.root}", f"run.name={full}", *args]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "WANDB_MODE": "offline"})
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        run_dir = find_run(self.root, full)
        record = {"wall_s": wall, "load_after": os.getloadavg(), "command": " ".join(cmd[1:]),
                  "metrics": json.loads((run_dir / "test_metrics.json").read_text())}
        (run_dir / "bench.json").write_text(json.dumps(record, indent=1))
        return {**record, "run_dir": str(run_dir), "reused": False}


def report_line(name: str, seed: int, record: dict) -> str:
    wall = "?" if record.get("wall_s") is None else f"{record['wall_s']:.0f} s"
    load = f", load after {record['load_after'][0]:.1f}" if record.get("load_after") else ""
    return f"{run_name(name, seed)}: {wall}{load}" + (f" (reused {record['run_dir']})" if record.get("reused") else "")
