"""A real one-node SLURM for the tests marked slurm: sbatch / scontrol against slurm/local_cluster.sh's
cluster, and a line on the terminal that output capture does not swallow."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.runs import ROOT

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


def report_line(request, line: str) -> None:
    """A line on the terminal even under output capture (a skip reason must be seen, not only counted)."""
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter and capture:
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)
