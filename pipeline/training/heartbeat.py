"""Which rank stopped, among many: every rank bumps its own counter in the rendezvous store (the process
group's TCP store, at MASTER_ADDR:MASTER_PORT) every few seconds, from a thread of its own. A rank whose
collective failed reads all counters twice, a few beats apart: the ranks whose counter stood still are the
stopped ones. A rank that is merely stuck in the same broken collective keeps beating (the waiting is
done by its main thread, without the GIL); a killed or frozen one does not.

No Lightning import: spawned test ranks import this."""
from __future__ import annotations

import logging
import os
import threading
import time
from datetime import timedelta

import torch.distributed as dist

log = logging.getLogger(__name__)

BEAT_S = 2.0
PREFIX = "fico/heartbeat/"
_running: list = []  # the Heartbeat of this process once started: only then do silent counters mean anything


def running() -> bool:
    return bool(_running)


def stop_all() -> None:
    """Quiet before the group goes: a beat to a store that has closed would only add noise to the log."""
    for beat in list(_running):
        beat.stop()


def _store(timeout_s: float):
    """A client of the rendezvous store, or None where the environment does not name it."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    return dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


class Heartbeat:
    """This rank's counter, bumped every `beat_s` seconds by a daemon thread until `stop` (or until the store
    is gone: then there is nobody left to tell)."""

    def __init__(self, rank: int, beat_s: float = BEAT_S):
        self.rank, self.beat_s = rank, beat_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        if self._thread is not None:
            return True
        try:
            store = _store(30)
        except Exception as e:  # noqa: BLE001 (a heartbeat is a help for the error message, never a failure)
            log.info("no heartbeat: the rendezvous store did not answer (%s)", e)
            return False
        if store is None:
            return False
        self._thread = threading.Thread(target=self._beat, args=(store,), daemon=True, name="fico-heartbeat")
        self._thread.start()
        _running.append(self)
        return True

    def _beat(self, store):
        key = f"{PREFIX}{self.rank}"
        while True:
            try:
                store.add(key, 1)
            except Exception:  # noqa: BLE001 (the store's host has gone: the run is ending anyway)
                return
            if self._stop.wait(self.beat_s):
                return

    def stop(self):
        self._stop.set()
        if self in _running:
            _running.remove(self)


def silent_ranks(world: int, me: int, beat_s: float = BEAT_S, beats: int = 3) -> list[int] | None:
    """The ranks (not `me`) whose heartbeat did not move during `beats` beats; None when the store does not
    answer (it lives in rank 0's process, or in the launcher's agent under torchrun)."""
    try:
        store = _store(5)
        if store is None:
            return None
        keys = [f"{PREFIX}{r}" for r in range(world)]
        before = [store.add(k, 0) for k in keys]  # adding 0 reads a counter
        time.sleep(beats * beat_s)
        after = [store.add(k, 0) for k in keys]
    except Exception:  # noqa: BLE001 (no answer is an answer: the caller says "a peer stopped")
        return None
    return [r for r in range(world) if r != me and after[r] == before[r]]
