"""A rank that stops never hangs the others: the collective timeout reaches the process group, a peer's
death or silence is recognised on real gloo ranks, and (slow) a real 2-rank run whose peer is killed ends
in one line and resumes with the same command."""
import contextlib
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import ConfigError, load_config
from pipeline.training import heartbeat
from pipeline.training.peers import START_UP_WAIT, bound_collectives, build_strategy, dead_peer_line, peer_failure
from tests.helpers.runs import ROOT, checkpoint_step, free_port, run_train


def test_collective_timeout_must_be_positive():
    with pytest.raises(ConfigError, match="trainer.collective_timeout"):
        load_config("hash_64bit.yaml", ["trainer.collective_timeout=0"])
    assert load_config("hash_64bit.yaml").trainer.collective_timeout == 600


@pytest.mark.parametrize("name", ["ddp", "ddp_spawn", "ddp_find_unused_parameters_true"])
def test_named_strategies_make_their_group_with_our_wait(name):
    """A strategy given by name becomes its object, so the process group is made with our wait (the name
    alone: Lightning's 30-minute default, whatever trainer.collective_timeout says)."""
    long = build_strategy(load_config("hash_64bit.yaml", [f"trainer.strategy={name}", "trainer.collective_timeout=7200"]))
    short = build_strategy(load_config("hash_64bit.yaml", [f"trainer.strategy={name}", "trainer.collective_timeout=5"]))
    assert long._timeout == timedelta(seconds=7200)
    assert short._timeout == START_UP_WAIT  # the start-up rendezvous keeps its long wait
    assert build_strategy(load_config("hash_64bit.yaml", ["trainer.strategy=auto"])) == "auto"


def test_auto_strategy_on_two_devices_gets_the_wait(tmp_path):
    from pipeline.training.callbacks import BoundedCollectives
    from pipeline.training.trainer import build_trainer

    cfg = load_config("hash_64bit.yaml", ["trainer.accelerator=cpu", "trainer.devices=2", "logger.wandb=false",
                                          "trainer.collective_timeout=7200"])
    trainer = build_trainer(cfg, tmp_path, "val/rsum")  # nothing is launched before fit
    assert trainer.strategy._timeout == timedelta(seconds=7200)
    assert any(isinstance(c, BoundedCollectives) and c.timeout == timedelta(seconds=7200) for c in trainer.callbacks)


def _worker(rank, port, out):
    """Rank 1 goes silent for 4 s, then dies, while rank 0 waits for it in an all-reduce, twice."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))  # a long start-up wait, as the Trainer makes it
    second = dist.new_group([0, 1])  # made (with the same 60 s) before the first one breaks on its timeout
    assert bound_collectives(timedelta(seconds=2))  # the default group only
    dist.barrier()
    if rank == 1:
        time.sleep(4)
        os._exit(0)  # no goodbye: the sockets just close
    results = []
    for group in (None, second):
        start = time.monotonic()
        try:
            dist.all_reduce(torch.ones(3), group=group)
            results.append((None, None))
        except Exception as e:  # noqa: BLE001 (which exception, is the point of the test)
            results.append((peer_failure(e), time.monotonic() - start))
    torch.save(results, out)
    os._exit(0)  # the group is broken: leave without waiting on it


def test_a_silent_then_dead_peer_ends_each_wait_and_is_recognised(tmp_path):
    """On two real gloo processes, the group made with a 60 s wait and lowered to 2 s once it exists: a
    peer that is silent ends the wait after ~2 s; one that dies ends a wait (of another group, 60 s) at
    once; both are read as a stopped peer."""
    out = tmp_path / "result.pt"
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(rank, port, str(out))) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
        p.kill()
    (silent, waited_silent), (dead, waited_dead) = torch.load(out)
    assert silent is not None and "timed out" in silent.lower() and 1.5 <= waited_silent < 4, (silent, waited_silent)
    assert dead is not None and "peer" in dead.lower() and waited_dead < 10, (dead, waited_dead)


def _three_ranks(rank, port, out):
    """Rank 2 dies; rank 1 lives on without taking part (as a rank stuck in the broken collective would);
    rank 0's all-reduce fails and it asks the heartbeats who stopped."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=3, timeout=timedelta(seconds=60))
    assert heartbeat.Heartbeat(rank, beat_s=0.3).start()
    assert bound_collectives(timedelta(seconds=5))  # keeps the heartbeat above (one per process)
    dist.barrier()
    if rank == 2:
        os._exit(0)
    if rank == 1:
        time.sleep(12)
        os._exit(0)
    try:
        dist.all_reduce(torch.ones(3))
        result = "no failure"
    except Exception as e:  # noqa: BLE001
        result = (peer_failure(e) is not None, heartbeat.silent_ranks(3, 0, beat_s=0.3))
    torch.save(result, out)
    os._exit(0)


