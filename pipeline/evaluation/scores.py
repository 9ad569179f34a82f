"""Scoring: bit packing, similarity blocks, and the tie rule as integer sort keys.

Nothing here knows about models or data. ``protocol`` builds the FiCo-ITR
evaluation on these primitives, ``exhaustive`` the chunked top-k search.

Conventions
-----------
* A higher score is better. Measures: ``cosine``, ``inner_product``,
  ``euclidean`` (score ``1 / (1 + d)``) and ``hamming`` (score = minus the
  Hamming distance, an exact ``int32``).
* Float scores are computed in float32 (float64 when an input is float64);
  fp16/bf16 inputs are upcast, so results do not depend on the input precision.
* Tie rule, used everywhere (here, in ``protocol`` and ``exhaustive``): gallery items
  are ordered by score descending, equal scores by gallery index ascending.
* Hash codes are packed MSB-first, 8 bits per ``uint8`` byte (the layout of
  ``np.packbits`` and of faiss binary indexes). A ``uint8`` input to a hamming
  function always means *packed bytes*; give unpacked 0/1 codes as bool or
  float.

CPU versus GPU
--------------
Float scores come from one torch matmul on the inputs' device. Hamming scores
come from XOR + hardware popcount (``np.bitwise_count``) on 64-bit words on
CPU, and from a ±1 matmul elsewhere (torch has no popcount); both are exact.
The per-element work that follows (order keys, selection, sorting) runs on
numpy arrays that share memory with the CPU tensors, and in torch elsewhere:
on this kind of CPU, numpy's AVX-512 sorts and single-threaded elementwise ops
are 3-10x faster than torch's CPU kernels (whose OpenMP threads stall when
another process holds a core), while on CUDA torch is the natural fast path.
Both paths compute the same keys, so they return identical results (float
scores may differ in the last bit between devices or block shapes, as BLAS
rounds differently; exact ties are always resolved by index).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["MEASURES", "as_tensor", "pack_codes", "unpack_codes", "prepare", "score_chunk", "score_prepared",
           "score_dtype", "order_key32", "pack_keys", "default_chunk_size"]

MEASURES = ("cosine", "inner_product", "euclidean", "hamming")
_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # MSB first, like np.packbits


# --------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------
def as_tensor(x, device=None) -> torch.Tensor:
    """Tensor view of ``x`` (numpy arrays are shared, not copied)."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t if device is None else t.to(device)


def default_chunk_size(device: torch.device) -> int:
    """Score elements per block: 8 MB of fp32 scores on CPU, 128 MB on a GPU.

    On CPU the ranking works on L2-sized sub-blocks, so a bigger block only
    feeds the matmul (83 x 25,000 rows are plenty). The GPU path keeps sort
    keys, sort indices and float64 precisions of a block alive at once
    (~40 bytes per element, ~1.5 GB at 2**25).
    """
    return 1 << 21 if torch.device(device).type == "cpu" else 1 << 25


def check_measure(measure: str) -> None:
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; expected one of {MEASURES}")


# --------------------------------------------------------------------------
# bit packing
# --------------------------------------------------------------------------
def pack_codes(codes, zero_one: bool | None = None) -> torch.Tensor:
    """Pack hash codes ``[n, bits]`` into ``uint8`` bytes ``[n, ceil(bits / 8)]``.

    Accepted codes: bool, 0/1, ±1 or real values (e.g. tanh outputs). A bit is 1
    where the code is positive, i.e. the sign, with exactly 0 mapped to +1
    (bit 1), so ``torch.sign`` outputs that contain 0 still pack. Codes whose
    values all lie in {0, 1} are read as 0/1 bits instead (0 -> bit 0); force
    one reading with ``zero_one=True/False``. The last byte is padded with 0
    bits, which never changes a Hamming distance between codes of equal length.
    """
    x = as_tensor(codes)
    if x.ndim != 2:
        raise ValueError(f"codes must be [n, bits], got shape {tuple(x.shape)}")
    if x.dtype == torch.bool:
        bits = x
    else:
        if zero_one is None:
            zero_one = bool(((x == 0) | (x == 1)).all())
        bits = x != 0 if zero_one else x >= 0
    n, nbits = bits.shape
    pad = (-nbits) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(n, pad)], dim=1)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=x.device)
    grouped = bits.reshape(n, -1, 8).to(torch.uint8) * weights
    return grouped.sum(dim=2, dtype=torch.uint8)


