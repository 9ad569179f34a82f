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

    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


# ---------------------------------------------------------------- trained tiny runs (report / hybrid tests)
TINY_RUN = ["data.batch_size=16", "data.eval_batch_size=32", "data.num_workers=0", "trainer.max_epochs=1",
            "data.steps_per_epoch=3", "model.image_encoder.width=16", "model.image_encoder.init_steps=2",
            "model.text_encoder.width=32", "model.head_hidden=32", "hash.num_negatives=64", "optim.warmup_steps=2", "logger.wandb=false"]


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, shapes_tiny) -> dict:
    """One trained run of each family on `shapes_tiny` (config name -> run directory), trained once,
    both at the same time (each is mostly Python start-up on one core)."""
    root = tmp_path_factory.mktemp("tiny_runs")
    env = {**os.environ, "WANDB_MODE": "offline"}
    procs = {}
    for config in ("hash_64bit.yaml", "fine_grained.yaml"):
        args = [sys.executable, str(ROOT / "train.py"), "--config", config, f"data.root={shapes_tiny}",
                f"run.root={root}", *TINY_RUN]
        procs[config.removesuffix(".yaml")] = subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.PIPE,
                                                               stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
    return {name: root / name for name in procs}


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread in a module's tests and the runs they start: on a shared 2-core machine,
    2 threads that spin-wait for each other made tiny models 3x (train.py) to 60x (a hash step) slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
