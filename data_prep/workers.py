"""A process pool that is also fine with one worker (then everything runs in this process)."""
from __future__ import annotations

import multiprocessing as mp
from typing import Callable, Iterable, Iterator


class Workers:
    def __init__(self, n: int):
        self.n = max(1, n)
        self.pool = None

    def __enter__(self) -> "Workers":
        if self.n > 1:
            # spawn, not fork: the caller may hold threads (tokenizers, torch) that a fork would break.
            # The price: each worker re-imports the caller's __main__ module (light for the CLI).
            self.pool = mp.get_context("spawn").Pool(self.n)
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()  # also on Ctrl-C: no orphaned writers
            self.pool.join()

    def map(self, fn: Callable, jobs: Iterable, ordered: bool = True) -> Iterator:
        jobs = list(jobs)
        if self.pool is None or len(jobs) <= 1:
            return map(fn, jobs)
        return (self.pool.imap if ordered else self.pool.imap_unordered)(fn, jobs)
