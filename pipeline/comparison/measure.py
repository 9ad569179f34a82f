"""How the comparison tools measure: peak memory of a block of work, the median time of a call, the machine."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.evaluation.hamming import backend as hamming_backend


class PeakRSS:
    """Peak resident memory above the level at entry (Linux: VmHWM reset via clear_refs);
    ``mib`` is None where the kernel does not allow the reset."""

    def __enter__(self):
        self.mib = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = self._read("VmRSS")
        except OSError:
            self.base = None
        return self

    @staticmethod
    def _read(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise OSError(key)

    def __exit__(self, *exc):
        if self.base is not None:
            try:
                self.mib = max(0.0, (self._read("VmHWM") - self.base) / 1024.0)
            except OSError:
                pass


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "numpy": np.__version__, "device": str(device),
            "hamming_kernel": hamming_backend(), "python": platform.python_version()}
    try:
        info["load_average_at_start"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        pass
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except ImportError:
        info["faiss"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls of `fn` (one after the other, in this process)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))
