"""Nested codes as screeners: a prefix screens like the exhaustive Hamming search on its bytes, the two-level
cascade equals the longer prefix's ranking when its first level keeps everything, and the hybrid runs them."""
import numpy as np
import pytest
import torch

from pipeline.comparison.cascade import PrefixScreen, hamming_rerank, nested_screens
from pipeline.comparison.hybrid import run_hybrid
from pipeline.evaluation.exhaustive import topk_search
from pipeline.evaluation.hamming import hamming_topk
from pipeline.evaluation.scores import pack_codes
from pipeline.inference.encoding import EncodedSplit


def _codes(seed=0, n=400, nq=30, bits=128):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, bits)).astype(np.float32)
    q = g[rng.integers(0, n, nq)] + 1.5 * rng.standard_normal((nq, bits)).astype(np.float32)
    return pack_codes(torch.from_numpy(q)).numpy(), pack_codes(torch.from_numpy(g)).numpy()


def test_hamming_rerank_orders_candidates_by_distance_then_index():
    q, g = _codes(bits=16)  # 16 bits: ties everywhere, the tie rule decides
    cand = np.stack([np.random.default_rng(i).permutation(len(g))[:50] for i in range(len(q))])
    scores, idx = hamming_rerank(q, g, cand, 10)
    for row in range(len(q)):
        subset = np.sort(cand[row])
        ref_s, ref_i = topk_search(q[row:row + 1], g[subset], 10, "hamming")
        assert idx[row].tolist() == subset[ref_i[0].numpy()].tolist()
        assert scores[row].tolist() == ref_s[0].tolist()


def test_a_prefix_screen_is_the_exhaustive_search_on_the_prefix_bytes():
    q, g = _codes()
    s, i = PrefixScreen("nest", 32).topk(q, g, 20)
    ref_s, ref_i = hamming_topk(q[:, :4], g[:, :4], 20)
    assert torch.equal(i, ref_i) and torch.equal(s, ref_s)


def test_a_cascade_keeping_everything_is_the_longer_prefixs_ranking():
    q, g = _codes()
    _, everything = PrefixScreen("nest", 16, then=64, factor=len(g)).topk(q, g, 15)
    assert torch.equal(everything, hamming_topk(q[:, :8], g[:, :8], 15)[1])
    _, narrow = PrefixScreen("nest", 16, then=64, factor=2).topk(q, g, 15)
    first = hamming_topk(q[:, :2], g[:, :2], 30)[1].numpy()
    assert all(set(narrow[r].tolist()) <= set(first[r].tolist()) for r in range(len(q)))  # from the 16-bit pass


def test_nested_screens_are_every_prefix_and_one_cascade():
    screens = nested_screens("nest", [64, 16, 32])
    assert list(screens) == ["nest@16", "nest@32", "nest@64", "nest@16>64"]
    assert nested_screens("single", []) == {}


def _split(rng, n, dim, codes_of=None):
    """An encoded test split of n images with 2 captions each (continuous outputs, packed galleries)."""
    cap = np.repeat(np.arange(n), 2)
    image = rng.standard_normal((n, dim)).astype(np.float32)
    text = image[cap] + 0.5 * rng.standard_normal((2 * n, dim)).astype(np.float32)
    if codes_of is not None:
        image, text = codes_of(image), codes_of(text)
    pack = (lambda x: pack_codes(torch.from_numpy(x)).numpy()) if codes_of is not None else (lambda x: x)
    prefixes = {b: (pack(image[:, :b]), pack(text[:, :b])) for b in (16, 32, 64)} if codes_of is not None else {}
    return EncodedSplit(image, text, pack(image), pack(text), cap, np.ones((n, 1), np.uint8), np.arange(n),
                        np.arange(2 * n), {}, prefixes)


def test_hybrid_screens_with_a_nested_runs_prefixes_and_cascade():
    rng = np.random.default_rng(1)
    fg = _split(rng, 60, 32)
    planes = rng.standard_normal((32, 128)).astype(np.float32)
    nested = _split(np.random.default_rng(1), 60, 32, codes_of=lambda x: np.tanh(x @ planes))
    screeners = {"nest": nested, **nested_screens("nest", nested.prefix_galleries)}
    rows = run_hybrid(fg, screeners, 300, (1, 10, 300), timed_queries=8, repeats=1)
    hybrid = {(r["direction"], r["screener"], r["K"]): r for r in rows if r["method"] == "hybrid"}
    assert {s for _, s, _ in hybrid} == {"nest", "nest@16", "nest@32", "nest@64", "nest@16>64"}
    exhaustive = {r["direction"]: r for r in rows if r["method"] == "fine-grained exhaustive"}
    for (direction, screener, K), row in hybrid.items():
        assert row["screen_ms"] is not None and row["candidate_recall"] is not None
        if K == 300:  # the whole gallery re-ranked: the fine-grained ranking itself
            assert row["R@10"] == pytest.approx(exhaustive[direction]["R@10"]), (direction, screener)


def test_hybrid_and_report_take_every_hashing_family(tiny_runs, tiny_hash_runs, tmp_path):
    """The hybrid tool screens with the supervised, instance-level and nested runs (the nested one also by its
    prefixes and the cascade); the report's quality rows of a nested run's prefixes are its own figures."""
    import json

    from pipeline.comparison import hybrid
    from pipeline.comparison.report import quality_row
    from pipeline.inference.encoding import encode_split
    from pipeline.inference.runs import load_run

    runs = [str(tiny_hash_runs[c]) for c in ("hash_supervised_64bit", "hash_instance_64bit", "hash_nested")]
    rc = hybrid.main(["--fine-grained", str(tiny_runs["fine_grained"]), "--hash", *runs, "--gallery", "300",
                      "--K", "1,10", "--queries", "8", "--repeats", "1", "--distill-bits", "0", "--simhash-bits", "0",
                      "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    screeners = {r["screener"] for r in json.loads((tmp_path / "hybrid.json").read_text()) if r["method"] == "hybrid"}
    assert screeners == {"hash_supervised_64bit", "hash_instance_64bit", "hash_nested", "hash_nested@16",
                         "hash_nested@32", "hash_nested@64", "hash_nested@16>64"}
    nested = load_run(tiny_hash_runs["hash_nested"])
    enc = encode_split(nested, progress=False)
    for bits in (16, 64, None):
        row = quality_row(nested, enc, bits)
        assert row["model"] == ("hash_nested" if bits is None else f"hash_nested@{bits}")
        assert row["max_abs_diff_vs_test_metrics"] <= 1e-9
