"""The run directory keeps its promises: a resume never continues a different experiment, one W&B run
per directory's life, and the checkpoint monitor is decided from the dataset card before training."""
import json
import shutil

import pytest
import yaml

from pipeline.config import ConfigError, load_config, to_yaml
from pipeline.data import DatasetCard
from pipeline.metrics import metric_names
from pipeline.training.provenance import card_hash
from pipeline.training.run_dir import check_resume, choose_monitor, wandb_run_id
from tests.helpers.runs import run_train

HASH_NAMES = metric_names((1, 5, 10, 50, 100, 200))


def _unfinished_run(tmp_path, overrides=()):
    """A run folder as an interrupted train.py leaves it: the resolved config and a last.ckpt."""
    run_dir = tmp_path / "runs" / "hash_64bit"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(load_config("hash_64bit.yaml", [f"run.root={tmp_path}/runs",
                                                                                  *overrides])))
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    return run_dir


def test_resume_with_other_settings_is_refused_naming_the_keys_and_the_ways_out(tmp_path):
    run_dir = _unfinished_run(tmp_path)
    same = load_config("hash_64bit.yaml", [f"run.root={tmp_path}/runs", "data.num_workers=7", "logger.wandb=false",
                                           "trainer.ckpt_every_n_steps=5", "data.root=/moved/data"])
    assert check_resume(run_dir, same) == {}  # what does not change the result may change
    other = load_config("hash_64bit.yaml", [f"run.root={tmp_path}/runs", "optim.lr=3e-4", "trainer.max_epochs=20"])
    with pytest.raises(ConfigError) as err:
        check_resume(run_dir, other)
    msg = str(err.value)
    assert "\n" not in msg and "optim.lr: 0.001 -> 0.0003" in msg and "trainer.max_epochs: 8 -> 20" in msg
    assert "run.name=" in msg and "run.allow_changes=[optim.lr,trainer.max_epochs]" in msg
    allowed = load_config("hash_64bit.yaml", [f"run.root={tmp_path}/runs", "trainer.max_epochs=20",
                                              "run.allow_changes=[trainer.max_epochs]"])
    assert check_resume(run_dir, allowed) == {"trainer.max_epochs": (8, 20)}


