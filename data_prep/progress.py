"""The progress bar of every command-line tool, here and in `pipeline` (tqdm on stderr, or silent)."""
from __future__ import annotations

import sys


class _NoBar:
    """What `progress_bar` returns when disabled: the same calls, no output."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "it", initial: int = 0):
    """A tqdm bar on stderr (a context manager too), or a silent stand-in when disabled."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)
