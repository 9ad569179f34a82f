"""`python train.py` with data.root on a real HTTP server (127.0.0.1, a free port): the same test metrics as
the same run from the folder, and a server that drops a training shard mid-run gives a finished run
whose lost records are counted."""
import csv
import json

from tests.helpers.runs import tiny_run_args, train_together
from tests.helpers.shard_server import Faults, serve_folder

DROPPED = "train-000003.tar"  # 32 records; read once in epoch 1, answered 404 from epoch 2 on


def test_a_run_from_a_server_matches_the_folder_and_survives_a_dropped_shard(shapes_tiny, shapes_backbone,
                                                                             tmp_path):
    args = [*tiny_run_args(shapes_backbone), "trainer.max_epochs=2", "data.shard_retries=1",
            "data.shard_retry_wait=0.05", "trainer.log_every_n_steps=1"]
    faults = Faults()
    faults.add(DROPPED, "404", after=2)
    with serve_folder(shapes_tiny) as (url, _), serve_folder(shapes_tiny, faults) as (dropping, _):
        runs = train_together({"folder": ["--config", "hash_64bit.yaml", f"data.root={shapes_tiny}", *args],
                               "http": ["--config", "hash_64bit.yaml", f"data.root={url}", *args],
                               "dropped": ["--config", "hash_64bit.yaml", f"data.root={dropping}", *args]},
                              tmp_path)
    metrics = {name: json.loads((run / "test_metrics.json").read_text()) for name, run in runs.items()}
    assert metrics["http"] == metrics["folder"]
    assert metrics["dropped"]  # finished, and tested
    assert faults.requests[DROPPED] == 1 + 2  # epoch 1 read it; epoch 2 tried it twice and gave it up
    with open(runs["dropped"] / "csv" / "metrics.csv") as f:
        counted = [float(r["data/train_skipped_unreadable_shard"]) for r in csv.DictReader(f)
                   if r.get("data/train_skipped_unreadable_shard")]
    assert counted and max(counted) == 32
    assert "unreadable_shard" not in (runs["folder"] / "csv" / "metrics.csv").read_text()