def test_train_py_refuses_to_resume_a_run_with_another_learning_rate(tmp_path, shapes_tiny):
    run_dir = _unfinished_run(tmp_path, [f"data.root={shapes_tiny}"])
    proc = run_train(["--config", "hash_64bit.yaml", f"data.root={shapes_tiny}", f"run.root={tmp_path}/runs",
                      "optim.lr=3e-4"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim.lr: 0.001 -> 0.0003" in lines[0] and str(run_dir) in lines[0], proc.stderr
    assert "lr: 0.001" in (run_dir / "config.yaml").read_text()  # the record of what it was trained with stays


def _trained_on(run_dir, card_root):
    """provenance.json as the run's first start wrote it: trained on the card at `card_root`."""
    (run_dir / "provenance.json").write_text(json.dumps({"dataset": {"name": "x", "card_sha256": card_hash(card_root)}}))


def _other_dataset(shapes_tiny, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(shapes_tiny, other)
    raw = json.loads((other / "dataset.json").read_text())
    raw["name"] = "another dataset"
    (other / "dataset.json").write_text(json.dumps(raw))
    return other


def test_resume_onto_another_dataset_is_refused_unless_allowed(tmp_path, shapes_tiny):
    run_dir = _unfinished_run(tmp_path, [f"data.root={shapes_tiny}"])
    _trained_on(run_dir, shapes_tiny)
    moved = tmp_path / "moved"
    shutil.copytree(shapes_tiny, moved)  # the same dataset in another folder: data.root may change
    cfg = load_config("hash_64bit.yaml", [f"run.root={tmp_path}/runs", f"data.root={moved}"])
    assert check_resume(run_dir, cfg, DatasetCard.read(moved)) == {}
    other = _other_dataset(shapes_tiny, tmp_path)
    cfg = load_config("hash_64bit.yaml", [f"run.root={tmp_path}/runs", f"data.root={other}"])
    with pytest.raises(ConfigError) as err:
        check_resume(run_dir, cfg, DatasetCard.read(other))
    msg = str(err.value)
    assert "\n" not in msg and "another dataset" in msg and "run.allow_changes=[data.root]" in msg, msg
    allowed = load_config("hash_64bit.yaml", [f"run.root={tmp_path}/runs", f"data.root={other}",
                                              "run.allow_changes=[data.root]"])
    changes = check_resume(run_dir, allowed, DatasetCard.read(other))
    assert changes == {"dataset.card_sha256": (card_hash(shapes_tiny), card_hash(other))}


def test_train_py_refuses_to_resume_onto_another_dataset(tmp_path, shapes_tiny):
    other = _other_dataset(shapes_tiny, tmp_path)  # as train.py saves the config: with the card's statistics
    run_dir = _unfinished_run(tmp_path, [f"data.root={shapes_tiny}", "data.mean=[0.5,0.5,0.5]",
                                         "data.std=[0.25,0.25,0.25]"])
    _trained_on(run_dir, shapes_tiny)
    proc = run_train(["--config", "hash_64bit.yaml", f"data.root={other}", f"run.root={tmp_path}/runs"],
                     cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "another dataset" in lines[0] and str(run_dir) in lines[0], proc.stderr


def test_one_wandb_run_per_run_directory_life(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    run_dir = tmp_path / "hash_64bit"
    first = wandb_run_id(run_dir)
    assert wandb_run_id(run_dir) == first  # resumed / requeued: the same run
    shutil.rmtree(run_dir)
    assert wandb_run_id(run_dir) != first  # a new directory at the same path: a new run
    monkeypatch.setenv("WANDB_RUN_ID", "left-over")  # e.g. exported in the shell by an earlier W&B run
    fresh = [wandb_run_id(tmp_path / "a"), wandb_run_id(tmp_path / "b")]
    assert "left-over" not in fresh and fresh[0] != fresh[1]  # each fresh folder is a run of its own
    monkeypatch.setenv("WANDB_RUN_ID", "agent-chose-this")
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep-1")
    assert wandb_run_id(tmp_path / "trial") == "agent-chose-this"  # a sweep agent's id for its trial


def _card(shapes_tiny, tmp_path, without_labels: dict):
    shutil.copytree(shapes_tiny, tmp_path / "ds")
    raw = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    for split, n in without_labels.items():
        raw["splits"][split]["num_without_labels"] = n
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps(raw))
    return DatasetCard.read(tmp_path / "ds")


def test_monitor_is_decided_from_the_card_before_training(shapes_tiny, tmp_path):
    cfg = load_config("hash_64bit.yaml")
    assert choose_monitor(cfg, DatasetCard.read(shapes_tiny), HASH_NAMES) == ("val/i2t_mAP@N", None)
    test_only = _card(shapes_tiny, tmp_path, {"train": 256, "val": 64})  # labels on the test split only
    monitor, note = choose_monitor(cfg, test_only, HASH_NAMES)
    assert monitor == "val/rsum" and "no labels" in note
    with pytest.raises(ConfigError, match="has no labels; monitor val/rsum"):
        choose_monitor(load_config("hash_64bit.yaml", ["run.monitor=val/t2i_mAP@N"]), test_only, HASH_NAMES)
    with pytest.raises(ConfigError, match="does not log"):
        choose_monitor(load_config("fine_grained.yaml", ["run.monitor=val/i2t_R@50"]), test_only, metric_names())


def test_a_key_added_to_the_schema_since_the_run_started_blocks_a_resume_only_when_set_off_its_default(tmp_path):
    """A run saved before `tokens.text_ends` existed (its config.yaml lacks the key) trained as its default
    does: resuming with the default is no change, with another value it is one."""
    run_dir = _unfinished_run(tmp_path)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["tokens"]["text_ends"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert check_resume(run_dir, load_config("hash_64bit.yaml", [f"run.root={tmp_path}/runs"])) == {}
    with pytest.raises(ConfigError, match="tokens.text_ends: 'keep' -> 'drop'"):
        check_resume(run_dir, load_config("hash_64bit.yaml", [f"run.root={tmp_path}/runs", "tokens.text_ends=drop"]))
