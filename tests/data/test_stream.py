"""The shard stream on real shards: exactly-once evaluation across ranks x workers, equal step
counts on uneven shards, skipped-and-counted bad records, per-rank / per-epoch seeds."""
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from data_prep import write_card, write_split
from pipeline.data import DataError, DatasetCard, SharedEpoch, build_stream, image_transform, load_tokenizer


def _stream(card, split, *, train, rank=0, world=1, workers=0, batch=8, epoch=0, steps=None):
    loader, n = build_stream(card, split, train=train, batch_size=batch, rank=rank, world=world,
                             num_workers=workers, seed=0, epoch=SharedEpoch(epoch), tokenizer=load_tokenizer(card),
                             max_text_len=48, transform=image_transform(64, [0.5] * 3, [0.25] * 3),
                             steps_per_epoch=steps)
    return loader, n


def _png(color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, format="PNG")
    return buf.getvalue()


def _record(i, captions=("a red square",), labels=(1,), png=None):
    return {"__key__": f"t_{i:04d}", "png": png if png is not None else _png(),
            "json": {"id": f"t_{i:04d}", "captions": list(captions), "labels": list(labels), "split": "train",
                     "index": i}}


def _dataset(tmp_path: Path, shapes_tiny: Path, shard_sizes: list[int], bad: dict | None = None) -> DatasetCard:
    """A card over hand-made shards (sizes given), reusing the shapes tokenizer."""
    bad = bad or {}
    shards, i = [], 0
    for s, size in enumerate(shard_sizes):
        records = [bad.get(j, _record(j)) for j in range(i, i + size)]
        shards += [f"{s:02d}-" + n for n in write_split(records, tmp_path, f"{s:02d}-train", shard_size=size)]
        i += size
    shutil.copy(shapes_tiny / "tokenizer.json", tmp_path / "tokenizer.json")
    names = sorted(p.name for p in tmp_path.glob("*.tar"))
    write_card(tmp_path, {"name": "t", "version": 1, "categories": ["circle", "square", "star"], "image_key": "png",
                          "tokenizer": "tokenizer.json",
                          "splits": {"train": {"shards": names, "num_images": i, "num_captions": i}}})
    return DatasetCard.read(tmp_path)


def test_eval_reads_every_record_exactly_once_across_2_ranks_x_2_workers(shapes_tiny):
    card = DatasetCard.read(shapes_tiny)
    seen = []
    for rank in range(2):
        loader, n = _stream(card, "train", train=False, rank=rank, world=2, workers=2)
        assert n is None
        rank_ids = [int(i) for batch in loader for i in batch["image_ids"]]
        seen.append(rank_ids)
    assert not set(seen[0]) & set(seen[1]), "ranks overlap"
    everything = seen[0] + seen[1]
    assert len(everything) == len(set(everything)) == card.num_images("train")


def test_eval_batches_carry_every_caption_with_its_image_id(shapes_tiny):
    card = DatasetCard.read(shapes_tiny)
    loader, _ = _stream(card, "val", train=False)
    batch = next(iter(loader))
    counts = Counter(batch["text_image_ids"].tolist())
    assert set(counts) == set(batch["image_ids"].tolist()) and set(counts.values()) == {5}
    assert len(set(batch["text_ids"].tolist())) == len(batch["text_ids"]) == batch["text"]["input_ids"].shape[0]


def test_an_epoch_visits_every_training_record_once_with_equal_steps_on_uneven_shards(tmp_path, shapes_tiny):
    """4 very uneven shards (40, 3, 3, 3 records) over 2 ranks x 2 workers, and the 8 training shards of
    the tiny shapes set over 5 ranks x 2 workers (fewer shards than streams): every rank takes the same
    number of full batches, together they hold every record, and only the top-up of each worker's last
    batch repeats records."""
    for card, world, workers, batch in ((_dataset(tmp_path, shapes_tiny, [40, 3, 3, 3]), 2, 2, 5),
                                        (DatasetCard.read(shapes_tiny), 5, 2, 8)):
        n_records = sum(card.shard_sizes("train").values())
        for epoch in (0, 1):
            seen, lengths = Counter(), []
            for rank in range(world):
                loader, n = _stream(card, "train", train=True, rank=rank, world=world, workers=workers, batch=batch,
                                    epoch=epoch)
                batches = list(loader)
                lengths.append(len(batches))
                assert len(loader) == n == len(batches)
                assert all(len(b["images"]) == batch for b in batches)
                seen.update(i for b in batches for i in b["image_ids"].tolist())
            streams = world * workers
            assert lengths == [workers * -(-(-(-n_records // streams)) // batch)] * world
            assert set(seen) == set(range(n_records))  # every record, once an epoch ...
            assert sum(seen.values()) - n_records < streams * batch  # ... and repeats only in the top-ups


def test_training_seeds_differ_per_rank_and_epoch(shapes_tiny):
    card = DatasetCard.read(shapes_tiny)

    def first_ids(rank, epoch):
        loader, _ = _stream(card, "train", train=True, rank=rank, world=2, epoch=epoch, steps=2)
        return [int(i) for b in loader for i in b["image_ids"]]

    assert first_ids(0, 0) == first_ids(0, 0)  # reproducible
    assert first_ids(0, 0) != first_ids(1, 0)  # ranks draw differently
    assert first_ids(0, 0) != first_ids(0, 1)  # the epoch reaches the stream


def test_corrupt_records_are_skipped_counted_and_the_rest_kept(tmp_path, shapes_tiny):
    bad = {2: _record(2, png=b"not a png"), 3: _record(3, captions=[]), 4: _record(4, labels=[9]),
           5: _record(5, captions=["   "])}
    card = _dataset(tmp_path, shapes_tiny, [6, 6], bad=bad)
    with open(tmp_path / "01-train-000000.tar", "r+b") as f:  # cut the second shard inside its 3rd record
        f.truncate(5000)
    loader, _ = _stream(card, "train", train=False, batch=4)
    skipped, kept = Counter(), []
    for batch in loader:
        skipped.update(batch["skipped"])
        kept += batch["image_ids"].tolist()
    assert skipped["no_caption"] == 2 and skipped["bad_label"] == 1
    assert skipped["unreadable_shard"] == 1  # the truncated shard's half-read record is counted as lost
    assert skipped["undecodable"] == 1  # (the bad png)
    assert sorted(kept) == [0, 1, 6, 7]  # everything readable before the cut is kept


def test_missing_card_and_missing_shard_fail_with_a_fix(tmp_path, shapes_tiny):
    with pytest.raises(DataError, match="data_prep"):
        DatasetCard.read(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(shapes_tiny, copy)
    (copy / "val-000000.tar").unlink()
    with pytest.raises(DataError, match="missing"):
        DatasetCard.read(copy).shards("val")


def test_dataset_tokenizer_has_its_whole_vocabulary(shapes_tiny):
    card = DatasetCard.read(shapes_tiny)
    tok = load_tokenizer(card)
    expected = json.loads((shapes_tiny / "dataset.json").read_text())["tokenizer_vocab_size"]
    assert len(tok) == expected > 50  # transformers 5's vocab_file= path silently gives 5 tokens
    ids = tok("a big red circle in the zyxwv corner")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.unk_token_id not in tok("a big red circle")["input_ids"]
