"""The token-level configs end to end: a tiny run of each trains, writes every protocol name and how its
test split was scored, and beats its untrained copy."""
import json

import pytest

from pipeline.metrics import metric_names


@pytest.mark.parametrize("config, scorer", [("fine_grained_tokens", "LateInteraction"),
                                            ("fine_grained_scan", "CrossAttention")])
def test_tiny_token_run_trains_and_writes_the_protocol(tiny_token_runs, config, scorer):
    run_dir = tiny_token_runs[config]
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert list(metrics) == metric_names((1, 5, 10))  # every protocol name, numbers only
    assert all(isinstance(v, float) for v in metrics.values())
    scoring = json.loads((run_dir / "test_scoring.json").read_text())
    assert scoring["mode"] == "exhaustive" and scoring["screen_k"] is None and scoring["scorer"].startswith(scorer)
    metric_log = (run_dir / "csv" / "metrics.csv").read_text()
    for key in ("train/token_loss", "train/global_loss", "val/rsum"):  # validation ran (screened) every epoch
        assert key in metric_log, key
    untrained = json.loads((tiny_token_runs[f"{config}_untrained"] / "test_metrics.json").read_text())
    for d in ("i2t", "t2i"):
        assert metrics[f"{d}_R@10"] >= 2 * untrained[f"{d}_R@10"], (d, metrics, untrained)
