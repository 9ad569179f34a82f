"""Shards from a server (a real HTTP server on 127.0.0.1) and from a command: the same records as from the
folder, a failed read retried from where it stopped, a shard that keeps failing skipped and counted with
every rank's steps still equal, and a card that can never make the pipeline run a command."""
import json
import shutil
from collections import Counter

import pytest
import yaml

from pipeline.config import ConfigError, load_config, to_dict
from pipeline.data import DataError, DatasetCard, SharedEpoch, build_stream, image_transform, load_tokenizer
from pipeline.data.shard_reader import ShardReader
from pipeline.training.provenance import card_hash
from pipeline.training.run_dir import check_resume
from tests.helpers.shard_server import Faults, serve_folder

FAST = dict(retries=2, wait=0.01, timeout=1.0)


def _read(card, split, reader, *, train, rank=0, world=1, workers=0, batch=16, epoch=0):
    """(image ids in order, skip counts, batches) of one rank's stream."""
    loader, n = build_stream(card, split, train=train, batch_size=batch, rank=rank, world=world,
                             num_workers=workers, seed=0, epoch=SharedEpoch(epoch), tokenizer=load_tokenizer(card),
                             max_text_len=48, transform=image_transform(64, [0.5] * 3, [0.25] * 3), reader=reader)
    ids, skipped, batches = [], Counter(), 0
    for b in loader:
        ids += b["image_ids"].tolist()
        skipped.update(b["skipped"])
        batches += 1
    assert n is None or batches == n == len(loader)
    return ids, skipped, batches


def test_an_http_folder_gives_the_same_records_and_tokenizer_as_the_disk(shapes_tiny):
    local = DatasetCard.read(shapes_tiny)
    with serve_folder(shapes_tiny) as (url, faults):
        remote = DatasetCard.read(url.rstrip("/"))  # the folder URL with or without its slash
        assert remote.shards("val")[0] == url + "val-000000.tar" and remote.source == local.source
        assert len(load_tokenizer(remote)) == len(load_tokenizer(local))
        for split, train in (("train", True), ("val", False)):
            assert _read(remote, split, ShardReader(**FAST), train=train, workers=2) == \
                _read(local, split, ShardReader(**FAST), train=train, workers=2)
        assert faults.requests["train-000000.tar"] == 1  # really read over HTTP


@pytest.mark.parametrize("kind", ["cut", "stall"])
def test_a_read_that_fails_once_is_retried_from_where_it_stopped(shapes_tiny, kind):
    """The server sends half of a shard and closes the connection (or stalls past the timeout) once: the
    reader re-opens it and carries on, so every record arrives once and nothing is counted lost."""
    faults = Faults()
    faults.add("val-000001.tar", kind, times=1)
    with serve_folder(shapes_tiny, faults) as (url, _):
        ids, skipped, _ = _read(DatasetCard.read(url), "val", ShardReader(**FAST), train=False)
    assert faults.requests["val-000001.tar"] == 2
    assert kind == "cut" or faults.given_up["val-000001.tar"] == 1  # the reader's timeout ended the stall
    assert sorted(ids) == list(range(64)) and not skipped


def test_a_shard_that_keeps_failing_is_skipped_counted_and_every_rank_takes_its_steps(shapes_tiny, caplog):
    faults = Faults()
    faults.add("train-000003.tar", "404")
    with serve_folder(shapes_tiny, faults) as (url, _):
        card = DatasetCard.read(url)
        runs = [_read(card, "train", ShardReader(**FAST), train=True, rank=r, world=2, batch=8) for r in range(2)]
    healthy = _read(DatasetCard.read(shapes_tiny), "train", ShardReader(), train=True, rank=0, world=2, batch=8)
    assert [batches for _, _, batches in runs] == [healthy[2]] * 2  # equal steps, as without the failure
    assert sum(s["unreadable_shard"] for _, s, _ in runs) == 32  # the shard's records, counted once
    assert faults.requests["train-000003.tar"] == 1 + 2  # 1 + 2 retries, then given up (never a hang)
    lost = set(range(96, 128))  # train-000003.tar holds records 96..127
    seen = {i for ids, _, _ in runs for i in ids}
    assert not seen & lost and seen == set(range(256)) - lost
    assert "train-000003.tar: unreadable after 3 tries (HTTP 404 gone): 32 records skipped" in caplog.text


def test_a_server_that_is_down_stops_the_run_in_one_line_rather_than_unbalance_the_ranks(shapes_tiny):
    faults = Faults()
    with serve_folder(shapes_tiny, faults) as (url, _):
        card = DatasetCard.read(url)
        for name in card.shard_names("train"):
            faults.add(name, "404")
        with pytest.raises(DataError, match="no training record of this rank's share could be read .*HTTP 404"):
            _read(card, "train", ShardReader(retries=0), train=True, batch=8)


