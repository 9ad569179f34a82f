"""Exhaustive Hamming top-k over packed codes, at memory speed, with the project's tie rule.

``hamming_topk(queries, gallery, k)`` returns exactly what
``pipeline.evaluation.exhaustive.topk_search(queries, gallery, k, "hamming")`` returns (int32 minus the
distance, int64 gallery indices; ties by gallery index ascending), 10-50x faster on CPU.

Why a kernel. numpy needs three full passes per (query, item) pair (XOR, popcount, select),
each ~1-1.5 ns here, plus a selection over 64-bit keys; faiss ``IndexBinaryFlat`` is one fused
loop (~0.6 ns per pair on this machine's 2 cores) but orders ties arbitrarily. The kernel
below is one fused loop too: per query it keeps a candidate buffer and a distance threshold
``thr``; an item enters only when its distance is *below* ``thr`` (the gallery is scanned in
index order, so an item tying the current k-th best loses to it by index). When the buffer
holds more than 2k candidates it is cut back to the k best with a histogram over the
distances (0..bits), which keeps index order inside each distance, and ``thr`` becomes the
k-th best distance. The final list is a stable counting sort by distance: (distance, index)
order exactly, no comparison sort anywhere. Distances of 64 items at a time are computed
branch-free (the compiler vectorises XOR + popcount, AVX-512 VPOPCNTQ where present) and
only blocks whose minimum beats ``thr`` are looked at item by item.

Memory: the inputs, the [nq, k] outputs and per-thread candidate buffers of 2k + 64 entries
for each of up to 16 queries scanned together (fewer when k is large: ~12 MB per thread).

Build. The C source is compiled once per machine type (``cc -O3 -march=native``) into
``$FICO_CACHE_DIR`` (default ``~/.cache/fico_pipeline``, kept at mode 0700), keyed by the
source, the flags and the CPU's feature flags, so a shared home on a heterogeneous cluster
never loads a library built for another CPU; a library that is not the user's own, or that
others may write, is refused (it would run inside the process). Without a C compiler (or with ``FICO_HAMMING_BACKEND=torch``)
the same results come from ``topk_search``, just slower; ``backend()`` says which is in use.
Queries are split across threads (ctypes releases the GIL): ``num_threads`` defaults to
torch's intra-op thread count.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pipeline.evaluation.exhaustive import topk_search
from pipeline.evaluation.scores import as_tensor, prepare

__all__ = ["hamming_topk", "backend", "packed_words"]

log = logging.getLogger(__name__)

_C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SUB 64  /* items per branch-free distance block */

/* Cut the candidate buffer (in gallery-index order) to the k best by (distance, index) and
   return the new count; *thr becomes the k-th best distance (strict bound for later items). */
static int64_t compact(int32_t *cd, int64_t *ci, int64_t n, int64_t k, int32_t *hist, int32_t maxd,
                       int32_t *thr) {
    if (n <= k) return n;
    memset(hist, 0, sizeof(int32_t) * (size_t)(maxd + 1));
    for (int64_t j = 0; j < n; j++) hist[cd[j]]++;
    int64_t below = 0; int32_t t = 0;
    while (below + hist[t] < k) below += hist[t++];
    int64_t keep_t = k - below, m = 0;  /* all with d < t, and the first keep_t with d == t */
    for (int64_t j = 0; j < n; j++) {
        int32_t d = cd[j];
        if (d < t || (d == t && keep_t-- > 0)) { cd[m] = d; ci[m] = ci[j]; m++; }
    }
    *thr = t;
    return m;
}

/* Stable counting sort of n <= k candidates by distance into the output row. */
static void emit(const int32_t *cd, const int64_t *ci, int64_t n, int32_t *hist, int32_t maxd,
                 int32_t *od, int64_t *oi) {
    memset(hist, 0, sizeof(int32_t) * (size_t)(maxd + 2));
    for (int64_t j = 0; j < n; j++) hist[cd[j] + 1]++;
    for (int32_t d = 0; d <= maxd; d++) hist[d + 1] += hist[d];
    for (int64_t j = 0; j < n; j++) { int64_t p = hist[cd[j]]++; od[p] = -cd[j]; oi[p] = ci[j]; }
}

#define DIST_LOOP(EXPR)                                                            \
    for (int64_t j = 0; j < len; j++) { const uint64_t *gj = gb + j * W; dist[j] = (EXPR); }

/* queries [nq, W] x gallery [ng, W] (uint64 words); outputs [nq, k] sorted best first.
   Returns 0, or -1 when memory runs out. */
int hamming_topk(const uint64_t *q, const uint64_t *g, int64_t nq, int64_t ng, int64_t W, int64_t k,
                 int64_t QB, int32_t *out_d, int64_t *out_i) {
    const int32_t maxd = (int32_t)(64 * W);
    const int64_t GT = 4096;  /* gallery items per tile (stays in L1/L2 while QB <= 16 queries scan it) */
    if (QB < 1) QB = 1;
    if (QB > 16) QB = 16;
    const int64_t cap = 2 * k + SUB;
    int32_t *cd = malloc(sizeof(int32_t) * (size_t)(cap * QB));
    int64_t *ci = malloc(sizeof(int64_t) * (size_t)(cap * QB));
    int32_t *hist = malloc(sizeof(int32_t) * (size_t)(maxd + 2));
    if (!cd || !ci || !hist) { free(cd); free(ci); free(hist); return -1; }
    int32_t dist[SUB], thr[16]; int64_t cnt[16];
    for (int64_t q0 = 0; q0 < nq; q0 += QB) {
        int64_t qn = nq - q0 < QB ? nq - q0 : QB;
        for (int64_t a = 0; a < qn; a++) { thr[a] = maxd + 1; cnt[a] = 0; }
        for (int64_t t0 = 0; t0 < ng; t0 += GT) {
            int64_t tn = ng - t0 < GT ? ng - t0 : GT;
            for (int64_t a = 0; a < qn; a++) {
                const uint64_t *qa = q + (q0 + a) * W;
                int32_t *bd = cd + a * cap; int64_t *bi = ci + a * cap;
                for (int64_t s = 0; s < tn; s += SUB) {
                    const int64_t len = tn - s < SUB ? tn - s : SUB;
                    const uint64_t *gb = g + (t0 + s) * W;
                    if (W == 1) {
                        const uint64_t q0w = qa[0];
                        DIST_LOOP(__builtin_popcountll(q0w ^ gj[0]))
                    } else if (W == 2) {
                        const uint64_t q0w = qa[0], q1w = qa[1];
                        DIST_LOOP(__builtin_popcountll(q0w ^ gj[0]) + __builtin_popcountll(q1w ^ gj[1]))
                    } else {
                        for (int64_t j = 0; j < len; j++) {
                            const uint64_t *gj = gb + j * W; int32_t d = 0;
                            for (int64_t w = 0; w < W; w++) d += __builtin_popcountll(qa[w] ^ gj[w]);
                            dist[j] = d;
                        }
                    }
                    int32_t mn = maxd + 1;
                    for (int64_t j = 0; j < len; j++) mn = dist[j] < mn ? dist[j] : mn;
                    const int32_t th = thr[a];
                    if (mn >= th) continue;
                    int64_t c = cnt[a];
                    for (int64_t j = 0; j < len; j++)
                        if (dist[j] < th) { bd[c] = dist[j]; bi[c] = t0 + s + j; c++; }
                    if (c > 2 * k) c = compact(bd, bi, c, k, hist, maxd, &thr[a]);
                    cnt[a] = c;
                }
            }
        }
        for (int64_t a = 0; a < qn; a++) {
            int32_t *bd = cd + a * cap; int64_t *bi = ci + a * cap;
            int64_t c = compact(bd, bi, cnt[a], k, hist, maxd, &thr[a]);
            emit(bd, bi, c, hist, maxd, out_d + (q0 + a) * k, out_i + (q0 + a) * k);
        }
    }
    free(cd); free(ci); free(hist);
    return 0;
}

/* The ranking of `evaluate` for Hamming scores, without a comparison sort: per row of int32 scores
   -distance (0..maxd), a stable counting order (distance ascending, gallery index ascending: the tie
   rule) of the 0/1 relevance into rel_out, and the rank of the best positive (distance bd, index bi):
   #(d < bd) + #(d == bd, index < bi). hist and rel_hist ([rows, maxd + 1], may be NULL) receive the
   items and the relevant items per distance. aps ([rows, nk], may be NULL) receives AP@k for the
   ascending cut-offs ks (1..n): the mean over the hits within the top k of hits so far / position, 0
   without a hit. Returns 0, or -1 on a distance outside 0..maxd. */
int counting_order(const int32_t *negd, const uint8_t *rel, int64_t rows, int64_t n, int32_t maxd,
                   const int32_t *best_negd, const int64_t *best_idx, uint8_t *rel_out, int64_t *ranks,
                   int64_t *hist, int64_t *rel_hist, const int64_t *ks, int64_t nk, const double *inv,
                   double *aps) {
    int64_t start[65 * 8 + 2];
    if (maxd > 65 * 8) return -1;
    for (int64_t r = 0; r < rows; r++) {
        const int32_t *row = negd + r * n;
        const uint8_t *rr = rel + r * n;
        uint8_t *out = rel_out + r * n;
        memset(start, 0, sizeof(int64_t) * (size_t)(maxd + 2));
        for (int64_t j = 0; j < n; j++) {
            int32_t d = -row[j];
            if (d < 0 || d > maxd) return -1;
            start[d + 1]++;
        }
        if (hist) for (int32_t d = 0; d <= maxd; d++) hist[r * (maxd + 1) + d] = start[d + 1];
        for (int32_t d = 0; d <= maxd; d++) start[d + 1] += start[d];
        const int32_t bd = -best_negd[r];
        int64_t rank = start[bd];
        for (int64_t j = 0; j < best_idx[r]; j++) rank += (-row[j] == bd);
        ranks[r] = rank;
        for (int64_t j = 0; j < n; j++) out[start[-row[j]]++] = rr[j];
        if (rel_hist) {  /* the relevant items of each distance's segment of the ordered row */
            int64_t a = 0;
            for (int32_t d = 0; d <= maxd; d++) {
                int64_t c = 0;
                for (int64_t j = a; j < start[d]; j++) c += out[j];
                rel_hist[r * (maxd + 1) + d] = c;
                a = start[d];
            }
        }
        if (aps) {
            /* branch-free between cut-offs (relevance is unpredictable): inv[j] = 1 / (j + 1) */
            int64_t hits = 0, j = 0;
            double acc = 0.0;
            for (int64_t ki = 0; ki < nk; ki++) {
                for (; j < ks[ki]; j++) {
                    const int64_t h = out[j];
                    hits += h;
                    acc += (double)(h * hits) * inv[j];
                }
                aps[r * nk + ki] = hits ? acc / (double)hits : 0.0;
            }
        }
    }
    return 0;
}
"""

