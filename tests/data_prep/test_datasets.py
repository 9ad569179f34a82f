"""data_prep on real dataset formats: COCO, Flickr30K, JSON-lines manifests.

The fixtures are tiny but in the real formats: a Karpathy split file with its
real field names, COCO instances files (images / annotations / categories,
with COCO's non-contiguous category ids), Flickr30K labels as .npy, MATLAB v5
and MATLAB v7.3 (HDF5, stored column-major as MATLAB does), and generated
JPEGs of which one is corrupt, one truncated and one missing.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_prep import read_card
from data_prep.__main__ import main as cli
from data_prep.fsutil import TMP_MARK

# COCO-style categories: ids are not contiguous; the file lists them out of order.
CATEGORIES = [{"id": 18, "name": "dog", "supercategory": "animal"},
              {"id": 1, "name": "person", "supercategory": "person"},
              {"id": 3, "name": "car", "supercategory": "vehicle"}]
NAMES_BY_ID = ["person", "car", "dog"]  # ascending id: the official order

# (cocoid, folder, karpathy split, captions, category ids annotated, image state)
COCO_IMAGES = [
    (9, "train2014", "train", ["A man walks a dog.", "Person with a dog on a leash"], [1, 18, 18], "ok"),
    (25, "train2014", "train", ["A red car.", "A car parked", "  ", "a parked car on a street"], [3], "ok"),
    (30, "train2014", "restval", ["Two people and a car."], [1, 3], "ok"),
    (42, "val2014", "restval", ["Nothing annotated here."], [], "ok"),
    (61, "train2014", "train", ["A corrupt file."], [1], "corrupt"),
    (73, "train2014", "train", ["A missing file."], [1], "missing"),
    (74, "train2014", "train", [], [1], "ok"),                        # no captions at all
    (85, "val2014", "val", ["A dog on a sofa.", "dog resting"], [18], "ok"),
    (90, "val2014", "val", ["A truncated picture."], [18], "truncated"),
    (99, "val2014", "test", ["A person in a car."] * 1 + ["driver", "a man driving", "car", "road", "six"],
     [1, 3], "ok"),
    (25, "train2014", "test", ["A repeated cocoid."], [3], "ok"),     # duplicate id
]


def _jpeg(rng, size=(48, 36)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _sentences(captions, imgid, first_sentid):
    return [{"tokens": c.lower().split(), "raw": c, "imgid": imgid, "sentid": first_sentid + i}
            for i, c in enumerate(captions)]


def write_image(path: Path, state: str, rng) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if state == "missing":
        return
    data = _jpeg(rng)
    if state == "corrupt":
        data = b"this is not a jpeg" * 10
    elif state == "truncated":
        data = data[: len(data) // 3]
    path.write_bytes(data)


@pytest.fixture(scope="module")
def coco_raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_raw")
    rng = np.random.default_rng(0)
    images, sentid = [], 0
    instances = {"train2014": {"images": [], "annotations": [], "categories": CATEGORIES},
                 "val2014": {"images": [], "annotations": [], "categories": CATEGORIES}}
    for imgid, (cid, folder, split, captions, cats, state) in enumerate(COCO_IMAGES):
        filename = f"COCO_{folder}_{cid:012d}.jpg"
        write_image(root / "images" / folder / filename, state, rng)
        images.append({"filepath": folder, "sentids": list(range(sentid, sentid + len(captions))),
                       "filename": filename, "imgid": imgid, "split": split,
                       "sentences": _sentences(captions, imgid, sentid), "cocoid": cid})
        sentid += len(captions)
        inst = instances[folder]
        inst["images"].append({"id": cid, "file_name": filename, "width": 48, "height": 36})
        for cat in cats:
            inst["annotations"].append({"id": len(inst["annotations"]) + 1, "image_id": cid, "category_id": cat,
                                        "bbox": [1, 2, 3, 4], "area": 12.0, "iscrowd": 0})
    images.append({"split": "train", "sentences": [], "imgid": len(images)})  # no filename: skipped
    instances["train2014"]["annotations"].append({"id": 999, "image_id": 9, "category_id": 99})  # unknown
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    for folder, inst in instances.items():
        (root / f"instances_{folder}.json").write_text(json.dumps(inst))
    return root


def coco_args(raw: Path, out: Path, *extra, workers: int = 1) -> list[str]:
    return ["coco", "--karpathy", str(raw / "dataset_coco.json"), "--images", str(raw / "images"),
            "--instances", str(raw / "instances_train2014.json"), str(raw / "instances_val2014.json"),
            "--out", str(out), "--shard-size", "2", "--workers", str(workers), "--no-progress", *extra]


def read_split(out: Path, split: str) -> list[dict]:
    card = read_card(out)
    urls = [str(out / s) for s in card["splits"][split]["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))


def all_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---- COCO -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def coco_built(coco_raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("coco") / "ds"
    assert cli(coco_args(coco_raw, out)) == 0
    return out


def test_coco_counts_and_skip_summary(coco_built):
    card = read_card(coco_built)
    assert card["name"] == "coco" and card["image_key"] == "jpg"
    assert card["categories"] == NAMES_BY_ID
    counts = {s: (e["num_images"], e["num_captions"]) for s, e in card["splits"].items()}
    # train: 9, 25 (3 captions after the blank one), restval 30 and 42; val: 85; test: 99
    assert counts == {"train": (4, 2 + 3 + 1 + 1), "val": (1, 2), "test": (1, 6)}
    assert card["splits"]["train"]["num_without_labels"] == 1  # cocoid 42 has no annotation
    assert card["skipped"] == {"empty_caption": 1, "no_captions": 1, "duplicate_id": 1, "bad_annotation": 1,
                               "bad_karpathy_entry": 1, "missing_image": 1, "unreadable_image": 2}
    assert list(coco_built.glob("*" + TMP_MARK + "*")) == []
    assert not (coco_built / "_progress").exists()


def test_coco_records(coco_built):
    train = {s["__key__"]: s for s in read_split(coco_built, "train")}
    assert list(train) == ["coco_000000000009", "coco_000000000025", "coco_000000000030", "coco_000000000042"]
    dog = train["coco_000000000009"]["json"]
    assert dog["captions"] == ["A man walks a dog.", "Person with a dog on a leash"]
    assert dog["labels"] == [0, 2] and dog["split"] == "train"
    assert train["coco_000000000025"]["json"]["captions"] == ["A red car.", "A car parked", "a parked car on a street"]
    assert train["coco_000000000030"]["json"]["labels"] == [0, 1]
    assert train["coco_000000000042"]["json"]["labels"] == []
    assert [s["json"]["index"] for s in train.values()] == [0, 1, 2, 3]
    assert train["coco_000000000009"]["jpg"].size == (48, 36)
    (test,) = read_split(coco_built, "test")
    assert test["json"]["captions"][-1] == "six" and test["json"]["index"] == 0


def test_coco_restval_kept_apart(coco_raw, tmp_path):
    assert cli(coco_args(coco_raw, tmp_path / "ds", "--keep-restval")) == 0
    splits = read_card(tmp_path / "ds")["splits"]
    assert list(splits) == ["train", "restval", "val", "test"]
    assert (splits["train"]["num_images"], splits["restval"]["num_images"]) == (2, 2)
    assert [s["json"]["index"] for s in read_split(tmp_path / "ds", "restval")] == [0, 1]


def test_coco_tokenizer_from_training_captions_only(coco_built):
    from transformers import PreTrainedTokenizerFast
    card = read_card(coco_built)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(coco_built / card["tokenizer"]), pad_token="[PAD]",
                                  unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    vocab = tok.get_vocab()
    assert len(tok) == card["tokenizer_vocab_size"] > 5
    assert {"dog", "leash", "parked", "annotated"} <= set(vocab)  # restval joined train
    assert "sofa" not in vocab and "driving" not in vocab        # val/test words stay out
    assert all(p in vocab for p in tok.tokenize("a dog on a sofa"))


def test_resize_reencodes_smaller_jpegs(coco_raw, tmp_path):
    assert cli(coco_args(coco_raw, tmp_path / "ds", "--resize", "12", "--quality", "70")) == 0
    for s in read_split(tmp_path / "ds", "train"):
        assert min(s["jpg"].size) == 12 and s["jpg"].mode == "RGB"
    assert read_card(tmp_path / "ds")["made_with"]["image_options"] == {"resize": 12, "quality": 70}


def test_workers_do_not_change_the_bytes(coco_raw, coco_built, tmp_path):
    out = tmp_path / "ds"
    assert cli(coco_args(coco_raw, out, workers=2)) == 0
    assert all_bytes(out) == all_bytes(coco_built)


def test_resume_after_an_interrupted_run(coco_raw, coco_built, tmp_path, monkeypatch):
    from data_prep import writer

    out = tmp_path / "ds"
    real, calls = writer.write_task, []

    def dies_on_third_shard(task, image, out_dir):
        calls.append(task.name)
        if len(calls) == 3:
            (out_dir / f".{task.name}{TMP_MARK}999-dead").write_bytes(b"half a shard")  # as after a kill
            raise KeyboardInterrupt
        return real(task, image, out_dir)

    monkeypatch.setattr(writer, "write_task", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        cli(coco_args(coco_raw, out))
    assert not (out / "dataset.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert sorted(finished) == ["train-000000.tar", "train-000001.tar"]

    monkeypatch.setattr(writer, "write_task", real)
    assert cli(coco_args(coco_raw, out)) == 0
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == finished  # not rewritten
    assert all_bytes(out) == all_bytes(coco_built)                          # same as one clean run
    assert cli(coco_args(coco_raw, out)) == 0                               # complete: nothing to do


def test_refuses_to_mix_builds(coco_raw, coco_built, tmp_path, capsys):
    assert cli(coco_args(coco_raw, coco_built, "--resize", "10")) == 2
    assert "other inputs or options" in capsys.readouterr().err
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    assert cli(coco_args(coco_raw, tmp_path / "ds")) == 2


def test_nothing_usable_exits_non_zero(coco_raw, tmp_path, capsys):
    karpathy = json.loads((coco_raw / "dataset_coco.json").read_text())
    karpathy["images"] = [im for im in karpathy["images"] if im.get("cocoid") in (61, 73)]  # corrupt, missing
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    args = coco_args(coco_raw, tmp_path / "ds")
    args[2] = str(tmp_path / "k.json")
    assert cli(args) == 1
    assert "no usable image" in capsys.readouterr().err
    assert not (tmp_path / "ds" / "dataset.json").exists()


def test_unreadable_inputs_exit_2(coco_raw, tmp_path, capsys):
    args = coco_args(coco_raw, tmp_path / "ds")
    args[2] = str(tmp_path / "nope.json")
    assert cli(args) == 2
    assert "Karpathy split file not found" in capsys.readouterr().err


# ---- Flickr30K ----------------------------------------------------------------------

F30K = [  # (filename, split, captions, image state)
    ("1000092795.jpg", "train", ["Two young guys with shaggy hair.", "Two friends enjoy time outside."], "ok"),
    ("10002456.jpg", "train", ["Several men in hard hats."], "ok"),
    ("1000268201.jpg", "val", ["A child in a pink dress."], "ok"),
    ("1000344755.jpg", "test", ["Someone in a blue shirt."], "missing"),
    ("1000366164.jpg", "test", ["Two men, one in a gray shirt."], "ok"),
]
F30K_LABELS = np.array([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 1, 0]], dtype=np.uint8)


@pytest.fixture(scope="module")
def f30k_raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("f30k_raw")
    rng = np.random.default_rng(1)
    images = []
    for imgid, (name, split, captions, state) in enumerate(F30K):
        write_image(root / "images" / name, state, rng)
        images.append({"sentids": list(range(5 * imgid, 5 * imgid + len(captions))), "imgid": imgid,
                       "sentences": _sentences(captions, imgid, 5 * imgid), "split": split, "filename": name})
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    np.save(root / "labels.npy", F30K_LABELS)
    return root


def _save_mat_v5(path, matrix):
    from scipy.io import savemat
    savemat(path, {"LAll": matrix})


def _save_mat_v73(path, matrix):
    """What MATLAB's save -v7.3 writes: HDF5 after a 512-byte header, the matrix column-major."""
    import h5py
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset("LAll", data=np.ascontiguousarray(matrix.T).astype(np.float64))
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 .")


