"""What the comparison tools write: CSV files whose numbers round-trip, and markdown tables."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: csv_value(r.get(c)) for c in columns})


def csv_value(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)  # shortest exact form: CSV numbers round-trip
    return "" if v is None else v


def markdown_table(rows: Sequence[dict], columns: Sequence[str], formats: dict | None = None) -> str:
    formats = formats or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("–")
            elif c in formats:
                cells.append(formats[c](v))
            elif isinstance(v, float):
                cells.append(f"{v:.2f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def size_label(n: int) -> str:
    for div, suffix in ((1_000_000, "M"), (1_000, "K")):
        if n >= div and n % (div // 10) == 0:
            v = n / div
            return f"{v:g}{suffix}"
    return str(n)