_lib = None
_lib_lock = threading.Lock()
_lib_error: str | None = None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    """The kernel's build folder, private to this user (mode 0700): a shared writable folder would let
    someone else's library run inside this process."""
    cache = Path(os.environ.get("FICO_CACHE_DIR", Path.home() / ".cache" / "fico_pipeline"))
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = cache.stat()
    if st.st_uid != os.getuid():
        raise RuntimeError(f"{cache} belongs to another user (uid {st.st_uid}): set FICO_CACHE_DIR to a folder of yours")
    if st.st_mode & 0o077:
        cache.chmod(0o700)  # ours, made before this rule (or by a umask): close it
    return cache


def _library_path() -> Path:
    """Where the kernel for this source, compiler and CPU lives (a heterogeneous cluster sharing a home
    never loads a library built for another CPU)."""
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256("\0".join([_C_SOURCE, cc, platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
    return _cache_dir() / f"hamming_topk_{key}.so"


def _check_private(path: Path) -> None:
    """Refuse a library this user does not own or that others may write."""
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise RuntimeError(f"refusing to load {path}: it is not owned by this user or others may write it "
                           f"(uid {st.st_uid}, mode {oct(st.st_mode & 0o777)}); delete it to rebuild")


def _compile() -> ctypes.CDLL:
    cc = os.environ.get("CC", "cc")
    flag_sets = (["-O3", "-march=native"], ["-O3", "-mcpu=native"], ["-O3"])
    lib_path = _library_path()
    if not lib_path.is_file():
        with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
            src = Path(tmp) / "hamming_topk.c"
            src.write_text(_C_SOURCE)
            errors = []
            for flags in flag_sets:
                out = Path(tmp) / "lib.so"
                proc = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", str(out), str(src)],
                                      capture_output=True, text=True, timeout=120)
                if proc.returncode == 0:
                    out.chmod(0o700)
                    os.replace(out, lib_path)  # atomic: concurrent builders never see a partial file
                    break
                errors.append(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else str(flags))
            else:
                raise RuntimeError("; ".join(errors))
    _check_private(lib_path)
    lib = ctypes.CDLL(str(lib_path))
    fn = lib.hamming_topk
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    order = lib.counting_order  # used by pipeline.evaluation.counting
    order.restype = ctypes.c_int
    order.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int32,
                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def _kernel():
    """The compiled kernel, or None (then ``topk_search`` is used)."""
    global _lib, _lib_error
    if os.environ.get("FICO_HAMMING_BACKEND", "c") != "c":
        return None
    with _lib_lock:
        if _lib is None and _lib_error is None:
            try:
                _lib = _compile()
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _lib_error = str(e) or type(e).__name__
                log.warning("Hamming kernel unavailable (%s): using topk_search", _lib_error)
    return _lib


def backend() -> str:
    """'c' when the compiled kernel is in use, 'torch' (``topk_search``) otherwise."""
    return "c" if _kernel() is not None else "torch"


def packed_words(codes) -> np.ndarray:
    """Codes (packed uint8, or bool / 0-1 / ±1) as a C-contiguous ``uint64 [n, words]`` array,
    zero-padded to whole 64-bit words (padding never changes a distance)."""
    return np.ascontiguousarray(prepare(as_tensor(codes).cpu(), "hamming").numpy()).view(np.uint64)


@torch.no_grad()
def hamming_topk(queries, gallery, k: int, num_threads: int | None = None):
    """Exhaustive Hamming top-``k``: ``(scores int32 [nq, k] = -distance, indices int64 [nq, k])``,
    best first, ties by gallery index ascending (the result of ``topk_search(..., "hamming")``).

    Inputs: packed ``uint8`` codes or bool / 0-1 / ±1 codes, numpy or CPU tensors."""
    q, g = packed_words(queries), packed_words(gallery)
    nq, ng = q.shape[0], g.shape[0]
    if k <= 0 or ng == 0:
        raise ValueError("need k >= 1 and a non-empty gallery")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"code lengths differ: {q.shape[1] * 64} vs {g.shape[1] * 64} bits (padded)")
    k = min(k, ng)
    lib = _kernel()
    if lib is None:
        return topk_search(q.view(np.uint8), g.view(np.uint8), k, "hamming")
    out_d = np.empty((nq, k), dtype=np.int32)
    out_i = np.empty((nq, k), dtype=np.int64)
    threads = max(1, min(num_threads or torch.get_num_threads(), (nq + 15) // 16))
    # queries scanned together share each gallery tile; their candidate buffers (2k + 64 each) stay <= ~12 MB
    qb = max(1, min(16, (1 << 20) // (2 * k + 64)))
    bounds = np.linspace(0, nq, threads + 1).astype(np.int64)
    bounds = [int(b) for b in bounds]

    def run(a: int, b: int) -> None:
        if b <= a:
            return
        rc = lib.hamming_topk(q[a:].ctypes.data, g.ctypes.data, b - a, ng, q.shape[1], k, qb,
                              out_d[a:].ctypes.data, out_i[a:].ctypes.data)
        if rc != 0:
            raise MemoryError("hamming_topk: out of memory for the candidate buffers")

    if threads == 1:
        run(0, nq)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, bounds[:-1], bounds[1:]))
    return torch.from_numpy(out_d), torch.from_numpy(out_i)