def f30k_args(raw, out, *extra):
    return ["flickr30k", "--karpathy", str(raw / "dataset_flickr30k.json"), "--images", str(raw / "images"),
            "--out", str(out), "--workers", "1", "--no-progress", *extra]


@pytest.mark.parametrize("fmt", ["npy", "mat5", "mat73"])
def test_flickr30k_labels_in_every_format(f30k_raw, tmp_path, fmt):
    pytest.importorskip("scipy" if fmt == "mat5" else "h5py" if fmt == "mat73" else "numpy")
    path = {"npy": f30k_raw / "labels.npy", "mat5": tmp_path / "l.mat", "mat73": tmp_path / "l73.mat"}[fmt]
    if fmt == "mat5":
        _save_mat_v5(path, F30K_LABELS)
    elif fmt == "mat73":
        _save_mat_v73(path, F30K_LABELS)
    assert cli(f30k_args(f30k_raw, tmp_path / "ds", "--labels", str(path))) == 0
    card = read_card(tmp_path / "ds")
    assert card["name"] == "flickr30k" and len(card["categories"]) == 4
    assert card["skipped"] == {"missing_image": 1}
    got = {s["__key__"]: s["json"]["labels"] for split in ("train", "val", "test")
           for s in read_split(tmp_path / "ds", split)}
    assert got == {"flickr30k_1000092795": [0, 3], "flickr30k_10002456": [1], "flickr30k_1000268201": [],
                   "flickr30k_1000366164": [2]}
    assert card["splits"]["val"]["num_without_labels"] == 1


