"""Running the real entry points from tests: train.py in a subprocess (as a user runs it), several at once."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python train.py ...` in a subprocess: the real entry point, as a user runs it."""
    full_env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def tiny_run_args(backbone: Path) -> list[str]:
    """A tiny config of either family that learns within seconds: 24 epochs of 8 steps on shapes_tiny."""
    return ["data.batch_size=32", "data.eval_batch_size=64", "data.num_workers=0", "trainer.max_epochs=24",
            "model.image_encoder.width=32", f"model.image_encoder.init={backbone}", "model.text_encoder.width=32",
            "model.head_hidden=64", "hash.num_negatives=64", "optim.warmup_steps=2", "logger.wandb=false"]


def train_together(runs: dict[str, list[str]], root: Path) -> dict[str, Path]:
    """`python train.py` for each (run name -> arguments), all at once, one math thread each (two threads
    per process spinning for each other on this 2-core machine made them several times slower)."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, f"run.root={root}",
                                     f"run.name={name}"], cwd=root, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, args in runs.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"
    return {name: root / name for name in runs}


def checkpoint_step(path: Path) -> int:
    """The global step saved in a Lightning checkpoint."""
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
