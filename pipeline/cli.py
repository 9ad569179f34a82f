"""Small pieces shared by the command-line tools (evaluate, report, hybrid, features, encode)."""
from __future__ import annotations

import argparse
import sys


def int_list(text: str) -> tuple[int, ...]:
    """`1,5,10` or `1e3,1e6` as integers (an argparse `type`)."""
    values = []
    for v in text.split(","):
        if v.strip():
            number = float(v)
            if number != int(number):
                raise argparse.ArgumentTypeError(f"{v.strip()!r} is not a whole number")
            values.append(int(number))
    return tuple(values)


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


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "it", initial: int = 0):
    """A tqdm bar on stderr (a context manager too), or a silent stand-in when disabled."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm  # comes with transformers (huggingface_hub)

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)
