"""`--all`: every published convention beside today's names, for one direction (docs/protocol.md,
"Other conventions"). The ranking code hands each block of queries here (scores, relevance, the
ranked relevance); this keeps per-query values and sums, and names their means at the end.

Names (each prefixed ``i2t_`` / ``t2i_``; a K larger than the gallery is dropped, never renamed):
    mAP@k[ucch], mAP@k[dadh]   k in map_ks and 50 (N = the whole gallery)       labels
    P@K                        K in p_ks                                          labels
    mAP@k[ties], R@K[ties]     hamming only; R@K[ties] for K in ks               (mAP: labels)
    P@H2, R@H2                 hamming only                                       labels
Curves (``curves()``): P@K over K, 11-point interpolated PR, and for hamming the pooled PR by radius.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.evaluation.conventions import dadh_ap, extra_map_ks, precision_at, ucch_mean
from pipeline.evaluation.curves import pk_grid, pr11_sums
from pipeline.evaluation.ties import distance_histograms, expected_ap, expected_recall, radius_lookup, radius_pr

DEFAULT_P_KS = (1, 10, 100, 1000)


@dataclass
class ExtraOptions:
    """What `--all` adds: ``map_ks`` / ``ks`` as in ``evaluate``, ``p_ks`` the K of P@K."""
    map_ks: tuple = (10, 100, None)
    ks: tuple = (1, 5, 10)
    p_ks: tuple = DEFAULT_P_KS
    curves: bool = True
    scalars: bool = True  # False: only the curves (a training run's test end)


def _name_k(k) -> str:
    return "N" if k is None else str(int(k))


@dataclass
class ExtraStats:
    """Per-query values of one direction: ``n`` gallery items, ``bits`` the code length for hamming
    scores (else None), ``labels`` whether relevance is known."""
    n: int
    bits: int | None
    labels: bool
    opts: ExtraOptions
    per_query: dict = field(default_factory=dict)
    sums: dict = field(default_factory=dict)

    def __post_init__(self):
        self.map_ks = extra_map_ks(self.opts.map_ks, self.n)
        self.p_ks = [int(k) for k in dict.fromkeys(self.opts.p_ks) if 0 < int(k) <= self.n]
        self.r_ks = [int(k) for k in dict.fromkeys(self.opts.ks) if 0 < int(k) <= self.n]
        self.grid = pk_grid(self.n)

    def ap_ks(self) -> list[int]:
        """The k whose today's AP@k the ranking must compute for ``[ucch]`` (effective, <= n)."""
        return [self.n if k is None else k for k in self.map_ks] if self.labels and self.opts.scalars else []

    def block(self, s, rel, rel_sorted, best, tied_pos) -> dict:
        """Values of queries ``s.shape[0]`` (numpy): ``s`` scores, ``rel`` bool relevance (or None),
        ``rel_sorted`` uint8 relevance in ranked order (or None), ``best`` the best positive's score,
        ``tied_pos`` the positives scoring exactly ``best``. Thread-safe: returns, never stores."""
        out, scalars = {}, self.opts.scalars
        if self.labels and rel_sorted is not None:
            for k, v in (dadh_ap(rel_sorted, self.map_ks) if scalars else {}).items():
                out[f"q:dadh{k}"] = v
            for k, v in (precision_at(rel_sorted, self.p_ks) if scalars else {}).items():
                out[f"q:p{k}"] = v
            if self.opts.curves:
                hits = np.cumsum(rel_sorted, axis=1, dtype=np.int64)[:, self.grid - 1]
                out["s:pk"] = (hits / self.grid).sum(0)
                out["s:pr11"], out["s:pr11_queries"] = pr11_sums(rel_sorted)
        if self.bits is not None and (scalars or (self.labels and self.opts.curves)):
            bv = best[:, None]
            before = np.count_nonzero(s > bv, axis=1)
            tied = np.count_nonzero(s == bv, axis=1)
            for k in self.r_ks if scalars else ():
                out[f"q:ties_r{k}"] = expected_recall(before, tied, tied_pos, k)
            if self.labels:
                count, relevant = distance_histograms(s, rel, self.bits)
                for k in self.map_ks if scalars else ():
                    out[f"q:ties_ap{k}"] = expected_ap(count, relevant, self.n if k is None else k)
                if scalars:
                    out["q:ph2"], out["q:rh2"] = radius_lookup(count, relevant, 2)
                out["s:hist_count"], out["s:hist_rel"] = count.sum(0), relevant.sum(0)
        return out

    def add(self, part: dict) -> None:
        for key, value in part.items():
            if key.startswith("q:"):
                self.per_query.setdefault(key, []).append(value)
            else:
                self.sums[key] = self.sums.get(key, 0) + value

    def _q(self, key) -> np.ndarray:
        return np.concatenate(self.per_query[key])

    def names(self, prefix: str, aps: dict) -> dict[str, float]:
        """The scalars, named; ``aps``: {effective k: today's AP@k per query} from the ranking."""
        out = {}
        if self.labels:
            for k in self.map_ks:
                out[f"{prefix}_mAP@{_name_k(k)}[ucch]"] = ucch_mean(aps[self.n if k is None else k])
            for k in self.map_ks:
                out[f"{prefix}_mAP@{_name_k(k)}[dadh]"] = float(self._q(f"q:dadh{self.n if k is None else k}").mean())
        if self.bits is not None and self.labels:
            for k in self.map_ks:
                out[f"{prefix}_mAP@{_name_k(k)}[ties]"] = float(self._q(f"q:ties_ap{k}").mean())
        if self.bits is not None:
            for k in self.r_ks:
                out[f"{prefix}_R@{k}[ties]"] = 100.0 * float(self._q(f"q:ties_r{k}").mean())
        if self.labels:
            for k in self.p_ks:
                out[f"{prefix}_P@{k}"] = float(self._q(f"q:p{k}").mean())
        if self.bits is not None and self.labels:
            out[f"{prefix}_P@H2"] = float(self._q("q:ph2").mean())
            out[f"{prefix}_R@H2"] = float(self._q("q:rh2").mean())
        return out

    def curves(self, num_queries: int) -> dict:
        """P@K over K (mean over all queries), PR11 (mean over queries with a relevant item), and for
        hamming the pooled PR by radius; empty without labels."""
        if not self.labels or "s:pk" not in self.sums:
            return {}
        n_rel = int(self.sums["s:pr11_queries"])
        out = {"p_at_k": {"k": self.grid.tolist(), "precision": (self.sums["s:pk"] / num_queries).tolist()},
               "pr11": {"recall": [i / 10 for i in range(11)],
                        "precision": (self.sums["s:pr11"] / max(n_rel, 1)).tolist()}}
        if self.bits is not None:
            out["radius_pr"] = radius_pr(self.sums["s:hist_count"], self.sums["s:hist_rel"])
        return out
