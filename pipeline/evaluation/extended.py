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

from pipeline.evaluation.conventions import dadh_ap, extra_map_ks, hit_positions, precision_at, ucch_mean
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

    def block(self, s, rel, rel_sorted, best, tied_pos, hist=None) -> dict:
        """Values of queries ``s.shape[0]`` (numpy): ``s`` scores, ``rel`` bool relevance (or None),
        ``rel_sorted`` uint8 relevance in ranked order (or None), ``best`` the best positive's score,
        ``tied_pos`` the positives scoring exactly ``best``, ``hist`` (hamming, when the ranking made
        them) the items and relevant items per distance. Thread-safe: returns, never stores.

        Per block only what needs the items (the ranked relevance); the tie expectations work on the
        per-query histograms, once for all queries in :meth:`names` (loops over groups, not items)."""
        out, scalars = {}, self.opts.scalars
        if self.labels and rel_sorted is not None:
            hits = hit_positions(rel_sorted)
            if scalars:
                for k, v in dadh_ap(rel_sorted, self.map_ks, hits).items():
                    out[f"q:dadh{k}"] = v
                for k, v in precision_at(rel_sorted, self.p_ks).items():
                    out[f"q:p{k}"] = v
            if self.opts.curves:
                segments = np.add.reduceat(rel_sorted, np.concatenate([[0], self.grid[:-1]]), axis=1, dtype=np.int64)
                out["s:pk"] = (np.cumsum(segments, axis=1) / self.grid).sum(0)
                out["s:pr11"], out["s:pr11_queries"] = pr11_sums(rel_sorted, hits)
        if self.bits is not None and (scalars or (self.labels and self.opts.curves)):
            if hist is None and self.labels:
                hist = distance_histograms(s, rel, self.bits)
            bd = (-best).astype(np.int64)
            if hist is not None:
                rows = np.arange(s.shape[0])
                out["q:before"] = (np.cumsum(hist[0], axis=1) - hist[0])[rows, bd]
                out["q:tied"] = hist[0][rows, bd]
                out["q:count"], out["q:relevant"] = hist
            else:  # no labels: two counting passes
                out["q:before"] = np.count_nonzero(s > best[:, None], axis=1)
                out["q:tied"] = np.count_nonzero(s == best[:, None], axis=1)
            out["q:tied_pos"] = np.asarray(tied_pos)
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
        out, hamming = {}, self.bits is not None
        if self.labels:
            for k in self.map_ks:
                out[f"{prefix}_mAP@{_name_k(k)}[ucch]"] = ucch_mean(aps[self.n if k is None else k])
            for k in self.map_ks:
                out[f"{prefix}_mAP@{_name_k(k)}[dadh]"] = float(self._q(f"q:dadh{self.n if k is None else k}").mean())
        if hamming and self.labels:
            count, relevant = self._q("q:count"), self._q("q:relevant")
            for k in self.map_ks:
                ap = expected_ap(count, relevant, self.n if k is None else k)
                out[f"{prefix}_mAP@{_name_k(k)}[ties]"] = float(ap.mean())
        if hamming:
            before, tied, tied_pos = self._q("q:before"), self._q("q:tied"), self._q("q:tied_pos")
            for k in self.r_ks:
                out[f"{prefix}_R@{k}[ties]"] = 100.0 * float(expected_recall(before, tied, tied_pos, k).mean())
        if self.labels:
            for k in self.p_ks:
                out[f"{prefix}_P@{k}"] = float(self._q(f"q:p{k}").mean())
        if hamming and self.labels:
            precision, recall = radius_lookup(count, relevant, 2)
            out[f"{prefix}_P@H2"], out[f"{prefix}_R@H2"] = float(precision.mean()), float(recall.mean())
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
            out["radius_pr"] = radius_pr(self._q("q:count").sum(0), self._q("q:relevant").sum(0))
        return out
