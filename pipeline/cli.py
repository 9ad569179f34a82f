"""Small pieces shared by the command-line tools (evaluate, report, hybrid, features, ...)."""
from __future__ import annotations

import argparse

from data_prep import progress_bar

__all__ = ["int_list", "progress_bar"]


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