def test_flickr30k_test_only_labels_and_coco_names(f30k_raw, tmp_path):
    test_rows = np.zeros((2, 80), dtype=np.uint8)
    test_rows[1, [0, 2]] = 1  # second test image: person, car
    np.save(tmp_path / "test.npy", test_rows)
    assert cli(f30k_args(f30k_raw, tmp_path / "ds", "--labels", str(tmp_path / "test.npy"),
                         "--labels-split", "test")) == 0
    card = read_card(tmp_path / "ds")
    assert card["categories"][:3] == ["person", "bicycle", "car"] and len(card["categories"]) == 80
    (test,) = read_split(tmp_path / "ds", "test")
    assert test["json"]["labels"] == [0, 2]
    assert card["splits"]["train"]["num_without_labels"] == 2


def test_flickr30k_without_labels_and_row_count_mismatch(f30k_raw, tmp_path, capsys):
    assert cli(f30k_args(f30k_raw, tmp_path / "a")) == 0
    card = read_card(tmp_path / "a")
    assert card["categories"] == [] and card["splits"]["train"]["num_captions"] == 3
    np.save(tmp_path / "short.npy", F30K_LABELS[:4])
    assert cli(f30k_args(f30k_raw, tmp_path / "b", "--labels", str(tmp_path / "short.npy"))) == 2
    err = capsys.readouterr().err
    assert "shape (4, 4)" in err and "5 images" in err