def test_a_command_reads_shards_named_by_the_card(shapes_tiny, tmp_path):
    """data.shard_url_command runs the user's command per shard (`cat` standing in for `aws s3 cp`); one
    that exits non-zero is a failed read, skipped and counted."""
    (tmp_path / "card").mkdir()  # the card and tokenizer on disk, the shards elsewhere
    for name in ("dataset.json", "tokenizer.json"):
        shutil.copy(shapes_tiny / name, tmp_path / "card")
    card = DatasetCard.read(tmp_path / "card")
    through_cat = ShardReader(f"pipe:cat {shapes_tiny}/{{shard}}", **FAST)
    for split, train in (("train", True), ("val", False)):
        assert _read(card, split, through_cat, train=train) == \
            _read(DatasetCard.read(shapes_tiny), split, ShardReader(), train=train)
    (tmp_path / "store").mkdir()  # an object store that lost the second validation shard
    shutil.copy(shapes_tiny / "val-000000.tar", tmp_path / "store")
    ids, skipped, _ = _read(card, "val", ShardReader(f"pipe:cat {tmp_path}/store/{{shard}}", **FAST), train=False)
    assert sorted(ids) == list(range(32)) and skipped == {"unreadable_shard": 32}


def test_a_card_never_runs_a_command_nor_names_files_outside_its_folder(shapes_tiny, tmp_path):
    folder = tmp_path / "served"
    shutil.copytree(shapes_tiny, folder)
    marker = tmp_path / "ran"
    raw = json.loads((folder / "dataset.json").read_text())
    raw["shard_url_command"] = f"pipe:touch {marker} && cat {folder}/{{shard}}"  # not part of a card: ignored
    (folder / "dataset.json").write_text(json.dumps(raw))
    cfg = load_config("hash_64bit.yaml", [f"data.root={folder}"]).data
    ids, _, _ = _read(DatasetCard.read(cfg.root), "val", ShardReader.from_config(cfg), train=False)
    assert len(ids) == 64 and not marker.exists()
    with serve_folder(tmp_path) as (url, _):  # the card's folder is served at /served/
        for bad in (f"pipe:touch {marker}", "../outside.tar", "/etc/passwd", "http://elsewhere.example/x.tar",
                    "a/../../b.tar", f"file://{folder}/val-000000.tar"):
            raw["splits"]["val"]["shards"][0] = bad
            (folder / "dataset.json").write_text(json.dumps(raw))
            card = DatasetCard.read(url + "served/")
            with pytest.raises(DataError, match="not a file inside"):
                card.shards("val")
            with pytest.raises(DataError, match="cannot be put into data.shard_url_command"):
                ShardReader("pipe:cat /data/{shard}").locations(card, "val")
    assert not marker.exists()


@pytest.mark.parametrize("template, why", [
    ("pipe:aws s3 cp s3://bucket/prefix/shard.tar -", "must contain {shard}"),
    ("s3://bucket/prefix/{shard}", "must start with 'pipe:'"),
    ("pipe:{shard}x", None), ("https://host/prefix/{shard}", None)])
def test_a_bad_shard_url_command_fails_at_start_up_in_one_line(template, why):
    overrides = [f"data.shard_url_command={template}"]
    if why is None:
        assert load_config("hash_64bit.yaml", overrides).data.shard_url_command == template
        return
    with pytest.raises(ConfigError) as e:
        load_config("hash_64bit.yaml", overrides)
    assert "data.shard_url_command" in str(e.value) and why in str(e.value) and "\n" not in str(e.value)


def test_a_resume_may_move_its_data_onto_a_server(tmp_path, shapes_tiny):
    """The run was started from the folder; the same card served over HTTP (and shards read by a command)
    resumes it: same card hash, and the data keys change freely. Another card on the server does not."""
    saved = load_config("hash_64bit.yaml", [f"data.root={shapes_tiny}"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_dict(saved)))
    (tmp_path / "provenance.json").write_text(json.dumps({"dataset": {"card_sha256": card_hash(shapes_tiny)}}))
    other = tmp_path / "other"
    other.mkdir()
    raw = json.loads((shapes_tiny / "dataset.json").read_text())
    (other / "dataset.json").write_text(json.dumps({**raw, "name": "another dataset"}))
    with serve_folder(shapes_tiny) as (url, _), serve_folder(other) as (other_url, _):
        moved = load_config("hash_64bit.yaml", [f"data.root={url}", "data.shard_retries=5",
                                                "data.shard_url_command=pipe:gsutil cat gs://b/shapes/{shard}"])
        assert check_resume(tmp_path, moved, DatasetCard.read(url)) == {}  # nothing to allow
        elsewhere = load_config("hash_64bit.yaml", [f"data.root={other_url}"])
        with pytest.raises(ConfigError, match="another dataset"):
            check_resume(tmp_path, elsewhere, DatasetCard.read(other_url))
    with pytest.raises(ConfigError, match="data.batch_size"):  # what a run learns still may not change
        check_resume(tmp_path, load_config("hash_64bit.yaml", ["data.root=https://x/", "data.batch_size=7"]))


def test_a_server_without_the_card_fails_in_one_line(shapes_tiny, tmp_path):
    with serve_folder(tmp_path) as (url, _):
        with pytest.raises(DataError, match="cannot fetch .*dataset.json \\(HTTP 404"):
            DatasetCard.read(url + "nothing/")
