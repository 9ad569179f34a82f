"""The report's qualitative panels: each run's top 5 is its evaluation's ranking, and the marks are right
(checked through the split's ids, not through the arrays the marks were computed from)."""
import json

import numpy as np
import pytest

from pipeline.comparison.panels import CATEGORY, CORRECT, MAX_CAPTIONS, OTHER, build_panels, panels_record
from pipeline.inference.encoding import encode_split
from pipeline.inference.runs import load_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("config", ["fine_grained", "hash_64bit"])
def test_every_query_ranked_gives_the_runs_recall_and_true_marks(tiny_runs, config):
    run = load_run(tiny_runs[config], num_workers=0)
    enc = encode_split(run, "test", progress=False)
    # every caption and every image as a query: the panels' top 5 then give the run's R@1 and R@5
    panels = build_panels([run], [enc], seed=0, text_queries=enc.num_texts, image_queries=enc.num_images)
    metrics = json.loads((tiny_runs[config] / "test_metrics.json").read_text())
    record = panels_record(panels, enc)
    labels = {int(i): enc.labels[row] for row, i in enumerate(enc.image_ids)}
    seen = set()
    for direction in ("t2i", "i2t"):
        rows = record[direction]["runs"][run.name]
        for k in (1, 5):
            hits = [any(r["mark"] == CORRECT for r in row[:k]) for row in rows]
            assert 100.0 * np.mean(hits) == pytest.approx(metrics[f"{direction}_R@{k}"], abs=1e-9)
        for query, row in zip(record[direction]["queries"], rows):
            for r in row:
                caption, image = (query, r["id"]) if direction == "t2i" else (r["id"], query)
                query_image = query // MAX_CAPTIONS if direction == "t2i" else query
                result_image = r["id"] if direction == "t2i" else r["id"] // MAX_CAPTIONS
                expected = (CORRECT if caption // MAX_CAPTIONS == image else
                            CATEGORY if (labels[query_image] & labels[result_image]).any() else OTHER)
                assert r["mark"] == expected
                seen.add(expected)
    assert seen == {CORRECT, CATEGORY, OTHER}  # every kind of mark occurs on the tiny runs
    # the default sample: a few queries, fixed by the seed
    small = build_panels([run], [enc], seed=3)
    assert [len(p.queries) for p in small] == [4, 4] and small[0].queries == build_panels([run], [enc], 3)[0].queries
