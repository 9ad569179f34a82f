"""A rank that stops (killed, out of memory, a lost node) must not hold the others, and the allocation, for
the process group's default 30 minutes. `trainer.collective_timeout` bounds every collective's wait once
training runs; a rank whose collective fails because a peer is gone (gloo reports a closed connection at
once, or a timeout; NCCL a timeout) prints one line naming the peer when it can, and how to resume, and
exits non-zero.

The start-up rendezvous keeps a long wait (START_UP_WAIT): ranks arrive there minutes apart when one of
them is slower to import, load weights or read the dataset card, which is no failure. The group is made
with that wait and lowered to the collective timeout as soon as it exists (bound_collectives, called by
the BoundedCollectives callback). No Lightning import at module level: spawned test ranks import this.

Under NCCL the timeout is enforced by torch's watchdog thread, which ends the process itself: the line
below is then printed only when the error reaches Python first (see docs/architecture.md)."""
from __future__ import annotations

import contextlib
import inspect
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from pipeline.training import heartbeat

EXIT_CODE = 3  # not 1 (any crash) and not 2 (bad config): a peer stopped, the run itself can resume

# What gloo and NCCL say when a peer's connection closes or a collective times out (gloo: pair.cc, the
# buffers' "Timed out waiting Nms"; both raise a plain RuntimeError in some torch versions).
_PEER_SIGNS = ("connection closed by peer", "connection reset by peer", "broken pipe", "read error",
               "write error", "timed out", "timeout", "connection refused", "socket closed")


START_UP_WAIT = timedelta(minutes=30)  # torch's and Lightning's default for every wait


def collective_timeout(cfg) -> timedelta:
    return timedelta(seconds=float(cfg.trainer.collective_timeout))


def _pg_timeout_setter():
    return getattr(dist.distributed_c10d, "_set_pg_timeout", None)  # torch >= 2.3


def start_up_timeout(cfg) -> timedelta:
    """The process group's wait when it is made: the long one, where torch can lower it afterwards; else the
    collective timeout from the start (then a slow rendezvous needs a larger trainer.collective_timeout)."""
    if _pg_timeout_setter() is None:
        return collective_timeout(cfg)
    return max(collective_timeout(cfg), START_UP_WAIT)


def build_strategy(cfg):
    """trainer.strategy as the Trainer takes it, its process group made with the start-up wait (then lowered
    by BoundedCollectives): a name from Lightning's registry becomes its object, so that the wait is ours.
    `auto` stays a name: Lightning decides after seeing the devices (set_auto_timeout covers it)."""
    from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

    name, timeout = cfg.trainer.strategy, start_up_timeout(cfg)
    if name == "ddp":
        # The hash memory bank is updated identically on every rank: no need to broadcast it each step.
        return DDPStrategy(broadcast_buffers=False, timeout=timeout)
    entry = StrategyRegistry[name] if name in StrategyRegistry else None
    if not entry or "timeout" not in inspect.signature(entry["strategy"]).parameters:
        return name  # auto, single-device strategies: no process group of ours to bound
    return entry["strategy"](**entry["init_params"], timeout=timeout)


def set_auto_timeout(trainer, cfg) -> None:
    """`strategy: auto` with several devices or nodes is Lightning's DDPStrategy, made inside the Trainer; its
    process group is only created in fit, so the timeout can still be set here (Lightning keeps it in
    `_timeout`, the attribute its own constructor argument sets)."""
    from lightning.pytorch.strategies import DDPStrategy

    if cfg.trainer.strategy == "auto" and isinstance(trainer.strategy, DDPStrategy):
        trainer.strategy._timeout = start_up_timeout(cfg)


