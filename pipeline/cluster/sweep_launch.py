"""Sweeps over configs: W&B sweeps on SLURM, plain grids as SLURM arrays or in sequence, one table.

    python -m pipeline.sweep configs/sweeps/hash_bits.yaml [key=value ...] [--count N] [job options]
        W&B: create the sweep, then submit an array of N agents (one trial each, `wandb agent --count 1`)
    python -m pipeline.sweep configs/sweeps/hash_bits.yaml --grid [key=value ...] [job options]
        no W&B server: expand the grid into one SLURM array task per trial
    python -m pipeline.sweep configs/sweeps/hash_bits.yaml --local [key=value ...]
        the same grid, one trial after the other on this machine
    python -m pipeline.sweep --collect DIR
        every finished trial under DIR -> DIR/results.csv, results.md and results.png

The sweep file is in W&B's format; its `command` passes the parameters as `key=value` config
overrides through `${args_no_hyphens}`, so one file serves all modes. `key=value` given here is
added to every trial (e.g. data.root=...). Job options are those of `pipeline.submit`; the job
shape comes from the trials' config as there.

Grid trials run in <out>/<sweep>-NNN (run.root and run.id are set per trial), so that a requeued or
resubmitted array task resumes its own trial, and `--local` skips trials that already finished.
A requeued W&B agent job resumes the trial it started (same arguments, same W&B run) instead of
asking the sweep for a new one: see slurm/sweep_agent.sbatch and `--trial` below.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from data_prep import atomic_write_bytes
from pipeline.cluster.submit import (ROOT, SubmitError, add_job_options, check_shape, needs_checkout, run_sbatch,
                                     sbatch_options, shape_overrides)
from pipeline.cluster.sweep_collect import FINISHED, TRIALS_FILE, collect
from pipeline.config import ConfigError, load_config

ARRAY_TEMPLATE = ROOT / "slurm" / "sweep_array.sbatch"
AGENT_TEMPLATE = ROOT / "slurm" / "sweep_agent.sbatch"
TRAIN_TEMPLATE = ROOT / "slurm" / "train.sbatch"
TRIAL_STATE_ENV = "FICO_TRIAL_STATE"  # set by sweep_agent.sbatch: where `--trial` records its trial


# ------------------------------------------------------------------ the sweep file and its grid

def load_sweep(path: str | Path) -> dict:
    path = Path(path)
    try:
        sweep = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SubmitError(f"cannot read sweep file {path}: {str(e).splitlines()[0]}") from None
    missing = [k for k in ("parameters", "command") if k not in (sweep or {})]
    if missing:
        raise SubmitError(f"{path}: a sweep needs {' and '.join(missing)} (W&B sweep format)")
    if "${args_no_hyphens}" not in sweep["command"]:
        raise SubmitError(f"{path}: command must pass the parameters with ${{args_no_hyphens}} "
                          f"(train.py takes key=value overrides)")
    return sweep


def flat_parameters(params: dict, prefix: str = "") -> dict[str, dict]:
    """W&B's nested `parameters:` blocks become dotted names, as train.py's overrides use them."""
    flat = {}
    for name, spec in params.items():
        if isinstance(spec, dict) and "parameters" in spec:
            flat.update(flat_parameters(spec["parameters"], f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = spec
    return flat


def grid(params: dict) -> list[dict]:
    """Every combination of the `values` lists (`value` is a constant), in the file's order."""
    names, choices = [], []
    for name, spec in flat_parameters(params).items():
        if "values" in spec:
            choices.append(list(spec["values"]))
        elif "value" in spec:
            choices.append([spec["value"]])
        else:
            raise SubmitError(f"parameter '{name}' has no values list ({', '.join(spec)}): a grid needs "
                              f"`values: [...]` or `value: x`; random/bayes sweeps need W&B (drop --grid)")
        names.append(name)
    return [dict(zip(names, combo)) for combo in itertools.product(*choices)]


