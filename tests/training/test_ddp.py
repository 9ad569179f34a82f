"""Distributed training and crash safety without SLURM: 2-process CPU DDP (gloo) through train.py in a
subprocess (Lightning's `ddp` re-runs the launching command, so never in-process under pytest),
killed with -9 and resumed, then checked against a 1-process evaluation."""
import json
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch

from pipeline.config import load_config
from pipeline.data import RetrievalDataModule
from pipeline.training.build import build_module
from pipeline.training.run_dir import resume_checkpoint
from tests.helpers.runs import ROOT, checkpoint_step, run_train

TINY = ["data.batch_size=16", "data.num_workers=0", "model.image_encoder.width=32", "model.text_encoder.width=32",
        "model.head_hidden=64", "hash.num_negatives=64", "optim.warmup_steps=2", "trainer.log_every_n_steps=2",
        "model.image_encoder.init_steps=2"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # two processes x two math threads on two cores run ~10x slower here


def evaluate_in_one_process(run_dir, ckpt) -> dict:
    """The test split through the run's own config and checkpoint, on one CPU process."""
    cfg = load_config(str(run_dir / "config.yaml"), ["trainer.devices=1", "trainer.strategy=auto"])
    data = RetrievalDataModule(cfg.data, seed=cfg.run.seed)
    tok = data.tokenizer
    model = build_module(cfg, data.card.num_images("train"), len(tok), tok.pad_token_id or 0, load_init=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.test(model, datamodule=data, ckpt_path=str(ckpt), verbose=False)
    return model.test_results


def _tmp_files(ckpt_dir):
    return [e.name for e in os.scandir(ckpt_dir) if ".tmp-" in e.name] if ckpt_dir.exists() else []


def start_and_kill_9(args, cwd, last):
    """Starts train.py, waits until it has saved step 2, then kill -9 while it writes a checkpoint
    (its temporary file exists), so that the atomic write is what is being tested."""
    env = {**os.environ, "WANDB_MODE": "offline", **ONE_THREAD}
    # its own session: kill -9 reaches the rank Lightning starts and the W&B service too (a group, by pid)
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (last.exists() and checkpoint_step(last) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "training ended before its 2nd checkpoint"
            time.sleep(0.05)
        deadline = time.monotonic() + 10
        while not _tmp_files(last.parent) and time.monotonic() < deadline:
            time.sleep(0.002)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_two_process_ddp_killed_resumes_and_tests_like_one_process(shapes_tiny, tmp_path):
    """2-process CPU DDP: kill -9 after a checkpoint, the same command resumes from last.ckpt and
    finishes; its test metrics equal a 1-process evaluation of the same checkpoint (every test record
    seen once across ranks, matched by id)."""
    steps = 16
    args = ["--config", "hash_64bit.yaml", f"data.root={shapes_tiny}", f"run.root={tmp_path}", *TINY,
            "trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu", "trainer.max_epochs=2",
            f"data.steps_per_epoch={steps // 2}", "trainer.ckpt_every_n_steps=1"]
    run_dir = tmp_path / "hash_64bit"
    last = run_dir / "checkpoints" / "last.ckpt"
    start_and_kill_9(args, tmp_path, last)
    # Usually the kill lands mid-write: the partial file then only exists under its temporary name
    # (.last.ckpt.tmp-PID), and last.ckpt still loads completely.
    killed_at = checkpoint_step(last)
    assert 2 <= killed_at < steps
    assert resume_checkpoint(run_dir) == str(last)  # a leftover .last.ckpt.tmp-PID is never picked

    proc = run_train(args, cwd=tmp_path, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {last}" in proc.stdout
    assert "MEMBER: 2/2" in proc.stderr
    assert checkpoint_step(last) == steps  # continued to the configured steps, in the same folder
    assert not (tmp_path / "hash_64bit-2").exists()

    ddp = json.loads((run_dir / "test_metrics.json").read_text())
    torch.set_num_threads(1)
    single = evaluate_in_one_process(run_dir, run_dir / "checkpoints" / "best.ckpt")  # what the DDP test used
    assert set(single) == set(ddp)
    mismatched = {k: (ddp[k], single[k]) for k in ddp if single[k] != pytest.approx(ddp[k], rel=1e-6, abs=1e-9)}
    assert not mismatched, f"2-process test metrics differ from 1-process ones: {mismatched}"
