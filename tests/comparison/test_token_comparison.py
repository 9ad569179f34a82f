"""The comparison tools on token-level runs: the report (quality as the run scored itself, token storage,
exhaustive vs screened query time, hybrid with token re-ranking) and `python -m pipeline.hybrid`."""
import csv
import json

import pytest

from pipeline.inference.encoding import encode_split
from pipeline.inference.runs import load_run
from pipeline.inference.scoring import split_metrics


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def token_report(tiny_token_runs, tiny_runs, tmp_path_factory):
    from pipeline.comparison import report

    out = tmp_path_factory.mktemp("token_report")
    rc = report.main([str(tiny_token_runs["fine_grained_tokens"]), str(tiny_runs["hash_64bit"]), "--out", str(out),
                      "--quick", "--wandb", "off", "--no-progress", "--no-faiss", "--kinds", "duplicated",
                      "--distill-bits", "0", "--token-cap-s", "1e-3"])
    assert rc == 0
    return out


def test_report_rows_of_a_token_run(token_report, tiny_token_runs):
    quality = {r["model"]: r for r in _csv(token_report / "quality.csv")}
    row = quality["fine_grained_tokens"]
    own = json.loads((tiny_token_runs["fine_grained_tokens"] / "test_metrics.json").read_text())
    assert float(row["max_abs_diff_vs_test_metrics"]) <= 1e-6  # scored as the run scored its test split
    assert float(row["rsum"]) == pytest.approx(own["rsum"])
    assert "token sets" in row["representation"]
    storage = [r for r in _csv(token_report / "storage.csv") if r["model"] == "fine_grained_tokens"]
    assert storage[0]["storage"].startswith("token sets, 32-d fp32 (images 16.0")  # 4 x 4 cells, tokens.dim=32
    assert float(storage[0]["bytes_per_item"]) > 16 * 32 * 4 > float(storage[1]["bytes_per_item"]) == 256 * 4
    query = [r for r in _csv(token_report / "query_time.csv") if r["model"] == "fine_grained_tokens"]
    methods = {r["method"] for r in query}
    assert {"token exhaustive", "token screened (K=10)", "token screened (K=50)",
            "screen: exhaustive (ours)"} <= methods
    exhaustive = [r for r in query if r["method"] == "token exhaustive"]
    assert all(r["gallery"] == "duplicated" and r["total_s"] == "" and "does not finish" in r["params"]
               for r in exhaustive)  # a cap of 1 ms: nothing finishes
    for r in query:
        if r["method"].startswith("token screened"):
            screen = next(x for x in query if x["method"] == "screen: exhaustive (ours)"
                          and (x["size"], x["direction"]) == (r["size"], r["direction"]))
            assert float(r["ms_per_query"]) > float(screen["ms_per_query"]) > 0


def test_report_hybrid_of_a_token_run_re_ranks_with_tokens(token_report):
    rows = [r for r in _csv(token_report / "hybrid.csv") if r.get("method")]
    for direction in ("i2t", "t2i"):
        mine = [r for r in rows if r["direction"] == direction]
        ref = next(r for r in mine if r["method"] == "token exhaustive")
        assert {r["screener"] for r in mine if r["method"] == "hybrid"} == {
            "global embedding (cosine)", "hash_64bit", "simhash-64"}
        n_gallery = int(ref["K"])
        for r in mine:
            if r["method"] == "hybrid" and int(r["K"]) == n_gallery:  # K = gallery: exhaustive token scoring
                assert r["R@1"] == ref["R@1"] and r["R@10"] == ref["R@10"]


def test_split_metrics_screened_at_full_depth_equals_exhaustive(tiny_token_runs):
    run = load_run(tiny_token_runs["fine_grained_scan"])
    enc = encode_split(run, progress=False)
    exhaustive = split_metrics(run, enc)
    assert exhaustive == pytest.approx(json.loads((run.path / "test_metrics.json").read_text()), abs=1e-6)
    assert split_metrics(run, enc, mode="screened", k=enc.num_texts) == pytest.approx(exhaustive, abs=1e-6)


def test_hybrid_command_on_a_token_run(tiny_token_runs, tiny_runs, tiny_hash_runs, tmp_path, capsys):
    from pipeline.comparison import hybrid

    rc = hybrid.main(["--fine-grained", str(tiny_token_runs["fine_grained_tokens"]), "--hash",
                      str(tiny_runs["hash_64bit"]), str(tiny_hash_runs["hash_nested"]), "--K", "5,64",
                      "--queries", "8", "--repeats", "1", "--distill-bits", "0", "--simhash-bits", "0",
                      "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    rows = _csv(tmp_path / "hybrid.csv")
    # a nested run screens by its full codes and each prefix (its two-level cascade ranks a top K only)
    assert {(r["method"], r["screener"]) for r in rows if r["K"] == "5"} == {
        ("hybrid", "hash_64bit"), ("hybrid", "global embedding (cosine)"), ("hybrid", "hash_nested"),
        ("hybrid", "hash_nested@16"), ("hybrid", "hash_nested@32"), ("hybrid", "hash_nested@64")}
    assert "token exhaustive" in capsys.readouterr().out
