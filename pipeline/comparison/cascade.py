"""Nested codes as screeners. A run whose first 16, 32, 64 bits are codes of their own screens with any
of its prefixes, or in two levels: the gallery's top factor x K by the short prefix (the cheap pass over
every item), then the top K of those by a longer prefix, before the fine-grained re-rank.

A prefix of a packed code is its first bits / 8 bytes (MSB first; what the run's
`gallery_features(x, bits)` gives), so every view here slices the run's full codes: one gallery of codes,
distractors included, serves all of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.evaluation.hamming import hamming_topk


def hamming_rerank(q_codes, g_codes, candidates, k: int):
    """The `k` best of each query's `candidates` [nq, K] (gallery indices, no repeats) by Hamming distance of
    the packed codes: ``(scores int32 = -distance, indices int64)``, ties by gallery index (the tie rule)."""
    q, g = np.asarray(q_codes, dtype=np.uint8), np.asarray(g_codes, dtype=np.uint8)
    cand = np.sort(np.asarray(candidates, dtype=np.int64), axis=1)  # index order, then a stable sort by distance
    dist = np.bitwise_count(g[cand] ^ q[:, None, :]).sum(axis=2, dtype=np.int32)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return torch.from_numpy(-np.take_along_axis(dist, order, 1)), torch.from_numpy(np.take_along_axis(cand, order, 1))


@dataclass
class PrefixScreen:
    """A screen over the codes of the hashing run screened as `base`: its first `bits` bits, or with `then`,
    the two-level cascade (top factor x K by the first `bits`, then the top K of those by the first `then`)."""

    base: str
    bits: int
    then: int | None = None
    factor: int = 10

    @property
    def name(self) -> str:
        return f"{self.base}@{self.bits}" + (f">{self.then}" if self.then else "")

    def topk(self, q_codes, g_codes, k: int):
        """``(scores, indices)`` of the top `k` as ``hamming_topk`` returns them, from the base's full codes."""
        first = self.bits // 8
        if self.then is None:
            return hamming_topk(np.ascontiguousarray(q_codes[:, :first]), np.ascontiguousarray(g_codes[:, :first]), k)
        wide = min(len(g_codes), self.factor * k)
        _, cand = hamming_topk(np.ascontiguousarray(q_codes[:, :first]), np.ascontiguousarray(g_codes[:, :first]),
                               wide)
        return hamming_rerank(q_codes[:, :self.then // 8], g_codes[:, :self.then // 8], cand.numpy(), k)


def nested_screens(name: str, prefixes, factor: int = 10) -> dict[str, PrefixScreen]:
    """Every prefix of the nested run screened as `name` alone, and the cascade from its shortest prefix
    to its longest (16 then 64 bits for a 128-bit code with prefixes 16, 32, 64)."""
    prefixes = sorted(prefixes)
    screens = [PrefixScreen(name, bits) for bits in prefixes]
    if len(prefixes) > 1:
        screens.append(PrefixScreen(name, prefixes[0], prefixes[-1], factor))
    return {s.name: s for s in screens}