def test_heartbeats_name_the_dead_rank_among_three(tmp_path):
    out = tmp_path / "result.pt"
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_three_ranks, args=(rank, port, str(out))) for rank in range(3)]
    for p in procs:
        p.start()
    procs[0].join(90)
    for p in procs:
        p.kill()
    assert torch.load(out) == (True, [2])  # rank 1 was alive (beating), rank 2 was not


def test_the_line_names_the_peer_and_how_to_resume(tmp_path):
    cfg = load_config("hash_64bit.yaml", ["trainer.collective_timeout=5"])
    trainer = SimpleNamespace(global_rank=0, world_size=2)  # two ranks: the other one stopped
    assert "no checkpoint was saved yet" in dead_peer_line(trainer, cfg, tmp_path, "x", None)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    line = dead_peer_line(trainer, cfg, tmp_path, "Connection reset by peer", None)
    assert line.startswith("error: rank 1 stopped; rank 0 gave up") and "\n" not in line
    assert f"the same command resumes from {tmp_path / 'checkpoints' / 'last.ckpt'}" in line
    assert f"run.id={tmp_path.name}" in dead_peer_line(trainer, cfg, tmp_path, "x", "1234")  # under SLURM
    assert peer_failure(ValueError("Connection reset by peer")) is None  # not from a collective


# ------------------------------------------------------------------ a real run (slow: two starts of two ranks)

TINY = ["data.batch_size=16", "data.num_workers=0", "model.image_encoder.width=16", "model.text_encoder.width=16",
        "model.head_hidden=32", "hash.num_negatives=64", "optim.warmup_steps=2", "trainer.log_every_n_steps=2",
        "model.image_encoder.init_steps=2", "trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu",
        "trainer.max_epochs=1", "data.steps_per_epoch=16", "trainer.ckpt_every_n_steps=2",
        "trainer.collective_timeout=5", "logger.wandb=false", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1"]


def _rank1_pid(rank0: int) -> int:
    """Lightning's launcher starts rank 1 as a child of rank 0, running train.py again."""
    deadline = time.monotonic() + 180  # imports and the data module come first
    while time.monotonic() < deadline:
        kids = Path(f"/proc/{rank0}/task/{rank0}/children").read_text().split()
        found = [int(k) for k in kids if b"train.py" in Path(f"/proc/{k}/cmdline").read_bytes()]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError("rank 1 never started")


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["kill-9", "frozen"])
def test_killed_or_frozen_rank_ends_the_other_in_one_line_and_the_run_resumes(shapes_tiny, tmp_path, sig):
    """kill -9 (gloo: connection reset) or SIGSTOP (silence: the timeout) of rank 1 mid-epoch, after a
    last.ckpt: rank 0 exits non-zero within timeout + 30 s with one line naming rank 1 and the resume;
    the same command then resumes from last.ckpt and finishes."""
    args = ["--config", "hash_64bit.yaml", f"data.root={shapes_tiny}", f"run.root={tmp_path}", *TINY]
    last = tmp_path / "hash_64bit" / "checkpoints" / "last.ckpt"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "stderr.txt"  # a file, not a pipe: a frozen rank 1 would hold a pipe open
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    try:
        rank1 = _rank1_pid(proc.pid)
        deadline = time.monotonic() + 240
        while not (last.exists() and checkpoint_step(last) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "training ended before its checkpoint"
            time.sleep(0.05)
        os.kill(rank1, sig)
        killed = time.monotonic()
        proc.wait(timeout=5 + 30)
        took = time.monotonic() - killed
        time.sleep(1)
        assert _gone(rank1), "rank 0 left rank 1 behind"  # killed, or frozen and then ended by rank 0
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing left: the usual case
            os.killpg(proc.pid, signal.SIGKILL)  # anything left when the test failed
        proc.wait()
    err = log.read_text()
    assert proc.returncode == 3, err[-3000:]
    assert took <= 5 + 30
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors == err.strip().splitlines()[-1:], err[-3000:]
    assert errors[0].startswith("error: rank 1 stopped; rank 0 gave up") and f"resumes from {last}" in errors[0]
    stopped_at = checkpoint_step(last)
    assert 2 <= stopped_at < 16

    done = run_train(args, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {last}" in done.stdout
    assert checkpoint_step(last) == 16
