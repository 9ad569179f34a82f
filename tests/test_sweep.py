"""Sweeps: the W&B sweep file expanded into grid trials, a grid run as a real SLURM array, and --collect."""
import csv
import json
import subprocess
import sys

import pytest
import yaml

from pipeline.submit import SubmitError
from pipeline.sweep import collect, expand_command, grid, load_sweep, make_trials, split_train_args
from tests.conftest import ROOT

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


def test_requeued_agent_job_reruns_its_own_trial(tmp_path, monkeypatch):
    """What slurm/sweep_agent.sbatch relies on: the trial a W&B agent started is recorded with its run id,
    and `--resume-trial` runs exactly that trial again as that run (no new trial from the sweep)."""
    from pipeline import sweep as sweep_mod

    launched = []

    def fake_run(cmd, **kw):  # records what would be launched, with the W&B variables it would see
        launched.append((cmd, {k: v for k, v in sweep_mod.os.environ.items() if k.startswith("WANDB_")}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(sweep_mod.subprocess, "run", fake_run)
    state = tmp_path / "trial.json"
    monkeypatch.setenv(sweep_mod.TRIAL_STATE_ENV, str(state))
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("WANDB_RUN_ID", "run-abc")
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    argv = ["train.py", "--config", "hash_64bit.yaml", "model.bits=32"]
    assert sweep_mod.main(["--trial", *argv]) == 0
    monkeypatch.setenv("WANDB_RUN_ID", "a-new-run-the-agent-would-start")
    assert sweep_mod.main(["--resume-trial", str(state)]) == 0
    (first, env1), (again, env2) = launched
    assert first == again == ["bash", str(sweep_mod.TRAIN_TEMPLATE), "hash_64bit.yaml", "model.bits=32"]
    assert env1["WANDB_RUN_ID"] == env2["WANDB_RUN_ID"] == "run-abc" and env2["WANDB_SWEEP_ID"] == "sw1"
