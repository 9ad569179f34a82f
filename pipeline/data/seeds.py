"""The randomness of the data stream: the epoch shared with the data workers, and a seed per (seed,
epoch, rank, worker) so that every stream draws its own, reproducibly."""
from __future__ import annotations

import multiprocessing as mp

from torch.utils.data import get_worker_info


class SharedEpoch:
    """The epoch number in shared memory, so that persistent workers see it change."""

    def __init__(self, epoch: int = 0):
        self.value = mp.Value("i", epoch)

    def set(self, epoch: int) -> None:
        self.value.value = epoch

    def get(self) -> int:
        return self.value.value


def worker_slot() -> tuple[int, int]:
    """(this data worker's id, the number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def stream_seed(seed: int, epoch: int, rank: int) -> int:
    """Distinct per (seed, epoch, rank, worker), reproducible."""
    worker, _ = worker_slot()
    return hash((seed, epoch, rank, worker)) & 0x7FFFFFFF
