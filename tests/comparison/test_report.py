"""`python -m pipeline.report` end to end on two tiny trained runs (one of each family), and its parts."""
import csv
import json

import numpy as np
import pytest
import torch

from pipeline.comparison.galleries import ItemSource
from pipeline.comparison.query_time import QUERY_COLUMNS, exhaustive_search
from pipeline.comparison.report import QUALITY_COLUMNS
from pipeline.evaluation.exhaustive import topk_search

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def quick_report(tiny_runs, tmp_path_factory, monkeypatch_module):
    from pipeline.comparison import report

    monkeypatch_module.setenv("WANDB_MODE", "offline")
    out = tmp_path_factory.mktemp("report")
    rc = report.main([str(tiny_runs["hash_64bit"]), str(tiny_runs["fine_grained"]), "--out", str(out), "--quick",
                      "--wandb", "on", "--no-progress"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_report_quality_tables_match_the_runs_own_test_metrics(quick_report, tiny_runs):
    cols, rows = _csv(quick_report / "quality.csv")
    assert cols == QUALITY_COLUMNS
    by_model = {r["model"]: r for r in rows}
    assert set(by_model) == {"hash_64bit", "fine_grained"}
    assert by_model["hash_64bit"]["family"] == "hash" and by_model["fine_grained"]["family"] == "fine_grained"
    for name, run_dir in tiny_runs.items():
        own = json.loads((run_dir / "test_metrics.json").read_text())
        row = by_model[name]
        for key, value in own.items():  # every name the run itself reported, same value
            assert float(row[key]) == pytest.approx(value, abs=1e-5), (name, key)
        assert float(row["max_abs_diff_vs_test_metrics"]) <= 1e-6
        for key in ("i2t_R@200", "t2i_R@50", "i2t_mAP@N", "t2i_mAP@10"):  # deep lists and mAP for both families
            assert row[key] != ""


def test_report_efficiency_tables(quick_report):
    cols, enc = _csv(quick_report / "encoding.csv")
    assert {(r["model"], r["side"]) for r in enc} == {(m, s) for m in ("hash_64bit", "fine_grained")
                                                      for s in ("image", "text")}
    assert all(float(r["items_per_s"]) > 0 and r["device"] == "cpu" and int(r["batch_size"]) > 0 for r in enc)
    _, storage = _csv(quick_report / "storage.csv")
    per_item = {(r["model"], r["storage"].split(",")[0]): float(r["bytes_per_item"]) for r in storage}
    assert per_item[("hash_64bit", "packed codes")] == 8
    assert per_item[("hash_64bit", "one int8 per bit (paper's count)")] == 64
    assert per_item[("fine_grained", "256-d float32")] == 1024

    cols, query = _csv(quick_report / "query_time.csv")
    assert cols == QUERY_COLUMNS
    points = {(r["model"], r["gallery"], r["size"], r["direction"]) for r in query}
    assert len(points) == 2 * 2 * 2 * 2  # models x kinds x sizes x directions
    methods = {r["model"]: set() for r in query}
    for r in query:
        methods[r["model"]].add(r["method"])
        assert float(r["ms_per_query"]) > 0 and 0.0 <= float(r["recall@k"]) <= 1.0
    assert methods["hash_64bit"] == {"exhaustive (ours)", "faiss IndexBinaryFlat", "faiss IndexBinaryIVF"}
    assert methods["fine_grained"] == {"exhaustive (ours)", "faiss IndexFlatIP", "faiss IndexHNSWFlat"}
    for r in query:  # exact indexes agree with our exhaustive search (tie-aware recall)
        if r["method"] in ("faiss IndexBinaryFlat", "faiss IndexFlatIP"):
            assert float(r["recall@k"]) == pytest.approx(1.0), r
    big = [r for r in query if r["size"] == "2K/10K" and r["direction"] == "i2t" and r["method"].startswith("exh")]
    assert all(int(r["gallery_items"]) == 10_000 and float(r["total_s"]) > 0 for r in big)


def test_report_hybrid_plots_markdown_and_wandb(quick_report):
    _, hybrid = _csv(quick_report / "hybrid.csv")
    screeners = {r["screener"] for r in hybrid if r["method"] == "hybrid"}
    assert screeners == {"hash_64bit", "distilled-64", "simhash-64"}
    assert {r["gallery"] for r in hybrid} == {"64", "320", "2,000"}  # test images, test captions, distractors
    for r in hybrid:
        same = [x for x in hybrid if x["direction"] == r["direction"] and x["gallery"] == r["gallery"]]
        fg = next(x for x in same if x["method"] == "fine-grained exhaustive")
        if r["method"] == "hybrid" and int(r["K"]) == int(r["gallery"].replace(",", "")):
            assert r["R@1"] == fg["R@1"] and r["R@10"] == fg["R@10"]  # K = gallery: the fine-grained ranking
        if r["method"] == "hybrid" and int(r["K"]) == 1:  # K = 1: the hash ranking's first hit
            alone = next(x for x in same if x["method"] == "hash only" and x["screener"] == r["screener"])
            assert r["R@1"] == alone["R@1"]
    assert any(r["method"] == "hybrid" and r["K"] == "64" for r in hybrid)
    for name in ("quality_vs_query_time", "quality_vs_bytes", "query_time_vs_gallery", "test_curves"):
        data = (quick_report / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC)
        import matplotlib.image

        img = matplotlib.image.imread(quick_report / f"{name}.png")
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    md = (quick_report / "report.md").read_text()
    for heading in ("## 1. Retrieval quality", "## 2. Encoding time and storage", "## 3. Query time",
                    "## 4. Hybrid", "## 5. Plots"):
        assert heading in md
    assert "![quality_vs_bytes](quality_vs_bytes.png)" in md
    assert "![test_curves](test_curves.png)" in md  # both runs' curves from their test_curves.json
    runs = list((quick_report / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    media = list((runs[0] / "files" / "media").rglob("*"))
    assert any(p.suffix == ".png" for p in media) and any(p.suffix == ".json" for p in media)


def test_report_panels_show_each_runs_top5_with_the_correct_items_marked(quick_report):
    from matplotlib.image import imread

    from pipeline.comparison.panels import COLOURS, CORRECT, MAX_CAPTIONS

    record = json.loads((quick_report / "panels.json").read_text())
    md = (quick_report / "report.md").read_text()
    for direction in ("t2i", "i2t"):
        assert f"![panels_{direction}](panels_{direction}.png)" in md
        shown = record[direction]
        assert set(shown["runs"]) == {"hash_64bit", "fine_grained"} and len(shown["queries"]) == 4
        correct = 0
        for query, *rows in zip(shown["queries"], *shown["runs"].values()):
            for row in rows:
                assert len(row) == 5
                for r in row:  # the caption's own image, or a caption of the query image: marked correct
                    pair = (r["id"] == query // MAX_CAPTIONS if direction == "t2i" else r["id"] // MAX_CAPTIONS == query)
                    assert (r["mark"] == CORRECT) == pair
                    correct += pair
        image = imread(quick_report / f"panels_{direction}.png")[..., :3]
        green = np.array([int(COLOURS[CORRECT][i:i + 2], 16) / 255 for i in (1, 3, 5)])
        assert (np.abs(image - green).max(-1) < 0.02).any() == (correct > 0)  # green frames drawn iff correct items
        assert list((quick_report / "wandb").glob(f"offline-run-*/files/media/images/report/panels_{direction}_*.png"))


@pytest.mark.parametrize("hashed", [False, True])
def test_streamed_exhaustive_search_equals_one_search_over_the_whole_gallery(hashed):
    from pipeline.inference.encoding import EncodedSplit

    from pipeline.evaluation.scores import pack_codes

    rng = np.random.default_rng(0)
    cont = np.tanh(rng.standard_normal((30, 16))).astype(np.float32)
    g_form = pack_codes(torch.from_numpy(cont)).numpy() if hashed else cont / np.linalg.norm(cont, axis=1,
                                                                                            keepdims=True)
    enc = EncodedSplit(cont, cont, g_form, g_form, np.arange(30), np.zeros((30, 1), np.uint8), np.arange(30),
                       np.arange(30))
    for kind in ("duplicated", "distinct"):
        src = ItemSource(enc, "image", kind, hashed)
        full = src.rows(0, 5000)
        assert np.array_equal(np.concatenate([src.rows(0, 1234), src.rows(1234, 5000)]), full)
        q = g_form[:7]
        s, i, *_ = exhaustive_search(q, src, 5000, 25, torch.device("cpu"), block_items=700)
        ref_s, ref_i = topk_search(q, full, 25, "hamming" if hashed else "cosine")
        assert torch.equal(i, ref_i), kind
        assert torch.allclose(s.double(), ref_s.double(), atol=1e-6)


def test_full_query_sets_path_runs_every_query_and_matches_faiss():
    """`--queries 0` (the default on CUDA): every query of the size is run, nothing is extrapolated."""
    from pipeline.inference.encoding import EncodedSplit
    from pipeline.comparison.query_time import query_time_rows

    class FakeRun:
        family, dim, name = "fine_grained", 16, "fake"

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 16)).astype(np.float32)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    enc = EncodedSplit(x, x, xn, xn, np.arange(40), np.zeros((40, 1), np.uint8), np.arange(40), np.arange(40))

    class Bar:
        def update(self, n):
            pass

    rows = query_time_rows(FakeRun(), enc, [(300, 1500)], ("distinct",), 0, 5, torch.device("cpu"), 512, True,
                           10**6, 10**6, True, 0, Bar())
    ours = [r for r in rows if r["method"] == "exhaustive (ours)"]
    assert {(r["direction"], r["timed_queries"], r["extrapolated"]) for r in ours} == {("i2t", 300, False),
                                                                                    ("t2i", 1500, False)}
    flat = [r for r in rows if r["method"] == "faiss IndexFlatIP"]
    assert len(flat) == 2 and all(r["recall@k"] == pytest.approx(1.0) for r in flat)


def test_a_checkpoint_that_needs_unpickling_is_refused(tiny_runs, tmp_path):
    """A run folder from someone else: loading its checkpoint must not run code (weights_only)."""
    import argparse
    import shutil

    from pipeline.inference.runs import RunError, load_run

    run = tmp_path / "shared_run"
    shutil.copytree(tiny_runs["hash_64bit"], run)
    good = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)  # ours load as plain data
    torch.save({**good, "payload": argparse.Namespace(cmd="touch /tmp/owned")}, run / "checkpoints" / "best.ckpt")
    with pytest.raises(RunError, match="refused") as err:
        load_run(run)
    assert "\n" not in str(err.value) and "Namespace" in str(err.value)