def unpack_codes(packed, bits: int | None = None, signed: bool = True,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[n, bits]`` of ±1 (``signed``) or 0/1."""
    p = as_tensor(packed)
    if p.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {p.dtype}")
    bits = p.shape[1] * 8 if bits is None else bits
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=p.device)
    out = ((p.unsqueeze(-1) >> shifts) & 1).reshape(p.shape[0], -1)[:, :bits]
    out = out.to(dtype)
    return out * 2 - 1 if signed else out


def as_packed(codes) -> torch.Tensor:
    x = as_tensor(codes)
    return x if x.dtype == torch.uint8 else pack_codes(x)


# --------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------
def float_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def prepare(x, measure: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-item preprocessing done once per side, before scoring blocks.

    cosine: L2-normalised rows (a zero row stays zero and scores 0 with every
    item, where fico_itr would give NaN). hamming: packed bytes, zero-padded to
    whole 64-bit words (padding bits are equal on both sides: distances do not
    change).
    """
    check_measure(measure)
    t = as_tensor(x)
    if measure == "hamming":
        packed = as_packed(t)
        pad = (-packed.shape[1]) % 8
        if pad:
            packed = torch.cat([packed, packed.new_zeros(packed.shape[0], pad)], dim=1)
        return packed.contiguous()
    t = t.to(dtype or float_dtype(t))
    if measure == "cosine":
        t = torch.nn.functional.normalize(t, dim=1)
    return t


def score_dtype(q: torch.Tensor, g: torch.Tensor, measure: str) -> torch.dtype:
    """dtype of :func:`score_prepared`'s result for these prepared sides."""
    return torch.int32 if measure == "hamming" else float_dtype(q, g)


def score_prepared(q: torch.Tensor, g: torch.Tensor, measure: str,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Scores ``[len(q), len(g)]`` of sides already passed through :func:`prepare`.

    ``out`` (contiguous, dtype :func:`score_dtype`) receives the scores: callers
    that score many blocks reuse one buffer, because fresh 16 MB blocks
    fragment the C heap (+200 MB RSS over a COCO evaluation on CPU).
    """
    if measure == "hamming":
        if q.shape[1] != g.shape[1]:
            raise ValueError(f"code lengths differ: {q.shape[1]} vs {g.shape[1]} bytes")
        if q.device.type == "cpu":
            res = None if out is None else out.numpy()
            return torch.from_numpy(_hamming_popcount(q.numpy(), g.numpy(), res))
        return _hamming_matmul(q, g, out)
    if q.dtype != g.dtype:
        dt = float_dtype(q, g)
        q, g = q.to(dt), g.to(dt)
    if measure in ("cosine", "inner_product"):
        return torch.mm(q, g.T, out=out)
    if measure == "euclidean":
        # |q|^2 + |g|^2 - 2 q.g, then 1 / (1 + sqrt(max(., 0))), in place
        norms = (q * q).sum(1, keepdim=True) + (g * g).sum(1)
        d = torch.addmm(norms, q, g.T, alpha=-2.0, out=out)
        return d.clamp_min_(0).sqrt_().add_(1.0).reciprocal_()
    raise ValueError(f"unknown measure {measure!r}")


# Hamming kernels. Measured on this 2-core AVX-512 CPU, 1000 x 25000 64-bit codes
# (benchmarks/bench_metrics.py --kernels): XOR + np.bitwise_count (hardware
# POPCNT) ~75 ms; ±1 float32 matmul ~140 ms for the matmul alone, ~350-400 ms
# with the conversion back to int32; 256-entry lookup table ~4 s; SWAR
# bit tricks in torch ~2 s. torch has no popcount, so other devices use the
# matmul, which GPUs run fast and exactly.
_POPCOUNT_BLOCK = 1 << 18  # XOR temporaries per step (uint64): stays in L2


def _hamming_popcount(q: np.ndarray, g: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """int32 ``-distance`` of packed codes (bytes a multiple of 8) via XOR + popcount."""
    qw, gw = q.view(np.uint64), g.view(np.uint64)
    if out is None:
        out = np.empty((qw.shape[0], gw.shape[0]), dtype=np.int32)
    words = qw.shape[1]
    rows = max(1, _POPCOUNT_BLOCK // max(1, gw.shape[0] * words))
    for a in range(0, qw.shape[0], rows):
        x = np.bitwise_xor(qw[a:a + rows, None, :], gw[None, :, :])
        counts = np.bitwise_count(x)
        if words == 1:
            np.negative(counts[..., 0], out=out[a:a + rows], dtype=np.int32)
        else:
            np.negative(counts.sum(axis=2, dtype=np.int32), out=out[a:a + rows])
    return out


def _hamming_matmul(q: torch.Tensor, g: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """int32 ``-distance`` from ±1 codes: ``dot = bits - 2 * distance``, exact in float32."""
    qs, gs = unpack_codes(q), unpack_codes(g)
    dot = qs @ gs.T
    # an exact small integer; round() guards TF32/bf16 matmul modes anyway
    neg_d = ((dot - qs.shape[1]) * 0.5).round_()
    return neg_d.to(torch.int32) if out is None else out.copy_(neg_d)


def score_chunk(queries, gallery, measure: str = "cosine") -> torch.Tensor:
    """Scores ``[n_queries, n_gallery]``; higher is better.

    For ``hamming`` the inputs are packed ``uint8`` codes or bool/0-1/±1 codes
    (see :func:`pack_codes`) and the result is ``int32`` minus the Hamming
    distance. Everything runs on the inputs' device.
    """
    q, g = as_tensor(queries), as_tensor(gallery)
    if measure != "hamming":
        dt = float_dtype(q, g)
        q, g = q.to(dt), g.to(dt)
    return score_prepared(prepare(q, measure), prepare(g, measure), measure)


# --------------------------------------------------------------------------
# order keys: the tie rule as integers
# --------------------------------------------------------------------------
def order_key32(scores, out=None):
    """int32 keys whose ascending order is the score order, best first.

    Exact and order-preserving (equal scores give equal keys). Floats use the
    IEEE-754 bit pattern: non-negative floats order like their bits, negative
    ones reversed; -0.0 is mapped to +0.0 first. Integer scores (hamming) are
    bit-inverted (``~s == -s - 1``). Works on numpy arrays and torch tensors;
    ``out`` (numpy only) receives the keys.
    """
    if str(scores.dtype).endswith("int32"):
        return np.invert(scores, out=out) if isinstance(scores, np.ndarray) else ~scores
    if isinstance(scores, np.ndarray):
        if scores.dtype != np.float32:
            raise TypeError(f"order_key32 needs 32-bit scores, got {scores.dtype}")
        return float_bits_key(canonical_zero(scores.copy()).view(np.int32), out)
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    if scores.dtype != torch.float32:
        raise TypeError(f"order_key32 needs 32-bit scores, got {scores.dtype}")
    return float_bits_key((scores + 0.0).view(torch.int32))


def canonical_zero(scores):
    """Turn -0.0 into +0.0 in place (they are equal scores, but differ in bits)."""
    if isinstance(scores, np.ndarray):
        return np.add(scores, scores.dtype.type(0.0), out=scores)
    return scores.add_(0.0)


def float_bits_key(bits, out=None):
    """:func:`order_key32` of float32 scores given as their int32 bit patterns.

    x >= 0: key = ~bits (a bigger float gets a smaller key); x < 0: key =
    bits ^ INT32_MIN (a more negative float gets a bigger key). Four passes,
    in place in ``out`` when given (numpy).
    """
    if isinstance(bits, np.ndarray):
        key = np.right_shift(bits, 31, out=out)
        np.bitwise_and(key, 0x7FFFFFFF, out=key)
        np.bitwise_xor(key, -1, out=key)
        return np.bitwise_xor(key, bits, out=key)
    return bits ^ (((bits >> 31) & 0x7FFFFFFF) ^ -1)


def pack_keys(key32, low32):
    """int64 key ``(key32 << 32) | low32`` for unique, payload-carrying sort keys.

    ``low32`` (non-negative, < 2**31) orders equal scores and comes back from the
    low 32 bits after sorting. Built by writing the two int32 halves of each
    little-endian int64, which is cheaper than shift-and-or passes.
    """
    if isinstance(key32, np.ndarray):
        out = np.empty(key32.shape + (2,), dtype=np.int32)
        out[..., 0] = low32
        out[..., 1] = key32
        return out.view(np.int64)[..., 0]
    return (key32.to(torch.int64) << 32) | low32


def low32(keys):
    """The payload of :func:`pack_keys` keys."""
    if isinstance(keys, np.ndarray):
        return keys.view(np.int32)[..., 0::2] if keys.ndim else keys & 0xFFFFFFFF
    return keys & 0xFFFFFFFF
