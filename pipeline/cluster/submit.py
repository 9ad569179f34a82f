"""Submit one training run to SLURM with the job shape taken from the config.

    python -m pipeline.submit CONFIG [key=value ...] [--nodes N] [--gpus-per-node G]
        [--cpus-per-task C] [--time T] [--partition P] [--account A] [--dry-run]

`--nodes` and `--ntasks-per-node` of the job are trainer.num_nodes and trainer.devices (one task
per device), so the two can only disagree if they are given explicitly and differently: that is
refused here, in one line, before anything is submitted (under SLURM the symptom would be a job
hanging at "Initializing distributed"). `--nodes N` and `--gpus-per-node G` are shorthands for
trainer.num_nodes=N and trainer.devices=G.

slurm/train.sbatch runs `python -m pipeline.submit --check CONFIG [key=value ...]` before srun,
which catches the same mismatch when the template is submitted with plain `sbatch`.

This module imports only the config code (no torch), so that it answers in well under a second.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]  # the repository: the jobs run its train.py and slurm/ templates
TRAIN_TEMPLATE = ROOT / "slurm" / "train.sbatch"
LOG_DIR = ROOT / "logs"


class SubmitError(ValueError):
    """A job that must not be submitted, explained in one line."""


def add_job_options(p: argparse.ArgumentParser) -> None:
    """The SLURM options shared by `pipeline.submit` and `pipeline.sweep`."""
    p.add_argument("--nodes", type=int, help="= trainer.num_nodes (sets it)")
    p.add_argument("--gpus-per-node", type=int,
                   help="= trainer.devices (sets it) and --gres=gpu:G (also implied by trainer.accelerator=gpu)")
    p.add_argument("--ntasks-per-node", type=int, help="must equal trainer.devices (it is derived from it)")
    p.add_argument("--cpus-per-task", type=int, help="default: data.num_workers + 1")
    p.add_argument("--time", help="wall time, e.g. 24:00:00 (default: the template's)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="any other sbatch option, passed as given (repeatable), e.g. --sbatch-arg=--mem=0")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch command instead of running it")


def explicit_override(overrides: list[str], key: str) -> str | None:
    """The last `key=value` given for `key` on the command line, if any."""
    values = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].strip() == key]
    return values[-1] if values else None


def shape_overrides(overrides: list[str], nodes: int | None, gpus_per_node: int | None) -> list[str]:
    """`--nodes` / `--gpus-per-node` as config overrides; a contradicting key=value is an error."""
    extra = []
    for flag, key, value in (("--nodes", "trainer.num_nodes", nodes), ("--gpus-per-node", "trainer.devices", gpus_per_node)):
        if value is None:
            continue
        given = explicit_override(overrides, key)
        if given is not None and given.strip() != str(value):
            raise SubmitError(f"{flag}={value} contradicts {key}={given}: give one of them")
        extra.append(f"{key}={value}")
    return extra


def check_shape(cfg, ntasks_per_node: int | None, nodes: int | None) -> None:
    """The SLURM job shape must be the Trainer's: tasks per node = devices, nodes = num_nodes."""
    t = cfg.trainer
    if isinstance(t.devices, bool) or not isinstance(t.devices, int) or t.devices < 1:
        raise SubmitError(f"trainer.devices={t.devices}: a SLURM job starts one task per device and needs their "
                          f"number; set trainer.devices=N (e.g. --gpus-per-node N)")
    if ntasks_per_node is not None and ntasks_per_node != t.devices:
        raise SubmitError(f"--ntasks-per-node={ntasks_per_node} but trainer.devices={t.devices}: SLURM starts one "
                          f"task per device, so they must be equal (set trainer.devices={ntasks_per_node} "
                          f"or drop --ntasks-per-node)")
    if nodes is not None and nodes != t.num_nodes:
        raise SubmitError(f"--nodes={nodes} but trainer.num_nodes={t.num_nodes}: they must be equal "
                          f"(set trainer.num_nodes={nodes} or drop --nodes)")


