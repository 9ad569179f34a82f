"""The compiled Hamming top-k kernel: exactly topk_search's result (tie rule included), and built and
loaded only where no one else can write."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.evaluation import hamming
from pipeline.evaluation.exhaustive import topk_search
from pipeline.evaluation.hamming import hamming_topk
from pipeline.evaluation.scores import pack_codes


def _codes(rng, n, bits):
    return rng.integers(0, 2, (n, bits)).astype(bool)


@pytest.fixture
def compiled_kernel():
    """The C kernel, which the tests below compare with topk_search; without it hamming_topk *is*
    topk_search and they would compare it with itself. CI (CI=true) has a compiler: a failed build
    fails there; elsewhere the tests skip, saying why."""
    if hamming.backend() != "c":
        why = f"the Hamming kernel did not build ({hamming._lib_error or 'FICO_HAMMING_BACKEND is set'})"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)


@pytest.mark.parametrize("bits", [8, 16, 64, 72, 128, 200])
def test_hamming_topk_equals_topk_search_with_heavy_ties(bits, compiled_kernel):
    rng = np.random.default_rng(bits)
    for nq, ng, k in ((33, 700, 1), (33, 700, 10), (5, 3000, 257), (17, 40, 40), (3, 5000, 2600)):
        q, g = _codes(rng, nq, bits), _codes(rng, ng, bits)
        s1, i1 = hamming_topk(q, g, k)
        s2, i2 = topk_search(q, g, k, "hamming")
        assert torch.equal(s1, s2) and torch.equal(i1, i2), (bits, nq, ng, k)


def test_hamming_topk_threads_duplicates_and_fallback(monkeypatch, compiled_kernel):
    rng = np.random.default_rng(1)
    g = pack_codes(_codes(rng, 64, 64)).numpy()
    g = np.concatenate([g] * 50)  # every item 50 times: the tie rule decides everything
    q = pack_codes(_codes(rng, 40, 64)).numpy()
    ref = topk_search(q, g, 120, "hamming")
    for threads in (1, 2, 3):
        got = hamming_topk(q, g, 120, num_threads=threads)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    monkeypatch.setenv("FICO_HAMMING_BACKEND", "torch")
    assert hamming.backend() == "torch"
    got = hamming_topk(q, g, 120)
    assert torch.equal(got[1], ref[1])


def test_hamming_kernel_is_built_privately_and_a_foreign_library_is_refused(tmp_path, monkeypatch, compiled_kernel):
    built = Path(hamming._lib._name)  # the library this session loaded
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o777)
    cache.chmod(0o777)  # a shared, world-writable cache folder
    monkeypatch.setenv("FICO_CACHE_DIR", str(cache))
    target = hamming._library_path()
    assert oct(cache.stat().st_mode & 0o777) == "0o700"  # closed before anything is put there
    shutil.copy(built, target)
    target.chmod(0o666)  # someone else could have replaced it
    with pytest.raises(RuntimeError, match="refusing to load"):
        hamming._compile()
    target.unlink()
    hamming._compile()  # builds its own, private one
    assert oct(target.stat().st_mode & 0o022) == "0o0"