# ---- manifest --------------------------------------------------------------------------

def test_manifest(tmp_path):
    rng = np.random.default_rng(2)
    lines = []
    for i in range(20):
        write_image(tmp_path / "imgs" / f"{i:02d}.jpg", "ok", rng)
        row = {"path": f"{i:02d}.jpg", "captions": [f"picture number {i}"] * (1 + i % 3)}
        if i < 4:
            row["split"] = "test"
        if i % 2:
            row["labels"] = ["cat"] if i % 4 == 1 else [0, 1]
        lines.append(json.dumps(row))
    png = Image.new("L", (30, 20), 128)  # a grey PNG: re-encoded as RGB JPEG
    png.save(tmp_path / "imgs" / "grey.png")
    lines += [json.dumps({"path": "grey.png", "captions": "a single string caption", "id": "grey.png"}),
              "{not json", json.dumps({"captions": ["no path"]}),
              json.dumps({"path": "00.jpg", "captions": ["duplicate"], "id": "m_00"}),
              json.dumps({"path": "01.jpg", "captions": ["bad label"], "labels": [7]}),
              json.dumps({"path": "02.jpg", "captions": ["", " "]}),
              json.dumps({"path": "gone.jpg", "captions": ["missing"]})]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "cats.txt").write_text("dog\ncat\n")
    args = ["manifest", "--jsonl", str(tmp_path / "m.jsonl"), "--images", str(tmp_path / "imgs"),
            "--out", str(tmp_path / "m"), "--categories", str(tmp_path / "cats.txt"), "--split", "0.5,0.25,0.25",
            "--workers", "1", "--no-progress"]
    assert cli(args) == 0
    card = read_card(tmp_path / "m")
    assert card["name"] == "m" and card["categories"] == ["dog", "cat"]
    assert card["skipped"] == {"bad_manifest_line": 2, "duplicate_id": 1, "label_out_of_range": 1,
                               "empty_caption": 2, "no_captions": 1, "missing_image": 1}
    counts = {s: e["num_images"] for s, e in card["splits"].items()}
    # 18 lines without a split (one of them the missing image): 9 train, 4 val, 5 test before the check
    assert counts["train"] == 9 and counts["val"] + counts["test"] == 4 + 4 + 5 - 1
    records = {s["__key__"]: s for split in counts for s in read_split(tmp_path / "m", split)}
    assert len(records) == 21
    assert records["m_05"]["json"]["labels"] == [1] and records["m_03"]["json"]["labels"] == [0, 1]
    assert records["m_05"]["json"]["captions"] == ["picture number 5"] * 3
    assert records["grey_png"]["jpg"].mode == "RGB"
    assert records["grey_png"]["json"]["captions"] == ["a single string caption"]
    assert all(records[f"m_{i:02d}"]["json"]["split"] == "test" for i in range(4))
    # the seeded split is reproducible and independent of the line order (with no duplicate
    # ids: among those the first line wins, which is order-dependent by nature)
    unique = [line for line in lines if '"duplicate"' not in line]
    (tmp_path / "r.jsonl").write_text("\n".join(reversed(unique)) + "\n")
    args2 = args[:]
    args2[2], args2[6] = str(tmp_path / "r.jsonl"), str(tmp_path / "r")
    assert cli(args2 + ["--name", "m"]) == 0
    again = {s["__key__"]: s["json"]["split"] for split in counts for s in read_split(tmp_path / "r", split)}
    assert again == {k: r["json"]["split"] for k, r in records.items()}