def sbatch_options(cfg, args: argparse.Namespace, job_name: str) -> list[str]:
    """sbatch options for a job of this config's shape; they override the template's #SBATCH lines."""
    t = cfg.trainer
    cpus = args.cpus_per_task or cfg.data.num_workers + 1  # the data workers + the training process
    opts = [f"--job-name={job_name}", f"--nodes={t.num_nodes}", f"--ntasks-per-node={t.devices}",
            f"--cpus-per-task={cpus}", f"--chdir={ROOT}"]
    if args.gpus_per_node or t.accelerator in ("gpu", "cuda"):
        opts.append(f"--gres=gpu:{t.devices}")  # one GPU per task
    for name in ("time", "partition", "account"):
        if getattr(args, name):
            opts.append(f"--{name}={getattr(args, name)}")
    return opts + list(args.sbatch_arg)


def load_checked(config: str, overrides: list[str], args: argparse.Namespace):
    """The config with the shape flags applied, checked against the flags; raises SubmitError."""
    overrides = overrides + shape_overrides(overrides, args.nodes, args.gpus_per_node)
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        raise SubmitError(str(e)) from None
    check_shape(cfg, args.ntasks_per_node, args.nodes)
    return cfg, overrides


def needs_checkout() -> None:
    """The cluster tools submit the repository's slurm/ templates, which run its train.py: an installed
    package alone does not have them."""
    if not (TRAIN_TEMPLATE.is_file() and (ROOT / "train.py").is_file()):
        raise SubmitError(f"the cluster tools need a checkout of the repository (its slurm/ templates and "
                          f"train.py; none at {ROOT}): run them from a clone")


def run_sbatch(cmd: list[str], dry_run: bool) -> str | None:
    """Runs sbatch --parsable and returns the job id (None for a dry run)."""
    needs_checkout()
    if dry_run:
        print(shlex.join(cmd))
        return None
    LOG_DIR.mkdir(exist_ok=True)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        raise SubmitError("sbatch not found: run this on a SLURM login node") from None
    except subprocess.CalledProcessError as e:
        raise SubmitError(f"sbatch failed: {' | '.join(e.stderr.strip().splitlines())}") from None
    return out.strip().split(";")[0]


def log_path(sbatch_args: list[str], job_name: str, job: str) -> str:
    """Where the job writes its log: the template's logs/%x-%j.out unless --output was passed on."""
    given = [a.split("=", 1)[1] for a in sbatch_args if a.startswith("--output=")]
    pattern = given[-1] if given else f"{LOG_DIR}/%x-%j.out"
    return pattern.replace("%x", job_name).replace("%j", job)


def check_in_job(config: str, overrides: list[str]) -> None:
    """Inside the batch script, before srun: compare the allocation with the config."""
    env = os.environ
    cfg = load_config(config, overrides)
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_NTASKS_PER_NODE" not in env:
        raise SubmitError(f"the job has --ntasks={env['SLURM_NTASKS']} without --ntasks-per-node: "
                          f"submit with --ntasks-per-node={cfg.trainer.devices} --nodes={cfg.trainer.num_nodes}")
    per_node = env.get("SLURM_NTASKS_PER_NODE")  # "2", or "2(x3)" for several nodes
    nodes = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    check_shape(cfg, int(re.match(r"\d+", per_node).group()) if per_node else None, int(nodes) if nodes else None)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a YAML file, or a name in configs/")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    add_job_options(p)
    p.add_argument("--job-name", help="default: run.name")
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)  # used by slurm/train.sbatch
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.check:
            check_in_job(args.config, args.overrides)
            return 0
        cfg, overrides = load_checked(args.config, args.overrides, args)
        job_name = args.job_name or cfg.run.name
        cmd = ["sbatch", "--parsable", *sbatch_options(cfg, args, job_name),
               str(TRAIN_TEMPLATE), args.config, *overrides]
        job = run_sbatch(cmd, args.dry_run)
    except (SubmitError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if job:
        run_dir = ROOT / cfg.run.root / (cfg.run.id or f"{cfg.run.name}-{job}")  # as the run directory is named (training/run_dir.py)
        print(f"submitted job {job}: log {log_path(args.sbatch_arg, job_name, job)}, run directory {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
