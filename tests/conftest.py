import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub look-up otherwise takes ~50 s to fail here
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def shapes_tiny(tmp_path_factory) -> Path:
    """A small real shapes dataset (shards, card, tokenizer), built once per session."""
    from data_prep.shapes import build_shapes

    return build_shapes(tmp_path_factory.mktemp("data") / "shapes", train=256, val=64, test=64, shard_size=32)


def run_train(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python train.py ...` in a subprocess: the real entry point, as a user runs it."""
    full_env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- a local SLURM cluster (tests marked slurm)
import time  # noqa: E402  (this section was appended to the file)

LOCAL_CLUSTER = ROOT / "slurm" / "local_cluster.sh"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}


class SlurmCluster:
    """sbatch/scontrol against the cluster that slurm/local_cluster.sh runs; `env` also reaches the jobs
    (sbatch exports the submitter's environment), so they find this python and its packages."""

    def __init__(self, conf: str):
        self.env = {**os.environ, "SLURM_CONF": conf, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                    "PYTHON": sys.executable, "WANDB_MODE": "offline",
                    "WANDB_SILENT": "false"}  # W&B prints its run id into the job log

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, cwd=ROOT, capture_output=True, text=True, check=check, **kw)

    def job(self, job_id: str) -> list[dict]:
        """`scontrol show job` fields, one dict per job (an array has one per task)."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout
        return [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in out.splitlines() if line.strip()]

    def wait(self, job_id: str, timeout: float) -> list[dict]:
        """Waits until every task of the job has ended; returns their final fields."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.job(job_id)
            if jobs and all(j.get("JobState") in TERMINAL_STATES for j in jobs):
                return jobs
            time.sleep(0.5)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} did not end within {timeout:.0f} s: {self.job(job_id)}")


def _report(request, line: str) -> None:
    """A line on the terminal even under output capture (a skip reason must be seen, not only counted)."""
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter and capture:
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)


@pytest.fixture(scope="session")
def slurm_cluster(request):
    """Starts a one-node SLURM on localhost (installing its Debian packages if needed) and stops, by pid,
    exactly the daemons it started. Skips, with the reason printed, where that is impossible; with
    FICO_REQUIRE_SLURM=1 (set by .ci/run) that is an error instead."""
    def cannot(reason: str):
        _report(request, f"\n[slurm tests] cannot start a local SLURM cluster: {reason}")
        if os.environ.get("FICO_REQUIRE_SLURM") == "1":
            pytest.fail(f"FICO_REQUIRE_SLURM=1 but no SLURM cluster: {reason}")
        pytest.skip(f"no local SLURM cluster: {reason}")

    if sys.platform != "linux" or os.geteuid() != 0:
        cannot("needs root on Linux (slurmd starts jobs as their users)")
    proc = subprocess.run(["bash", str(LOCAL_CLUSTER), "start", "--install"], capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        why = [line for line in proc.stderr.strip().splitlines() if "] stopped " not in line][-3:]
        cannot(" | ".join(why) or f"exit code {proc.returncode}")
    started = proc.stdout.strip().splitlines()[-1].removeprefix("started:").split()
    conf = subprocess.run(["bash", str(LOCAL_CLUSTER), "env"], capture_output=True, text=True,
                          check=True).stdout.strip().split("=", 1)[1]
    _report(request, f"\n[slurm tests] local cluster up ({'started ' + ' '.join(started) if started else 'already running'})")
    yield SlurmCluster(conf)
    if started:
        subprocess.run(["bash", str(LOCAL_CLUSTER), "stop", *started], capture_output=True, timeout=120)


def checkpoint_step(path: Path) -> int:
    """The global step saved in a Lightning checkpoint."""
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


# ---------------------------------------------------------------- trained tiny runs (learning, report, hybrid)
@pytest.fixture(scope="session")
def shapes_backbone(tmp_path_factory) -> Path:
    """The shapes backbone at test size (SmallCNN width 32, 150 steps: ~7 s, ~80 % of held-out shapes
    named), made once per session: what the tiny runs start from, as the real configs do."""
    from pipeline.backbone import shapes_backbone as make

    return make(32, 64, [0.5] * 3, [0.25] * 3, 150, tmp_path_factory.mktemp("backbones"))


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


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, shapes_tiny, shapes_backbone) -> dict:
    """One trained run of each family on `shapes_tiny` (config name -> run directory), trained once."""
    args = tiny_run_args(shapes_backbone)
    return train_together({c: ["--config", f"{c}.yaml", f"data.root={shapes_tiny}", *args]
                           for c in ("hash_64bit", "fine_grained")}, tmp_path_factory.mktemp("tiny_runs"))


@pytest.fixture(scope="session")
def tiny_baselines(tmp_path_factory, shapes_tiny, shapes_backbone, tiny_runs) -> dict:
    """What the tiny runs are judged against: each family untrained (same initialisation, run.train=false),
    and the hashing run trained a second time with the same seed."""
    args = tiny_run_args(shapes_backbone)
    runs = {f"{c}_untrained": ["--config", f"{c}.yaml", f"data.root={shapes_tiny}", *args, "run.train=false"]
            for c in ("hash_64bit", "fine_grained")}
    runs["hash_64bit_again"] = ["--config", "hash_64bit.yaml", f"data.root={shapes_tiny}", *args]
    return train_together(runs, tmp_path_factory.mktemp("tiny_baselines"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread in a module's tests and the runs they start: on a shared 2-core machine,
    2 threads that spin-wait for each other made tiny models 3x (train.py) to 60x (a hash step) slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
