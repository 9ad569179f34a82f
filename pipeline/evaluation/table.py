"""The FiCo-ITR result table as text (markdown), from a dict of the protocol's names."""
from __future__ import annotations


def _fmt(value: float, is_map: bool) -> str:
    return f"{value:.4f}" if is_map else f"{value:.2f}"


def _is_fraction(name: str) -> bool:
    """mAP, P@K and the radius lookup are fractions; R@K (with or without [ties]) and ranks are not."""
    return name.startswith(("mAP", "P@")) or name == "R@H2"


def format_table(results: dict[str, float], title: str = "") -> str:
    """Two rows (i2t, t2i) of instance-level R@K / MedianR / MeanR and category-level mAP@k."""
    names = [k[4:] for k in results if k.startswith("i2t_")]
    header = "| direction | " + " | ".join(names) + " |"
    lines = ([f"**{title}**", ""] if title else []) + [header, "|" + "---|" * (len(names) + 1)]
    for d in ("i2t", "t2i"):
        cells = [_fmt(results[f"{d}_{n}"], _is_fraction(n)) for n in names if f"{d}_{n}" in results]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    if "rsum" in results:
        lines += ["", f"rsum = {results['rsum']:.2f}"]
    return "\n".join(lines)


def format_tables(results: dict[str, float], title: str) -> str:
    """format_table of the results, then one table per nested code prefix (names `<L>bit/...`)."""
    tables = [format_table(results, title)]
    for prefix in dict.fromkeys(k.split("/")[0] for k in results if "/" in k):
        own = {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith(f"{prefix}/")}
        what = f"first {prefix}" if prefix.endswith("bit") else f"mean over folds of {prefix[4:] or 1000} images"
        tables.append(format_table(own, f"{title}, {what}"))
    return "\n\n".join(tables)