def format_value(value) -> str:
    """As W&B's agent writes `key=value` (str()), except None/bools, which YAML reads back as such."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def expand_command(command: list, params: dict) -> list[str]:
    """The sweep's command for one trial with `${args_no_hyphens}` filled in; the launcher
    macros (${env}, ${interpreter}, ${program}) stay and are dropped by split_train_args."""
    out = []
    for part in map(str, command):
        if part == "${args_no_hyphens}":
            out += [f"{k}={format_value(v)}" for k, v in params.items()]
        elif part.startswith("${") and part not in ("${env}", "${interpreter}", "${program}"):
            raise SubmitError(f"sweep command macro {part} is not supported (use ${{args_no_hyphens}})")
        else:
            out.append(part)
    return out


def split_train_args(args: list[str]) -> tuple[str, list[str]]:
    """[launcher ..., --config, X, k=v, ...] -> (X, [k=v, ...]): the form slurm/train.sbatch takes.
    How a trial is launched is decided here (srun under SLURM, this python locally), so whatever
    the command has before --config (srun, ${interpreter}, ${program}, ...) is left out."""
    if "--config" not in args or args.index("--config") + 1 >= len(args):
        raise SubmitError(f"the sweep command has no '--config NAME' (got: {' '.join(args)})")
    i = args.index("--config")
    rest = args[i + 2:]
    odd = [a for a in rest if "=" not in a]
    if odd:
        raise SubmitError(f"after --config the sweep command may only hold key=value overrides, got {odd}")
    return args[i + 1], rest


# ------------------------------------------------------------------ grid trials

def make_trials(sweep: dict, name: str, extra: list[str], out: Path) -> list[dict]:
    trials = []
    for i, params in enumerate(grid(sweep["parameters"])):
        config, overrides = split_train_args(expand_command(sweep["command"], params))
        trial_id = f"{name}-{i:03d}"
        overrides += extra + [f"run.root={out}", f"run.id={trial_id}", f"run.name={trial_id}"]
        trials.append({"index": i, "id": trial_id, "dir": str(out / trial_id), "params": params, "config": config,
                       "overrides": overrides})
    return trials


def write_trials(out: Path, trials: list[dict]) -> None:
    """Creates the sweep folder; a rerun with the same trials reuses it (finished trials stay)."""
    path = out / TRIALS_FILE
    if path.exists() and json.loads(path.read_text()) != trials:
        raise SubmitError(f"{out} holds another sweep's trials: pass --out NEW_DIR (or delete {path})")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(trials, indent=2) + "\n")


def check_trials(trials: list[dict], args) -> object:
    """Every trial loads, and all have one job shape (an array has one); returns trial 0's config."""
    cfgs = []
    for t in trials:
        try:
            cfgs.append(load_config(t["config"], t["overrides"]))
        except ConfigError as e:
            raise SubmitError(f"trial {t['id']} ({t['params']}): {e}") from None
    for c in cfgs:
        check_shape(c, None, None)  # a count of devices, which SLURM needs
    shapes = {(c.trainer.num_nodes, c.trainer.devices) for c in cfgs}
    if len(shapes) > 1:
        raise SubmitError(f"the trials need different job shapes (num_nodes, devices) {sorted(shapes)}: "
                          f"an array job has one; split the sweep")
    check_shape(cfgs[0], args.ntasks_per_node, args.nodes)
    return cfgs[0]


def run_local(trials: list[dict]) -> int:
    needs_checkout()
    failed = 0
    for t in trials:
        if (Path(t["dir"]) / FINISHED).exists():
            print(f"[sweep] {t['id']} finished before: skipped")
            continue
        print(f"[sweep] {t['id']}: {t['params']}", flush=True)
        cmd = [sys.executable, str(ROOT / "train.py"), "--config", t["config"], *t["overrides"]]
        failed += subprocess.run(cmd, cwd=ROOT).returncode != 0
    return failed


def submit_array(out: Path, trials: list[dict], cfg, args, name: str) -> str | None:
    parallel = f"%{args.max_parallel}" if args.max_parallel else ""
    cmd = ["sbatch", "--parsable", f"--array=0-{len(trials) - 1}{parallel}", f"--output={ROOT}/logs/%x-%A_%a.out",
           *sbatch_options(cfg, args, name), str(ARRAY_TEMPLATE), str(out / TRIALS_FILE)]
    return run_sbatch(cmd, args.dry_run)


def trial_args(trials_file: str, index: int) -> list[str]:
    """What slurm/sweep_array.sbatch passes to slurm/train.sbatch for one array task."""
    t = json.loads(Path(trials_file).read_text())[index]
    return [t["config"], *t["overrides"]]


# ------------------------------------------------------------------ W&B agents

def submit_agents(sweep: dict, sweep_path: Path, extra: list[str], args, name: str) -> str | None:
    """Creates the W&B sweep and submits one agent job per trial."""
    import wandb

    if not any(e.startswith("run.root=") for e in extra):  # one folder per sweep, for --collect
        extra = [*extra, f"run.root=runs/sweeps/{name}"]
    # W&B runs its own command: fixed overrides go into the sweep as constant parameters
    sweep = {**sweep, "parameters": {**sweep["parameters"],
                                     **{k: {"value": v} for k, v in (e.split("=", 1) for e in extra)}}}
    count = args.count or (len(grid(sweep["parameters"])) if sweep.get("method") == "grid" else None)
    if not count:
        raise SubmitError(f"{sweep_path}: method '{sweep.get('method')}' has no fixed size: pass --count N")
    config, overrides = split_train_args(expand_command(sweep["command"], {}))
    try:
        cfg = load_config(config, overrides + extra)
    except ConfigError as e:
        raise SubmitError(str(e)) from None
    check_shape(cfg, args.ntasks_per_node, args.nodes)
    if args.dry_run:
        sweep_id = "<sweep id>"
    else:
        sweep_id = wandb.sweep(sweep, project=args.project or cfg.logger.project, entity=cfg.logger.entity)
    path = "/".join(p for p in (cfg.logger.entity, args.project or cfg.logger.project, sweep_id) if p)
    parallel = f"%{args.max_parallel}" if args.max_parallel else ""
    cmd = ["sbatch", "--parsable", f"--array=0-{count - 1}{parallel}", f"--output={ROOT}/logs/%x-%A_%a.out",
           *sbatch_options(cfg, args, name), str(AGENT_TEMPLATE), path]
    return run_sbatch(cmd, args.dry_run)


