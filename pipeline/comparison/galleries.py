"""Galleries larger than the test split, for query-time and hybrid measurements.

`ItemSource` streams one side's gallery in blocks: the test items repeated (`duplicated`, the paper's
method) or distinct items drawn from a Gaussian fitted to the model's test outputs. `build_gallery`
puts the test split among such distractors at random positions, with a fine-grained embedding and a
code per item that belong together (one joint Gaussian over both models' outputs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.cli import progress_bar
from pipeline.evaluation.scores import as_tensor, pack_codes
from pipeline.inference.encoding import EncodedSplit


class GaussianSampler:
    """Draws rows from a Gaussian fitted to ``features`` [n, F] (mean, full covariance), in
    seeded blocks, so that the same (seed, block) always gives the same rows."""

    def __init__(self, features: np.ndarray, block: int = 1 << 16):
        x = np.asarray(features, dtype=np.float64)
        self.mean = x.mean(0)
        cov = np.cov(x, rowvar=False) if x.shape[0] > 1 else np.eye(x.shape[1])
        cov = np.atleast_2d(cov)
        # a small ridge: n may be < F (few test items), the covariance is then singular
        cov += np.eye(cov.shape[0]) * (1e-6 + 1e-3 * np.trace(cov) / cov.shape[0])
        self.chol = torch.from_numpy(np.linalg.cholesky(cov).T.astype(np.float32))
        self.mean_t = torch.from_numpy(self.mean.astype(np.float32))
        self.block = block

    def sample(self, n: int, seed: int) -> torch.Tensor:
        out = torch.empty(n, self.chol.shape[0])
        for b, a in enumerate(range(0, n, self.block)):
            m = min(self.block, n - a)
            eps = torch.randn(m, self.chol.shape[0], generator=torch.Generator().manual_seed(seed * 1_000_003 + b))
            out[a:a + m] = eps @ self.chol + self.mean_t
        return out


@dataclass
class Gallery:
    """One side's gallery: fine-grained embeddings (normalised), codes per screener, owners."""

    feats: torch.Tensor  # [G, D] float32
    codes: dict  # screener name -> packed uint8 [G, bytes]
    owner: np.ndarray  # [G] the test image each item belongs to, -1 for distractors
    num_test: int


def build_gallery(test_feats, test_owner, size: int, seed: int = 0, run_codes: dict | None = None,
                  derived: Sequence = (), side: str = "image", progress: bool = False) -> Gallery:
    """The test items of one side plus ``size - n`` distractors, at random positions.

    ``test_feats`` [n, D] fine-grained embeddings; ``test_owner`` [n] their image index;
    ``run_codes``: screener name -> (continuous [n, bits], packed codes [n, bytes]) of hashing
    runs (sampled jointly with the embeddings); ``derived``: screeners with ``.codes(feats,
    side)`` (distilled, simhash) applied to every item's embedding."""
    feats = F.normalize(as_tensor(test_feats).float(), dim=1)
    n, d = feats.shape
    size = max(size, n)
    run_codes = run_codes or {}
    rng = np.random.default_rng(seed)
    pos = np.sort(rng.choice(size, n, replace=False)) if size > n else np.arange(n)
    perm = rng.permutation(n)  # which test item goes to which of the chosen positions
    is_test = np.zeros(size, dtype=bool)
    is_test[pos] = True
    owner = np.full(size, -1, dtype=np.int64)
    owner[pos] = np.asarray(test_owner)[perm]
    all_feats = torch.empty(size, d)
    all_feats[pos] = feats[perm]
    codes = {}
    conts = [(name, np.asarray(c, dtype=np.float32), np.asarray(p)) for name, (c, p) in run_codes.items()]
    for name, _, packed in conts:
        codes[name] = np.zeros((size, packed.shape[1]), dtype=np.uint8)
        codes[name][pos] = packed[perm]
    if size > n:
        joint = np.concatenate([feats.numpy()] + [c for _, c, _ in conts], axis=1)
        sampler = GaussianSampler(joint)
        rest = np.flatnonzero(~is_test)
        bar = progress_bar(len(rest), f"distractors ({side})", progress, "item")
        for b, a in enumerate(range(0, len(rest), sampler.block)):
            rows = rest[a:a + sampler.block]
            x = sampler.sample(len(rows), seed * 7919 + b + (0 if side == "image" else 104_729))
            all_feats[rows] = F.normalize(x[:, :d], dim=1)
            col = d
            for name, c, _ in conts:
                codes[name][rows] = pack_codes(x[:, col:col + c.shape[1]], zero_one=False).numpy()
                col += c.shape[1]
            bar.update(len(rows))
        bar.close()
    for screener in derived:
        codes[screener.name] = screener.codes(all_feats, side)
    return Gallery(all_feats, codes, owner, n)


class ItemSource:
    """Gallery (or query) items of one side of one model, produced in blocks.

    ``duplicated``: the test items repeated (row i is test item i mod n), the paper's method;
    ``distinct``: rows drawn from a Gaussian fitted to the model's continuous test outputs of
    this side, re-normalised (embeddings) or signed and packed (codes); block b of the
    stream always gets the same seed, so a gallery is the same whichever block size reads it.
    """

    BLOCK = 1 << 16  # generation granularity (rows per seed)

    def __init__(self, enc: EncodedSplit, side: str, kind: str, hashed: bool, seed: int = 0):
        self.kind, self.hashed, self.seed = kind, hashed, seed
        self.test = np.ascontiguousarray(enc.image_gallery if side == "image" else enc.text_gallery)
        cont = enc.image if side == "image" else enc.text
        self.sampler = GaussianSampler(cont, block=self.BLOCK) if kind == "distinct" else None
        self.side_seed = 0 if side == "image" else 1
        self._cached = (None, None)  # (block number, its rows): streamed reads come in small sequential pieces

    @property
    def item_bytes(self) -> int:
        return self.test.shape[1] * self.test.itemsize

    def rows(self, a: int, b: int) -> np.ndarray:
        if self.kind == "duplicated":
            return self.test[np.arange(a, b) % len(self.test)]
        out = []
        for blk in range(a // self.BLOCK, (b - 1) // self.BLOCK + 1):
            lo, hi = blk * self.BLOCK, (blk + 1) * self.BLOCK
            out.append(self._block(blk)[max(a, lo) - lo:min(b, hi) - lo])
        return np.concatenate(out)

    def _block(self, blk: int) -> np.ndarray:
        if self._cached[0] != blk:
            x = self.sampler.sample(self.BLOCK, self.seed * 1_000_003 + blk * 2 + self.side_seed)
            rows = pack_codes(x, zero_one=False).numpy() if self.hashed else F.normalize(x, dim=1).numpy()
            self._cached = (blk, rows)
        return self._cached[1]
