"""data_prep, phase 1: shard writing, the dataset card, the tokenizer and the shapes dataset.

Everything here builds real shards in tmp_path and reads them back through
webdataset, the way the pipeline does.
"""
from __future__ import annotations

import multiprocessing as mp
import re
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from data_prep import build_shapes, read_card, write_split
from data_prep.__main__ import main as cli_main
from data_prep.fsutil import TMP_MARK
from data_prep.card import write_card
from data_prep.tokenizer import train_wordpiece

TINY = dict(train=40, val=10, test=10, shard_size=16)
SPECIALS = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def leftovers(folder: Path) -> list[Path]:
    return [p for p in Path(folder).rglob("*") if TMP_MARK in p.name]


def all_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def read_split(folder: Path, card: dict, split: str) -> list[dict]:
    urls = [str(folder / s) for s in card["splits"][split]["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_shapes(tmp_path_factory.mktemp("shapes") / "ds", seed=0, **TINY)


# ---- shards and card -------------------------------------------------------

def _records(n, split="train"):
    for i in range(n):
        key = f"t_{split}_{i:04d}"
        yield {"__key__": key, "png": b"\x89PNG fake %d" % i,
               "json": {"id": key, "captions": [f"caption {i}"], "labels": [i % 3], "split": split}}


def test_write_split_names_and_counts(tmp_path):
    names = write_split(_records(25), tmp_path, "train", shard_size=10)
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    counts = [len(tarfile.open(tmp_path / n).getnames()) // 2 for n in names]
    assert counts == [10, 10, 5]
    keys = [s["__key__"] for s in wds.WebDataset([str(tmp_path / n) for n in names], shardshuffle=False)]
    assert keys == [f"t_train_{i:04d}" for i in range(25)]


def test_interrupted_shard_leaves_no_final_or_temp_file(tmp_path):
    def broken():
        yield from _records(5)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_split(broken(), tmp_path, "train", shard_size=10)
    assert list(tmp_path.iterdir()) == []


def test_write_card_is_atomic_json(tmp_path):
    write_card(tmp_path, {"name": "x", "splits": {}})
    assert read_card(tmp_path) == {"name": "x", "splits": {}}
    assert leftovers(tmp_path) == []


# ---- the shapes dataset ----------------------------------------------------

def test_card_fields(tiny):
    card = read_card(tiny)
    assert card["name"] == "shapes" and card["version"] == 1
    assert len(card["categories"]) == 8 and len(set(card["categories"])) == 8
    assert card["image_key"] == "png"
    assert (tiny / card["tokenizer"]).is_file()
    assert card["skipped"] == {}
    assert card["made_with"]["command"] == "shapes" and card["made_with"]["seed"] == 0
    assert card["made_with"]["image_size"] == 64
    for split in ("train", "val", "test"):
        entry = card["splits"][split]
        assert entry["num_images"] == TINY[split]
        assert entry["num_captions"] == 5 * TINY[split]
        assert all((tiny / s).is_file() for s in entry["shards"])
    assert card["splits"]["train"]["shards"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]


def test_records_round_trip(tiny):
    card = read_card(tiny)
    categories = card["categories"]
    seen = set()
    for split in ("train", "val", "test"):
        samples = read_split(tiny, card, split)
        assert len(samples) == card["splits"][split]["num_images"]
        assert [s["json"]["index"] for s in samples] == list(range(len(samples)))
        for s in samples:
            meta = s["json"]
            assert meta["id"] == s["__key__"] and meta["split"] == split
            assert meta["index"] == int(s["__key__"].rsplit("_", 1)[1])
            assert s["png"].size == (64, 64) and s["png"].mode == "RGB"
            captions = meta["captions"]
            assert len(captions) == 5 and len(set(captions)) == 5
            # The labels are exactly the shape words that every caption mentions.
            for caption in captions:
                words = set(re.findall(r"[a-z]+", caption))
                named = sorted(categories.index(w) for w in words & set(categories))
                assert named == meta["labels"], (caption, meta["labels"])
            seen.add(s["__key__"])
    assert len(seen) == sum(TINY[s] for s in ("train", "val", "test"))  # keys unique in the dataset


def test_same_seed_byte_identical_other_seed_differs(tiny, tmp_path):
    again = build_shapes(tmp_path / "again", seed=0, workers=2, **TINY)  # workers change no byte
    assert all_bytes(again) == all_bytes(tiny)
    other = all_bytes(build_shapes(tmp_path / "other", seed=1, **TINY))
    assert other["train-000000.tar"] != all_bytes(tiny)["train-000000.tar"]


def test_no_leftover_temporary_files(tiny):
    assert leftovers(tiny.parent) == []
    assert sorted(p.name for p in tiny.parent.iterdir()) == ["ds"]


def test_build_is_idempotent_and_rejects_other_parameters(tiny):
    before = {p.name: p.stat().st_mtime_ns for p in tiny.iterdir()}
    assert build_shapes(tiny, seed=0, **TINY) == tiny
    assert {p.name: p.stat().st_mtime_ns for p in tiny.iterdir()} == before
    with pytest.raises(ValueError, match="seed"):
        build_shapes(tiny, seed=3, **TINY)


def _build_in_child(out_dir):
    build_shapes(out_dir, seed=0, **TINY)


def test_concurrent_builds_agree(tmp_path, tiny):
    out = tmp_path / "shared"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_build_in_child, args=(out,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert all_bytes(out) == all_bytes(tiny)
    assert leftovers(tmp_path) == [] and [p.name for p in tmp_path.iterdir()] == ["shared"]


def test_cli_prints_summary(tmp_path, capsys):
    assert cli_main(["shapes", "--out", str(tmp_path / "cli"), "--train", "8", "--val", "2",
                     "--test", "2", "--image-size", "32", "--shard-size", "5"]) == 0
    out = capsys.readouterr().out
    assert "train:       8 images       40 captions    2 shards" in out and "MB on disk" in out
    card = read_card(tmp_path / "cli")
    assert card["made_with"]["image_size"] == 32


# ---- the tokenizer -----------------------------------------------------------

def _load_like_the_pipeline(path):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_file=str(path), **SPECIALS)


def test_tokenizer_loads_with_full_vocabulary(tiny):
    from tokenizers import Tokenizer
    card = read_card(tiny)
    trained = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    tok = _load_like_the_pipeline(tiny / "tokenizer.json")
    assert len(tok) == trained.get_vocab_size() == card["tokenizer_vocab_size"]
    assert len(tok) > 50  # not the 5-token tokenizer of BertTokenizerFast(vocab_file=...)
    assert tok.pad_token_id == 0
    assert [tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == [1, 2, 3, 4]


def test_tokenizer_round_trips_a_caption(tiny):
    tok = _load_like_the_pipeline(tiny / "tokenizer.json")
    vocab = tok.get_vocab()
    caption = "A Big red circle in the top left"
    ids = tok(caption)["input_ids"]
    assert ids == [2] + [vocab[w] for w in caption.lower().split()] + [3]
    assert tok.decode(ids, skip_special_tokens=True) == caption.lower()
    batch = tok(["a circle", "a big red circle"], padding=True)
    assert batch["input_ids"][0][-2:] == [0, 0] and batch["attention_mask"][0][-2:] == [0, 0]


def test_tokenizer_handles_unseen_words(tiny):
    tok = _load_like_the_pipeline(tiny / "tokenizer.json")
    vocab = tok.get_vocab()
    assert "zebra" not in vocab
    pieces = tok.tokenize("a zebra eats Ünïcode 42 ☃")
    assert pieces[0] == "a" and "zebra" not in pieces
    assert all(p in vocab for p in pieces)  # sub-words or [UNK], never an error
    assert tok.tokenize("zebra") == ["z", "##e", "##b", "##r", "##a"]


def test_tokenizer_is_deterministic_and_train_only(tmp_path):
    captions = ["a red circle", "two big stars", "a small red star"] * 3
    train_wordpiece(captions, tmp_path / "a.json")
    train_wordpiece(list(reversed(captions)), tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    tok = _load_like_the_pipeline(tmp_path / "a.json")
    assert "stars" in tok.get_vocab() and "circles" not in tok.get_vocab()
    assert train_wordpiece(captions, tmp_path / "c.json", vocab_size=5 + 72 + 2) == 79  # capped