def test_manifest_multihot_width(tmp_path):
    rng = np.random.default_rng(3)
    rows = []
    for i, labels in enumerate([[1, 0, 1], [0, 1, 0], [1, 1], [0, 0, 0, 1]]):
        write_image(tmp_path / f"{i}.jpg", "ok", rng)
        rows.append(json.dumps({"path": f"{i}.jpg", "captions": ["x"], "labels": labels, "split": "train"}))
    (tmp_path / "m.jsonl").write_text("\n".join(rows))
    assert cli(["manifest", "--jsonl", str(tmp_path / "m.jsonl"), "--images", str(tmp_path),
                "--out", str(tmp_path / "out"), "--label-format", "multihot", "--workers", "1",
                "--no-progress"]) == 0
    card = read_card(tmp_path / "out")
    assert card["categories"] == ["class_0", "class_1", "class_2"]
    assert card["skipped"] == {"label_width": 2}
    assert [s["json"]["labels"] for s in read_split(tmp_path / "out", "train")] == [[0, 2], [1]]


# ---- files from someone else: nothing read outside --images, nothing written outside --out ----------

def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _all_record_bytes(out: Path) -> list[bytes]:
    card = read_card(out)
    urls = [str(out / s) for e in card["splits"].values() for s in e["shards"]]
    return [r["jpg"] for r in wds.WebDataset(urls, shardshuffle=False)]