def bound_collectives(timeout: timedelta) -> bool:
    """Every later collective of the default group waits at most `timeout` (BoundedCollectives calls this right
    after Lightning made the group); with more than two ranks, this rank's heartbeat starts (who_stopped).
    False when there is no group, or this torch cannot change its timeout."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return False
    if dist.get_world_size() > 2 and not heartbeat.running():
        heartbeat.Heartbeat(dist.get_rank()).start()
    set_timeout = _pg_timeout_setter()
    if set_timeout is None:  # the group was made with the collective timeout already (start_up_timeout)
        return False
    set_timeout(timeout)
    return True


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def peer_failure(exc: BaseException) -> str | None:
    """The short reason when `exc` is a collective that failed because a peer stopped or timed out, else None."""
    for e in _chain(exc):
        text = str(e).strip()
        low = text.lower()
        backend = isinstance(e, getattr(dist, "DistError", ())) or (
            isinstance(e, RuntimeError) and ("gloo" in low or "nccl" in low))
        if backend and any(sign in low for sign in _PEER_SIGNS):
            # gloo prefixes its source file in brackets; the first sentence after it says what happened
            reason = text.split("] ", 1)[-1].splitlines()[0] if text else type(e).__name__
            return reason.split(". ")[0][:120]
    return None


def who_stopped(trainer) -> str:
    """Names the stopped rank(s) where that is known: with two ranks, the other one; on one machine started by
    Lightning's launcher, rank 0 sees which of its child processes has exited; otherwise the ranks whose
    heartbeat stood still (pipeline/training/heartbeat.py, a few seconds' look). Else "a peer stopped"."""
    me, world = trainer.global_rank, trainer.world_size
    if world == 2:
        return f"rank {1 - me} stopped"
    procs = getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or []
    first = trainer.node_rank * trainer.num_devices  # Lightning's children are local ranks 1, 2, ...
    ranks = [first + i + 1 for i, p in enumerate(procs) if p.poll() is not None]
    if not ranks and heartbeat.running():
        ranks = heartbeat.silent_ranks(world, me)
        if ranks is None and me != 0 and not os.environ.get("TORCHELASTIC_RUN_ID"):
            return "rank 0 stopped (the rendezvous store it holds does not answer)"
    if not ranks:
        return "a peer stopped"
    return f"rank {ranks[0]} stopped" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))} stopped"


def resume_hint(run_dir: Path, job_tag: str | None) -> str:
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return "no checkpoint was saved yet: the same command starts the run again"
    if job_tag:  # a new job gets a new run folder (<name>-<job id>) unless told which one to continue
        return f"resubmit with run.id={run_dir.name} to resume from {last}"
    return f"the same command resumes from {last}"


def dead_peer_line(trainer, cfg, run_dir: Path, reason: str, job_tag: str | None) -> str:
    return (f"error: {who_stopped(trainer)}; rank {trainer.global_rank} gave up waiting for it ({reason}; "
            f"trainer.collective_timeout={cfg.trainer.collective_timeout:g} s): {resume_hint(run_dir, job_tag)}")


def _finish_wandb(seconds: float = 10.0) -> None:
    """Marks the W&B run failed, in a thread given `seconds`: nothing here may hang the exit."""
    wandb = sys.modules.get("wandb")
    if wandb is None or wandb.run is None:
        return
    t = threading.Thread(target=lambda: wandb.run.finish(exit_code=EXIT_CODE), daemon=True)
    t.start()
    t.join(seconds)


def _end_children(trainer, seconds: float = 10.0) -> None:
    """On one machine rank 0 started the other ranks: it gives them `seconds` to end on their own (and say so),
    then kills the rest, so that a frozen rank is not left behind holding its memory."""
    procs = getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or []
    deadline = time.monotonic() + seconds
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def exit_when_a_peer_stops(trainer, cfg, run_dir: Path, job_tag: str | None):
    """Around fit and test: a collective that failed because a peer stopped ends this rank with one line.
    os._exit, because the process group is broken: destroying it, or Python's exit hooks, may wait again."""
    try:
        yield
    except Exception as e:
        reason = peer_failure(e) if trainer.world_size > 1 else None
        if reason is None:
            raise
        line = dead_peer_line(trainer, cfg, run_dir, reason, job_tag)  # before W&B's own goodbye lines
        _finish_wandb()
        print(line, file=sys.stderr, flush=True)
        sys.stdout.flush()
        _end_children(trainer)
        os._exit(EXIT_CODE)