# What a requeued agent job needs to run its trial again as the same W&B run, and nothing else: the
# API key and every other WANDB_* variable stay out of the file (and out of a tampered file's reach).
TRIAL_ENV = ("WANDB_RUN_ID", "WANDB_SWEEP_ID", "WANDB_PROJECT", "WANDB_ENTITY")
_ID_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def run_trial(argv: list[str], record: bool = True) -> int:
    """The command a W&B agent runs: `pipeline.sweep --trial train.py --config X k=v ...`.

    Records the arguments and the run's ids (TRIAL_ENV) where sweep_agent.sbatch asked, readable by
    this user only, so that a requeued job runs the same trial as the same W&B run; then trains:
    through slurm/train.sbatch (srun, shape check) in a SLURM job, else directly."""
    needs_checkout()
    config, overrides = split_train_args(argv)
    state = os.environ.get(TRIAL_STATE_ENV)
    if record and state:
        ids = {k: os.environ[k] for k in TRIAL_ENV if os.environ.get(k)}
        Path(state).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(state), json.dumps({"args": [config, *overrides], "env": ids}).encode(), 0o600)
    if os.environ.get("SLURM_JOB_ID"):
        cmd = ["bash", str(TRAIN_TEMPLATE), config, *overrides]
    else:
        cmd = [sys.executable, str(ROOT / "train.py"), "--config", config, *overrides]
    return subprocess.run(cmd, cwd=ROOT).returncode


def resume_trial(state: str) -> int:
    """Runs the recorded trial again; only TRIAL_ENV names with id-like values are taken from the file."""
    saved = json.loads(Path(state).read_text())
    env = saved.get("env", {})
    bad = sorted(k for k, v in env.items() if k not in TRIAL_ENV or not _ID_VALUE.fullmatch(str(v)))
    if bad:
        raise SubmitError(f"{state}: refusing to resume a trial whose state sets {', '.join(bad)} "
                          f"(only {', '.join(TRIAL_ENV)} with id-like values are expected)")
    os.environ.update({k: str(v) for k, v in env.items()})
    print(f"[sweep] requeued: resuming trial {' '.join(saved['args'])} (W&B run {env.get('WANDB_RUN_ID')})")
    return run_trial(["--config", *saved["args"]], record=False)


# ------------------------------------------------------------------ collecting results


# ------------------------------------------------------------------ command line

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", nargs="?", help="a sweep file in W&B format (configs/sweeps/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value added to every trial")
    p.add_argument("--grid", action="store_true", help="expand the grid into a SLURM array (no W&B server)")
    p.add_argument("--local", action="store_true", help="run the grid here, one trial after the other")
    p.add_argument("--collect", metavar="DIR", help="tabulate and plot every finished run under DIR")
    p.add_argument("--out", help="grid: the sweep folder (default runs/sweeps/<sweep name>)")
    p.add_argument("--count", type=int, help="W&B: number of agent jobs (default: the grid size)")
    p.add_argument("--project", help="W&B project (default: logger.project of the config)")
    p.add_argument("--max-parallel", type=int, help="array tasks running at once")
    add_job_options(p)
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Entry points used by the SLURM templates; their arguments are train.py's, so no argparse.
    try:
        if argv[:1] == ["--trial"]:
            return run_trial(argv[1:])
        if argv[:1] == ["--resume-trial"]:
            return resume_trial(argv[1])
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if argv[:1] == ["--trial-args"]:
        print("\n".join(trial_args(argv[1], int(argv[2]))))
        return 0
    args = parse_args(argv)
    if args.collect:
        return collect(Path(args.collect))
    if not args.sweep:
        print("error: give a sweep file (or --collect DIR)", file=sys.stderr)
        return 2
    try:
        return launch(args)
    except (SubmitError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def launch(args) -> int:
    sweep_path = Path(args.sweep)
    sweep = load_sweep(sweep_path)
    name = sweep.get("name") or sweep_path.stem
    extra = args.overrides + shape_overrides(args.overrides, args.nodes, args.gpus_per_node)  # for every trial
    if not (args.grid or args.local):
        job = submit_agents(sweep, sweep_path, extra, args, name)
        if job:
            print(f"submitted agent array {job}: logs {ROOT}/logs/{name}-{job}_<task>.out; "
                  f"when done: python -m pipeline.sweep --collect runs/sweeps/{name}")
        return 0
    out = Path(args.out or ROOT / "runs" / "sweeps" / name).resolve()
    trials = make_trials(sweep, name, extra, out)
    cfg = check_trials(trials, args)
    if args.dry_run and args.local:
        print(json.dumps(trials, indent=2))
        return 0
    if not args.dry_run:
        write_trials(out, trials)
    if args.local:
        failed = run_local(trials)
        collect(out)
        return 1 if failed else 0
    job = submit_array(out, trials, cfg, args, name)
    if job:
        print(f"submitted array {job} ({len(trials)} trials): logs {ROOT}/logs/{name}-{job}_<task>.out; "
              f"when done: python -m pipeline.sweep --collect {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
