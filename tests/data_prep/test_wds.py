"""Shards made by others (written here by webdataset's own TarWriter in img2dataset's layout) are scanned
once, read where they are, and trained on."""
import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_prep import DatasetCard, read_card
from data_prep.__main__ import main as cli
from pipeline.data import SharedEpoch, build_stream, image_transform, load_tokenizer
from tests.helpers.runs import run_train

WORDS = "a the red green blue big small square circle star on left right of".split()


def _jpg(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


@pytest.fixture(scope="module")
def their_shards(tmp_path_factory):
    """train: 3 shards of 10 (record 5 of shard 1 has no caption, record 7 of shard 2 no image); val, test: 1 of
    8. Captions alternate between .txt and .json's caption, as img2dataset writes either."""
    root = tmp_path_factory.mktemp("their_shards")
    rng = np.random.default_rng(0)
    for split, shards, per in (("train", 3, 10), ("val", 1, 8), ("test", 1, 8)):
        for s in range(shards):
            with wds.TarWriter(str(root / f"{split}-{s:05d}.tar")) as sink:
                for i in range(per):
                    key = f"{s:05d}{i:04d}"
                    caption = " ".join(rng.choice(WORDS, 5))
                    record = {"__key__": key, "jpg": _jpg(rng)}
                    if i % 2:
                        record["txt"] = caption
                        record["json"] = {"key": key, "status": "success"}
                    else:
                        record["json"] = {"key": key, "caption": caption, "url": f"http://x/{key}.jpg"}
                    if (split, s, i) == ("train", 1, 5):
                        record.pop("txt"), record.update(json={"key": key})
                    if (split, s, i) == ("train", 2, 7):
                        record.pop("jpg")
                    sink.write(record)
    return root


@pytest.fixture(scope="module")
def wds_card(their_shards, tmp_path_factory):
    before = {p.name: p.stat().st_mtime_ns for p in their_shards.iterdir()}
    out = tmp_path_factory.mktemp("cards") / "theirs"
    assert cli(["wds", "--train", str(their_shards / "train-*.tar"), "--val", str(their_shards / "val-*.tar"),
                "--test", str(their_shards / "test-*.tar"), "--out", str(out)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in their_shards.iterdir()} == before  # nothing written there
    return out


def test_scan_writes_a_card_pointing_at_the_shards(their_shards, wds_card):
    card = read_card(wds_card)
    assert card["layout"] == "wds" and card["image_key"] == "jpg" and card["categories"] == []
    train = card["splits"]["train"]
    assert train["shards"] == [str((their_shards / f"train-{s:05d}.tar").resolve()) for s in range(3)]
    assert train["shard_sizes"] == [10, 10, 10] and train["first_index"] == [0, 10, 20]
    assert (train["num_images"], train["num_captions"]) == (30, 28)
    assert card["skipped"] == {"no_caption": 1, "no_image": 1}
    assert (wds_card / "tokenizer.json").is_file() and sorted(p.name for p in wds_card.iterdir()) == [
        "dataset.json", "tokenizer.json"]


def test_reader_gives_each_record_its_scanned_index_and_caption(wds_card, their_shards):
    card = DatasetCard.read(wds_card)
    loader, _ = build_stream(card, "train", train=False, batch_size=64, rank=0, world=1, num_workers=0, seed=0,
                             epoch=SharedEpoch(), tokenizer=load_tokenizer(card), max_text_len=16,
                             transform=image_transform(32, [0.5] * 3, [0.25] * 3))
    batch = next(iter(loader))
    ids = batch["image_ids"].tolist()
    assert ids == [i for i in range(30) if i not in (15, 27)]  # the two bad records skipped, indices kept
    assert batch["images"].shape == (28, 3, 32, 32) and len(batch["text_ids"]) == 28
    first = next(iter(wds.WebDataset(str(their_shards / "train-00002.tar"), shardshuffle=False)))
    tok = load_tokenizer(card)
    expected = tok([json.loads(first["json"])["caption"]], return_tensors="pt")["input_ids"][0]
    row = ids.index(20)
    got = batch["text"]["input_ids"][row][batch["text"]["attention_mask"][row].bool()]
    assert got.tolist() == expected.tolist()


def test_trains_on_them_with_data_root(wds_card, tmp_path):
    args = ["--config", "fine_grained.yaml", f"data.root={wds_card}", f"run.root={tmp_path}", "data.batch_size=8",
            "data.eval_batch_size=8", "data.num_workers=0", "trainer.max_epochs=1", "model.image_encoder.init=null",
            "model.image_encoder.width=16", "model.text_encoder.width=32", "model.head_hidden=32",
            "data.image_size=32", "logger.wandb=false"]
    proc = run_train(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "fine_grained" / "test_metrics.json").read_text())
    assert 0 <= metrics["t2i_R@1"] <= 100 and "rsum" in metrics


@pytest.mark.parametrize("pattern, shards", [("train-{00000..00002}.tar", [0, 1, 2]), ("train-{*}.tar", [0, 1, 2]),
                                             ("train-{00000,00002}.tar", [0, 2]), ("train-0000{1..2}.tar", [1, 2])])
def test_brace_patterns_name_shards_as_webdataset_does(their_shards, tmp_path, pattern, shards):
    out = tmp_path / "card"
    assert cli(["wds", "--train", str(their_shards / pattern), "--out", str(out)]) == 0
    assert read_card(out)["splits"]["train"]["shards"] == [str((their_shards / f"train-{s:05d}.tar").resolve())
                                                           for s in shards]


def test_out_inside_a_shard_folder_is_refused(their_shards, capsys):
    before = sorted(p.name for p in their_shards.iterdir())
    for out in (their_shards, their_shards / "cards" / "theirs"):
        assert cli(["wds", "--train", str(their_shards / "train-*.tar"), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "shard folder" in err, err
    assert sorted(p.name for p in their_shards.iterdir()) == before  # nothing written there


def test_a_card_without_a_test_split_trains_and_tests_on_val(their_shards, tmp_path):
    card = tmp_path / "no_test"
    assert cli(["wds", "--train", str(their_shards / "train-*.tar"), "--val", str(their_shards / "val-*.tar"),
                "--out", str(card)]) == 0
    args = ["--config", "fine_grained.yaml", f"data.root={card}", f"run.root={tmp_path}", "data.batch_size=8",
            "data.eval_batch_size=8", "data.num_workers=0", "trainer.max_epochs=1", "model.image_encoder.init=null",
            "model.image_encoder.width=16", "model.text_encoder.width=32", "model.head_hidden=32",
            "data.image_size=32", "logger.wandb=false", "trainer.max_steps=2"]
    proc = run_train(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if "no test split" in line]
    assert len(said) == 1 and "val" in said[0], proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "fine_grained" / "test_metrics.json").read_text())
    assert "rsum" in metrics
