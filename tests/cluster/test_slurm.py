"""Training under a real SLURM (slurmctld + slurmd on localhost, started by the `slurm_cluster` fixture):
a 2-task CPU DDP job that is requeued while it trains and resumes, and the job-shape checks."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch  # noqa: F401  (imported now: importing it while the job trains would let the job race ahead)

from tests.helpers.runs import ROOT, checkpoint_step
from tests.helpers.slurm import report_line

TINY = ["data.batch_size=16", "data.num_workers=0", "model.image_encoder.width=32", "model.text_encoder.width=32",
        "model.head_hidden=64", "hash.num_negatives=64", "optim.warmup_steps=2", "trainer.log_every_n_steps=5",
        "model.image_encoder.init_steps=2"]
DDP_CPU = ["trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu"]


def wait_for(predicate, timeout: float, what: str, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def step_if_newer(path: Path, than: float):
    """(mtime, global step) of the checkpoint if it was written after `than`, else None."""
    try:
        mtime = path.stat().st_mtime
        return (mtime, checkpoint_step(path)) if mtime > than else None
    except (FileNotFoundError, EOFError):
        return None


def interrupt(cluster, job: str, how: list[str], log: Path, last: Path, restart: int, min_step: int):
    """Once last.ckpt reaches `min_step`, interrupt the job with `how`; wait for its restart number
    `restart` and its first checkpoint after that. Returns the time of the interruption, the step of
    last.ckpt when the job restarted, the time of the first resumed step and that step."""
    wait_for(lambda: (s := step_if_newer(last, 0)) and s[1] >= min_step, 120, f"step {min_step}")
    cluster.run(*how, job)
    t_interrupt = time.time()
    wait_for(lambda: f"restart {restart}:" in log.read_text(), 120, f"restart {restart}")
    before, stopped_at = last.stat().st_mtime, checkpoint_step(last)  # nothing writes until the restart trains
    t_resumed, step = wait_for(lambda: step_if_newer(last, before), 420, "a checkpoint after the restart", poll=0.05)
    return t_interrupt, stopped_at, t_resumed, step


@pytest.mark.slurm
def test_two_task_ddp_job_survives_requeue_and_wall_time_signal(slurm_cluster, shapes_tiny, tmp_path, request):
    """sbatch -> srun 2 tasks (gloo). `scontrol requeue` after a few checkpointed steps: the job restarts
    (SLURM_RESTART_COUNT=1) and resumes from last.ckpt at the step it had reached. Then the wall-time
    signal (SIGUSR1, as --signal=SIGUSR1@90 sends it): hpc_ckpt_1.ckpt, requeued by the job itself, restart 2
    resumes from it. The job finishes all steps as one W&B run, with metrics."""
    steps = 30
    args = [sys.executable, "-m", "pipeline.submit", "hash_64bit.yaml", f"data.root={shapes_tiny}",
            f"run.root={tmp_path}", *TINY, *DDP_CPU, "trainer.max_epochs=3", f"data.steps_per_epoch={steps // 3}",
            "trainer.ckpt_every_n_steps=1", "--cpus-per-task=1", f"--sbatch-arg=--output={tmp_path}/%j.out"]
    t_submit = time.time()
    job = re.search(r"submitted job (\d+)", slurm_cluster.run(*args).stdout).group(1)
    log = tmp_path / f"{job}.out"
    run_dir = tmp_path / f"hash_64bit-{job}"  # named after the job id, which survives requeues
    last, hpc = run_dir / "checkpoints" / "last.ckpt", run_dir / "hpc_ckpt_1.ckpt"
    try:
        t_first, _ = wait_for(lambda: step_if_newer(last, 0), 420, "the first checkpoint")
        t_requeue, killed_at, t_resumed1, step1 = interrupt(slurm_cluster, job, ["scontrol", "requeue"], log, last,
                                                            restart=1, min_step=3)
        t_signal, _, t_resumed2, step2 = interrupt(slurm_cluster, job, ["scancel", "--signal=USR1"], log, last,
                                                   restart=2, min_step=step1 + 2)
        (final,) = slurm_cluster.wait(job, 240)
    finally:
        slurm_cluster.run("scancel", job, check=False)
    text = log.read_text()
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "2", (final, text[-3000:])
    for n in range(3):  # SLURM_RESTART_COUNT as slurm/train.sbatch echoes it
        assert f"restart {n}:" in text
    sections = text.split("[train.sbatch] job")[1:]  # one per start
    assert len(sections) == 3 and all("MEMBER: 2/2" in s for s in sections), text[-3000:]  # each ran 2 ranks
    starts = re.findall(r"^resuming from (\S+)", text, re.M)  # train.py's line
    assert starts == [str(last), str(hpc)], starts
    # Each restart continued from where it was stopped; a fresh start would save step 1, 2, ...
    assert 3 <= killed_at < steps and killed_at < step1 <= killed_at + 2, (killed_at, step1)
    saved_at = checkpoint_step(hpc)
    assert step1 + 2 <= saved_at < steps and saved_at < step2 <= saved_at + 2, (step1, saved_at, step2)
    assert checkpoint_step(last) == steps
    assert json.loads((run_dir / "test_metrics.json").read_text())["i2t_mAP@N"] >= 0
    # one W&B run, continued: every start names the same id and has its offline folder
    ids = set(re.findall(r"offline-run-\d{8}_\d{6}-([\w-]+)", text))
    assert len(ids) == 1, ids
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{ids.pop()}"))) == 3
    started = [time.mktime(time.strptime(t, "%Y-%m-%d %H:%M:%S"))  # when each start's batch script began
               for t in re.findall(r"restart \d: (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", text)]
    report_line(request, f"\n[slurm tests] tiny 2-task CPU job: sbatch -> first training step {t_first - t_submit:.1f} s "
                     f"(job started after {max(0.0, started[0] - t_submit):.0f} s); scontrol requeue -> resumed at step {step1} "
                     f"{t_resumed1 - t_requeue:.1f} s (restarted after {started[1] - t_requeue:.0f} s); SIGUSR1 -> "
                     f"resumed at step {step2} {t_resumed2 - t_signal:.1f} s (restarted after {started[2] - t_signal:.0f} s)")


@pytest.mark.slurm
def test_plain_sbatch_with_a_mismatched_shape_stops_before_srun(slurm_cluster, tmp_path):
    """The template checks the allocation against the config before srun (no hang at 'Initializing distributed')."""
    job = slurm_cluster.run("sbatch", "--parsable", "--ntasks-per-node=1", "--cpus-per-task=1",
                            f"--output={tmp_path}/job.out", "slurm/train.sbatch", "hash_64bit.yaml", "trainer.devices=2",
                            f"run.root={tmp_path}/runs").stdout.strip()
    (final,) = slurm_cluster.wait(job, 60)
    text = (tmp_path / "job.out").read_text()
    assert final["JobState"] == "FAILED" and final["ExitCode"] == "2:0", final
    assert "error: --ntasks-per-node=1 but trainer.devices=2" in text
    assert "Initializing distributed" not in text and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, message", [
    (["trainer.devices=2", "--ntasks-per-node=1"], "--ntasks-per-node=1 but trainer.devices=2"),
    (["--gpus-per-node=4", "--ntasks-per-node=2"], "--ntasks-per-node=2 but trainer.devices=4"),
    (["trainer.devices=2", "--gpus-per-node=4"], "--gpus-per-node=4 contradicts trainer.devices=2"),
    (["trainer.num_nodes=2", "--nodes=1"], "--nodes=1 contradicts trainer.num_nodes=2"),
    (["trainer.devices=auto"], "trainer.devices=auto: a SLURM job starts one task per device"),
    (["optim.lr=["], "override 'optim.lr=['"),
])
def test_submit_refuses_a_shape_mismatch_before_sbatch(tmp_path, args, message):
    """No cluster needed: a stand-in `sbatch` records whether it was called at all."""
    called = tmp_path / "sbatch-called"
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ntouch {called}\necho 1\n")
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.submit", "hash_64bit.yaml", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and not called.exists()
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    # and a consistent request goes through, with the shape taken from the config
    ok = subprocess.run([sys.executable, "-m", "pipeline.submit", "hash_64bit.yaml", "trainer.devices=2",
                         "trainer.num_nodes=3", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and "--nodes=3 --ntasks-per-node=2" in ok.stdout, ok.stderr
