"""The protocol on score matrices from any model (re-rankers such as BLIP-2's ITM, which give no
embeddings): ``evaluate_scores(S, caption_image, ...)``, the same ranks, tie rule and names as
``evaluate``. ``S`` is images x captions (higher = better); ``T`` captions x images when the model is
not symmetric (BLIP's i2t and t2i matrices are re-ranked separately), else ``S`` transposed.

Memory: ``S`` and ``T`` may be memory-mapped (``np.load(path, mmap_mode="r")``); they are read in
blocks of rows (and, for ``S`` transposed, blocks of columns), never whole.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from pipeline.evaluation.extended import DEFAULT_P_KS
from pipeline.evaluation.protocol import evaluate_blocks

__all__ = ["evaluate_scores"]


def _block_dtype(m) -> np.dtype:
    """float64 stays float64 (the exact slow path); every other dtype is ranked as float32."""
    return np.dtype(np.float64) if np.dtype(m.dtype) == np.float64 else np.dtype(np.float32)


def check_matrices(scores, scores_t2i, num_captions: int) -> None:
    """One line naming the problem: shapes that do not fit each other or the caption map."""
    if getattr(scores, "ndim", 0) != 2:
        raise ValueError(f"scores must be a 2-D images x captions matrix, got shape {getattr(scores, 'shape', None)}")
    if scores.shape[1] != num_captions:
        raise ValueError(f"scores has {scores.shape[1]} columns but caption_image has {num_captions} captions: "
                         "S must be images x captions")
    if scores_t2i is not None and tuple(scores_t2i.shape) != (scores.shape[1], scores.shape[0]):
        raise ValueError(f"scores_t2i must be captions x images {(scores.shape[1], scores.shape[0])}, "
                         f"got {tuple(scores_t2i.shape)}")
    for name, m in (("scores", scores), ("scores_t2i", scores_t2i)):
        if m is not None and not (np.issubdtype(m.dtype, np.floating) or np.issubdtype(m.dtype, np.integer)):
            raise ValueError(f"{name} must hold numbers, got dtype {m.dtype}")


def _copy(block, dtype) -> torch.Tensor:
    """A private, writable copy: the ranking edits blocks in place (-0.0 -> +0.0), and a memory map is
    read-only (writing through a view of it would crash the process)."""
    return torch.from_numpy(np.array(block, dtype=dtype, order="C", copy=True))


def score_blocks(scores, scores_t2i=None):
    """``(score_i2t(a, b), score_t2i(a, b))`` reading row blocks of ``S`` / ``T`` (or column blocks of ``S``)."""
    dt_s = _block_dtype(scores)

    def i2t(a: int, b: int) -> torch.Tensor:
        return _copy(scores[a:b], dt_s)

    if scores_t2i is not None:
        dt_t = _block_dtype(scores_t2i)

        def t2i(a: int, b: int) -> torch.Tensor:
            return _copy(scores_t2i[a:b], dt_t)
    else:
        def t2i(a: int, b: int) -> torch.Tensor:
            return _copy(scores[:, a:b].T, dt_s)
    return i2t, t2i


@torch.no_grad()
def evaluate_scores(scores, caption_image, image_labels=None, scores_t2i=None, ks: Iterable[int] = (1, 5, 10),
                    map_ks: Iterable[int | None] = (10, 100, None), all_metrics: bool = False,
                    p_ks: Iterable[int] = DEFAULT_P_KS, chunk_size: int | None = None,
                    num_threads: int | None = None, curves: bool = False):
    """:func:`pipeline.metrics.evaluate` on a score matrix ``scores`` ``[N images, M captions]`` (numpy
    array or memory map; higher = better) and optionally ``scores_t2i`` ``[M, N]``. The hamming-only
    names (``[ties]``, ``P@H2``) are never computed from scores."""
    caption_image = np.asarray(caption_image).reshape(-1)
    check_matrices(scores, scores_t2i, caption_image.size)
    i2t, t2i = score_blocks(scores, scores_t2i)
    return evaluate_blocks(i2t, t2i, scores.shape[0], caption_image, image_labels, ks=ks, map_ks=map_ks,
                           chunk_size=chunk_size, num_threads=num_threads, all_metrics=all_metrics, p_ks=p_ks,
                           curves=curves)
