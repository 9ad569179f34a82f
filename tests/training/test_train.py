"""End to end through the real entry point: tiny runs of both families on real shards."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from pipeline.metrics import metric_names
from tests.helpers.runs import ROOT, run_train

TINY = ["data.batch_size=16", "data.eval_batch_size=32", "data.num_workers=0", "trainer.max_epochs=2",
        "data.steps_per_epoch=4", "model.image_encoder.width=16", "model.text_encoder.width=32",
        "model.head_hidden=32", "hash.num_negatives=64", "trainer.log_every_n_steps=2", "optim.warmup_steps=2",
        "trainer.ckpt_every_n_steps=3", "model.image_encoder.init_steps=2"]


def _wandb_log(run_dir) -> bytes:
    """The offline run's transaction log (protobuf records; offline runs write no summary json)."""
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return next(runs[0].glob("run-*.wandb")).read_bytes()


@pytest.mark.parametrize("config, ks", [("hash_64bit.yaml", (1, 5, 10, 50, 100, 200)),
                                        ("fine_grained.yaml", (1, 5, 10))])
def test_tiny_run_writes_protocol_metrics_config_and_wandb(tmp_path, shapes_tiny, config, ks):
    proc = run_train(["--config", config, f"data.root={shapes_tiny}", f"run.root={tmp_path}", *TINY], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / config.removesuffix(".yaml")
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert list(metrics) == metric_names(ks)  # every protocol name, no stage prefix
    assert all(0 <= metrics[k] <= 1 for k in metrics if "mAP" in k)
    assert "model:" in (run_dir / "config.yaml").read_text()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    log = _wandb_log(run_dir)
    for key in ("train/loss", "train/samples_per_sec", "train/data_wait_s", "val/rsum", "test/i2t_R@1",
                "test/t2i_mAP@N", "head_hidden", "card_sha256"):  # metrics, the resolved config, provenance
        assert key.encode() in log, key
    assert "| i2t |" in proc.stdout  # the FiCo-ITR table is printed
    curves = json.loads((run_dir / "test_curves.json").read_text())  # the test's curves, both directions
    expected = {"p_at_k", "pr11"} | ({"radius_pr"} if config.startswith("hash") else set())
    assert set(curves) == {"i2t", "t2i"} and set(curves["i2t"]) == expected
    pr11 = curves["t2i"]["pr11"]["precision"]
    assert len(pr11) == 11 and all(1 >= a >= b >= 0 for a, b in zip(pr11, pr11[1:]))  # interpolated: never rises
    for name in expected:  # W&B line plots
        assert f"test_curves/i2t_{name}".encode() in log, name


def test_second_run_of_a_finished_config_does_not_overwrite_it(tmp_path, shapes_tiny):
    args = ["--config", "hash_16bit.yaml", f"data.root={shapes_tiny}", f"run.root={tmp_path}", "run.train=false",
            "logger.wandb=false", *TINY]
    for _ in range(2):
        assert run_train(args, cwd=tmp_path).returncode == 0
    assert (tmp_path / "hash_16bit" / "test_metrics.json").is_file()
    assert (tmp_path / "hash_16bit-2" / "test_metrics.json").is_file()


@pytest.mark.parametrize("args, fragment", [
    (["--config", "hash_64bit.yaml", "model.bits=12"], "positive multiple of 8"),
    (["--config", "hash_64bit.yaml", "data.root=/no/such/dir"], "no dataset.json"),
    (["--config", "nope.yaml"], "not found"),
])
def test_bad_start_up_is_one_line_and_exit_2(tmp_path, args, fragment):
    proc = run_train(args, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], proc.stderr


def test_print_config_prints_the_resolved_config_and_writes_nothing(tmp_path):
    proc = run_train(["--config", "hash_64bit.yaml", "--print-config", "model.bits=32"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["model"]["bits"] == 32 and printed["model"]["kind"] == "hash" and printed["data"]["batch_size"] == 128
    assert list(tmp_path.iterdir()) == []  # no data built, no run folder, no W&B folder
    assert "docs/configuration.md" in run_train(["--help"], cwd=tmp_path, timeout=60).stdout


def test_installed_wheel_runs_from_any_directory(tmp_path):
    """`pip install .` (not editable): the wheel carries configs/ as package data and the fico-train script,
    so a shipped config loads with no checkout in sight."""
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheel_dir), str(ROOT)], check=True, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    *map(str, wheel_dir.glob("*.whl"))], check=True, capture_output=True, timeout=300)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}  # the installed copy, before the checkout's editable one
    proc = subprocess.run([str(target / "bin" / "fico-train"), "--config", "hash_64bit.yaml", "--print-config",
                           "model.bits=32"], cwd=empty, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "bits: 32" in proc.stdout.splitlines() or "  bits: 32" in proc.stdout.splitlines()
    where = subprocess.run([sys.executable, "-c", "import pipeline.config as c; print(c.CONFIG_DIR)"], cwd=empty,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where == str(target / "pipeline" / "configs")  # read from the wheel, not from the checkout
    assert list(empty.iterdir()) == []
