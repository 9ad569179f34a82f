"""Sweeps: the W&B sweep file expanded into grid trials, a grid run as a real SLURM array, and --collect."""
import csv
import json
import os
import subprocess
import sys

import pytest
import yaml

from pipeline.cluster.submit import SubmitError
from pipeline.cluster.sweep_collect import collect
from pipeline.cluster.sweep_launch import expand_command, grid, load_sweep, make_trials, split_train_args
from tests.helpers.runs import ROOT

TINY = ["data.batch_size=16", "data.num_workers=0", "model.image_encoder.width=32", "model.text_encoder.width=32",
        "model.head_hidden=64", "hash.num_negatives=64", "optim.warmup_steps=2", "trainer.max_epochs=1",
        "data.steps_per_epoch=4", "model.image_encoder.init_steps=2"]


def three_bit_lengths(tmp_path):
    """configs/sweeps/hash_bits.yaml (its command and metric as shipped), cut to 3 bit lengths."""
    sweep = yaml.safe_load((ROOT / "configs" / "sweeps" / "hash_bits.yaml").read_text())
    sweep["parameters"]["model.bits"]["values"] = [16, 32, 64]
    path = tmp_path / "hash_bits.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_sweep_file_expands_to_train_overrides(tmp_path):
    sweep = load_sweep(ROOT / "configs" / "sweeps" / "fine_grained_loss.yaml")
    points = grid(sweep["parameters"])
    assert len(points) == 4 and points[0] == {"align.loss": "infonce", "optim.lr": 3e-4}
    config, overrides = split_train_args(expand_command(sweep["command"], points[3]))
    assert config == "fine_grained.yaml" and overrides == ["align.loss=vse_max_violation", "optim.lr=0.001"]
    trials = make_trials(sweep, "fg", ["data.root=/d"], tmp_path)
    assert [t["id"] for t in trials] == ["fg-000", "fg-001", "fg-002", "fg-003"]
    assert trials[2]["dir"] == str(tmp_path / "fg-002")
    assert trials[1]["overrides"][-4:] == ["data.root=/d", f"run.root={tmp_path}", "run.id=fg-001", "run.name=fg-001"]
    with pytest.raises(SubmitError, match="no values list"):  # random search: W&B only
        grid(load_sweep(ROOT / "configs" / "sweeps" / "hash_lr_objective.yaml")["parameters"])


def test_collect_tabulates_and_plots_finished_runs(tmp_path):
    for i, bits in enumerate([16, 32, 64]):
        run = tmp_path / f"s-{i:03d}"
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"model": {"bits": bits}, "run": {"id": run.name}}))
        (run / "test_metrics.json").write_text(json.dumps(
            {"i2t_R@1": bits / 10, "t2i_R@1": 1.0, "i2t_mAP@N": bits / 100, "t2i_mAP@N": 0.5}))
    (tmp_path / "unfinished").mkdir()  # no test_metrics.json: not a row
    assert collect(tmp_path) == 0
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [(r["model.bits"], r["i2t_mAP@N"]) for r in rows] == [("16", "0.16"), ("32", "0.32"), ("64", "0.64")]
    assert "| s-002 | 64 | 6.40 | 1.00 | 0.6400 | 0.5000 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").stat().st_size > 10_000


@pytest.mark.slurm
def test_grid_sweep_runs_as_an_array_and_collects_three_rows(slurm_cluster, shapes_tiny, tmp_path):
    out = tmp_path / "sweep"
    submitted = slurm_cluster.run(sys.executable, "-m", "pipeline.sweep", str(three_bit_lengths(tmp_path)), "--grid",
                                  f"data.root={shapes_tiny}", *TINY, "--cpus-per-task=1", f"--out={out}",
                                  f"--sbatch-arg=--output={tmp_path}/%A_%a.out").stdout
    job = submitted.split("submitted array ")[1].split()[0]
    tasks = slurm_cluster.wait(job, 300)
    logs = "\n".join(p.read_text()[-2000:] for p in tmp_path.glob("*_*.out"))
    assert [t["JobState"] for t in tasks] == ["COMPLETED"] * 3, logs
    collected = slurm_cluster.run(sys.executable, "-m", "pipeline.sweep", "--collect", str(out)).stdout
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted(int(r["model.bits"]) for r in rows) == [16, 32, 64]
    assert [r["run"] for r in rows] == ["hash_bits-000", "hash_bits-001", "hash_bits-002"]
    assert all(0 <= float(r["i2t_mAP@N"]) <= 1 for r in rows)
    assert collected.count("| hash_bits-00") == 3 and (out / "results.png").is_file()


SECRET = "dummy-wandb-key-0123456789abcdef0123456789abcdef"


def _files_holding(root, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_agent_trial_writes_no_secret_and_a_requeue_reruns_it_as_the_same_run(tmp_path, shapes_tiny):
    """What slurm/sweep_agent.sbatch relies on, for real: `--trial` records the trial's arguments and W&B
    ids (mode 0600, nothing else of the environment) and trains; no file the trial or train.py wrote holds
    the API key; a tampered state is refused; `--resume-trial` runs the recorded trial as the same W&B run."""
    state = tmp_path / "state" / "trial.json"
    env = {**os.environ, "WANDB_API_KEY": SECRET, "WANDB_MODE": "offline", "WANDB_RUN_ID": "trial-run-1",
           "WANDB_SWEEP_ID": "sw1", "WANDB_BASE_URL": "http://127.0.0.1:9", "FICO_TRIAL_STATE": str(state)}
    env.pop("SLURM_JOB_ID", None)
    args = ["train.py", "--config", "hash_64bit.yaml", f"data.root={shapes_tiny}", f"run.root={tmp_path}/runs",
            f"data.shapes_dir={tmp_path}/data/shapes", *TINY, "trainer.max_epochs=1", "data.steps_per_epoch=2"]
    proc = subprocess.run([sys.executable, "-m", "pipeline.sweep", "--trial", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert oct(state.stat().st_mode & 0o777) == "0o600"
    saved = json.loads(state.read_text())
    assert saved["env"] == {"WANDB_RUN_ID": "trial-run-1", "WANDB_SWEEP_ID": "sw1"}
    assert saved["args"] == args[2:]
    run_dir = tmp_path / "runs" / "hash_64bit"
    assert (run_dir / "test_metrics.json").is_file() and (run_dir / "wandb_run_id").read_text().strip() == "trial-run-1"
    assert (run_dir / "wandb").is_dir()
    assert _files_holding(tmp_path, SECRET.encode()) == []

    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps({**saved, "env": {**saved["env"], "WANDB_BASE_URL": "http://evil"}}))
    proc = subprocess.run([sys.executable, "-m", "pipeline.sweep", "--resume-trial", str(tampered)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "WANDB_BASE_URL" in proc.stderr, proc.stderr

    env = {k: v for k, v in env.items() if k not in ("WANDB_RUN_ID", "WANDB_SWEEP_ID")}  # a fresh job: no agent ids
    proc = subprocess.run([sys.executable, "-m", "pipeline.sweep", "--resume-trial", str(state)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rerun = tmp_path / "runs" / "hash_64bit-2"  # (locally the trial had finished; under SLURM it resumes its folder)
    assert (rerun / "wandb_run_id").read_text().strip() == "trial-run-1"
    assert _files_holding(tmp_path, SECRET.encode()) == []
