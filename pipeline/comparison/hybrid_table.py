"""The hybrid table: its columns, one row (quality and time against the reference ranking) and its
markdown, shared by embedding and token-level hybrid retrieval."""
from __future__ import annotations

HYBRID_COLUMNS = ["direction", "gallery", "method", "screener", "K", "R@1", "R@5", "R@10", "candidate_recall",
                  "ms_per_query", "screen_ms", "rerank_ms", "R@10_vs_fine_grained", "time_vs_fine_grained",
                  "timed_queries"]


def hybrid_row(direction, gallery, method, screener, K, r, cand_recall, ms, screen_ms, rerank_ms, fg_r, fg_ms, timed):
    rel = 100.0 * r["R@10"] / fg_r["R@10"] if fg_r.get("R@10") else float("nan")
    return {"direction": direction, "gallery": gallery, "method": method, "screener": screener, "K": K,
            "R@1": r.get("R@1"), "R@5": r.get("R@5"), "R@10": r.get("R@10"), "candidate_recall": cand_recall,
            "ms_per_query": ms, "screen_ms": screen_ms, "rerank_ms": rerank_ms, "R@10_vs_fine_grained": rel,
            "time_vs_fine_grained": 100.0 * ms / fg_ms, "timed_queries": timed}


def format_rows(rows: list[dict]) -> str:
    cols = ["direction", "gallery", "method", "screener", "K", "R@1", "R@5", "R@10", "candidate_recall",
            "ms_per_query", "R@10_vs_fine_grained", "time_vs_fine_grained"]
    head = "| " + " | ".join(c.replace("_", " ") for c in cols) + " |"
    lines = [head, "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            cells.append("–" if v is None else f"{v:.3f}" if c == "ms_per_query" else f"{v:.1f}"
                         if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