def test_manifest_paths_and_splits_cannot_escape_their_folders(tmp_path):
    rng = np.random.default_rng(5)
    images, secret = tmp_path / "share" / "imgs", tmp_path / "private"
    write_image(secret / "secret.jpg", "ok", rng)
    secret_bytes = (secret / "secret.jpg").read_bytes()
    for i in range(4):
        write_image(images / f"{i}.jpg", "ok", rng)
    (images / "link.jpg").symlink_to(secret / "secret.jpg")  # a link out of the folder
    rows = [{"path": f"{i}.jpg", "captions": [f"fine {i}"], "split": "train"} for i in range(2)]
    rows += [{"path": "../../private/secret.jpg", "captions": ["up and out"]},
             {"path": str(secret / "secret.jpg"), "captions": ["absolute"]},
             {"path": "link.jpg", "captions": ["through a link"]},
             {"path": "2.jpg", "captions": ["a split that climbs"], "split": "../../../escaped"},
             {"path": "3.jpg", "captions": ["an absolute split"], "split": str(tmp_path / "abs")}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    before = _tree(tmp_path)
    out = tmp_path / "out"
    assert cli(["manifest", "--jsonl", str(tmp_path / "m.jsonl"), "--images", str(images), "--out", str(out),
                "--workers", "1", "--no-progress"]) == 0
    card = read_card(out)
    assert card["skipped"] == {"outside_images": 3, "bad_split": 2}
    assert sum(e["num_images"] for e in card["splits"].values()) == 2
    assert secret_bytes not in _all_record_bytes(out)
    assert {p for p in _tree(tmp_path) - before if not p.startswith("out")} == set()  # nothing written beside out
    assert set(card["splits"]) <= {"train", "val", "test"}


def test_a_manifest_path_with_a_nul_byte_is_a_counted_skip(tmp_path):
    """A NUL cannot be in a file name: the line is skipped and counted, the other images are packed."""
    rng = np.random.default_rng(7)
    images = tmp_path / "imgs"
    for i in range(3):
        write_image(images / f"{i}.jpg", "ok", rng)
    rows = [{"path": f"{i}.jpg", "captions": [f"fine {i}"], "split": "train"} for i in range(3)]
    rows[1]["path"] = "1.jpg\u0000.png"
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    assert cli(["manifest", "--jsonl", str(tmp_path / "m.jsonl"), "--images", str(images), "--out", str(out),
                "--workers", "1", "--no-progress"]) == 0
    card = read_card(out)
    assert card["skipped"] == {"bad_path": 1}
    assert card["splits"]["train"]["num_images"] == 2


def test_karpathy_file_names_cannot_escape_the_images_folder(tmp_path):
    rng = np.random.default_rng(6)
    images = tmp_path / "images"
    write_image(tmp_path / "outside.jpg", "ok", rng)
    write_image(images / "ok.jpg", "ok", rng)
    entries = [{"filename": "ok.jpg", "split": "train", "sentences": [{"raw": "inside"}]},
               {"filename": "../outside.jpg", "split": "train", "sentences": [{"raw": "dot dot"}]},
               {"filename": str(tmp_path / "outside.jpg"), "split": "test", "sentences": [{"raw": "absolute"}]},
               {"filename": "ok.jpg", "split": "../../x", "sentences": [{"raw": "split out"}]}]
    (tmp_path / "f30k.json").write_text(json.dumps({"images": entries}))
    out = tmp_path / "out"
    before = _tree(tmp_path)
    assert cli(["flickr30k", "--karpathy", str(tmp_path / "f30k.json"), "--images", str(images), "--out", str(out),
                "--workers", "1", "--no-progress"]) == 0
    card = read_card(out)
    assert card["skipped"] == {"outside_images": 2, "bad_split": 1}
    assert (tmp_path / "outside.jpg").read_bytes() not in _all_record_bytes(out)
    assert {p for p in _tree(tmp_path) - before if not p.startswith("out")} == set()
    coco = [{"filename": "x.jpg", "filepath": "/etc", "cocoid": 1, "split": "train", "sentences": [{"raw": "a"}]}]
    (tmp_path / "coco.json").write_text(json.dumps({"images": coco}))
    assert cli(["coco", "--karpathy", str(tmp_path / "coco.json"), "--images", str(images),
                "--out", str(tmp_path / "coco_out"), "--workers", "1", "--no-progress"]) == 1  # nothing usable


def test_features_command_points_at_its_new_home(capsys):
    """Feature shards need the pipeline's encoders, and data_prep imports nothing of pipeline."""
    assert cli(["features", "--shards", "x", "--config", "hash_64bit.yaml", "--out", "y"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python -m pipeline.features" in err
