"""Feature shards: `python -m pipeline.features` on real shards, and hash heads trained on them.

The encoders are the tiny random-initialised ones of the default configs (seeded: the build makes
them exactly as training does), so every stored vector can be recomputed here and compared."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_prep import read_card
from data_prep import TMP_MARK
from pipeline.inference.features import main as cli
from tests.helpers.runs import run_train

# mean pooling: a random-initialised BERT's [CLS] vector barely depends on the words
TINY_ENCODERS = ["model.image_encoder.width=16", "model.text_encoder.width=32", "model.text_encoder.layers=1",
                 "model.text_encoder.pooling=mean", "model.image_encoder.init=null"]  # random cnn: features are the point here


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # before the module's builds


def build_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["--shards", str(shards), "--config", "hash_64bit.yaml", *TINY_ENCODERS, "--out", str(out),
            "--workers", "2", "--batch-size", "20", "--no-progress", *extra]


def records(folder: Path, split: str) -> list[dict]:
    card = read_card(folder)
    return list(wds.WebDataset([str(folder / s) for s in card["splits"][split]["shards"]], shardshuffle=False))


@pytest.fixture(scope="module")
def interrupted_then_resumed(shapes_tiny, tmp_path_factory):
    """The feature build of shapes_tiny, killed while writing its third shard, then run again:
    (folder, {shard: mtime} of the shards finished before the kill)."""
    from pipeline.inference import features

    out, real, calls = tmp_path_factory.mktemp("features") / "shapes_features", features.write_shard, []

    def dies_on_third_shard(recs, path):
        calls.append(Path(path).name)
        if len(calls) == 3:
            (Path(path).parent / f".{Path(path).name}{TMP_MARK}999-dead").write_bytes(b"half")  # as after a kill
            raise KeyboardInterrupt
        return real(recs, path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(features, "write_shard", dies_on_third_shard)
        with pytest.raises(KeyboardInterrupt):
            cli(build_args(shapes_tiny, out, "--workers", "0"))
    assert not (out / "dataset.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert cli(build_args(shapes_tiny, out)) == 0  # the same command, now with 2 workers
    return out, finished


@pytest.fixture(scope="module")
def features_tiny(interrupted_then_resumed):
    return interrupted_then_resumed[0]


def test_same_records_keys_and_json_with_feature_members_and_card(shapes_tiny, features_tiny):
    source, card = read_card(shapes_tiny), read_card(features_tiny)
    assert card["image_key"] == "img.npy" and card["tokenizer"] is None
    assert card["categories"] == source["categories"] and card["skipped"] == {}
    f = card["features"]
    assert (f["image_dim"], f["text_dim"], f["dtype"], f["tokens"]) == (16, 32, "float16", False)
    assert f["source_config"]["config"] == "hash_64bit.yaml"
    assert f["source_config"]["image_encoder"]["name"] == "cnn" and f["source_config"]["image_encoder"]["width"] == 16
    for split in ("train", "val", "test"):
        assert card["splits"][split]["shards"] == source["splits"][split]["shards"]  # one to one, same names
        for key in ("num_images", "num_captions"):
            assert card["splits"][split][key] == source["splits"][split][key]
        ours, theirs = records(features_tiny, split), records(shapes_tiny, split)
        assert [r["__key__"] for r in ours] == [r["__key__"] for r in theirs]
        assert [r["json"] for r in ours] == [r["json"] for r in theirs]  # byte for byte
        for r in ours:
            assert set(r) - {"__key__", "__url__", "__local_path__"} == {"json", "img.npy", "txt.npy"}
            img, txt = np.load(io.BytesIO(r["img.npy"])), np.load(io.BytesIO(r["txt.npy"]))
            assert img.shape == (16,) and img.dtype == np.float16
            assert txt.shape == (len(json.loads(r["json"])["captions"]), 32) and txt.dtype == np.float16


def test_vectors_are_the_frozen_encoders_outputs_row_per_caption_in_order(shapes_tiny, features_tiny):
    from pipeline.config import load_config
    from pipeline.data import DatasetCard, image_transform, load_tokenizer
    from pipeline.models.encoders import build_image_encoder, build_text_encoder

    from pipeline.training.build import complete_config

    cfg = complete_config(load_config("hash_64bit.yaml", TINY_ENCODERS))  # data.mean / std: the cnn's own
    tok = load_tokenizer(DatasetCard.read(shapes_tiny))
    torch.manual_seed(cfg.run.seed)
    image_encoder = build_image_encoder(cfg.model.image_encoder).eval()  # eval: BatchNorm's running stats
    text_encoder = build_text_encoder(cfg.model.text_encoder, len(tok), cfg.data.max_text_len, tok.pad_token_id).eval()
    transform = image_transform(cfg.data.image_size, cfg.data.mean, cfg.data.std)
    source = {r["__key__"]: r for r in records(shapes_tiny, "val")}
    stored_img, stored_txt, img, txt = [], [], [], []
    for r in records(features_tiny, "val")[:6]:
        captions = json.loads(r["json"])["captions"]
        with torch.no_grad():
            pixels = transform(Image.open(io.BytesIO(source[r["__key__"]]["png"])).convert("RGB"))
            img.append(image_encoder(pixels[None]).vector[0].numpy())
            for c in captions:  # one caption at a time: no batch, no padding
                inputs = tok([c], return_tensors="pt")
                txt.append(text_encoder(inputs["input_ids"], inputs["attention_mask"]).vector[0].numpy())
        stored_img.append(np.load(io.BytesIO(r["img.npy"])))
        stored_txt += list(np.load(io.BytesIO(r["txt.npy"])))
    for stored, computed in ((stored_img, img), (stored_txt, txt)):
        stored, computed = np.stack(stored).astype(np.float32), np.stack(computed)
        np.testing.assert_allclose(stored, computed, rtol=2e-3, atol=1e-4)  # float16 storage
        # and each stored row is nearest to its own item's vector: a shuffled order would fail
        distances = ((stored[:, None] - computed[None]) ** 2).sum(-1)
        assert (distances.argmin(1) == np.arange(len(stored))).all()


def test_resume_kept_finished_shards_and_a_complete_build_is_left_alone(interrupted_then_resumed, shapes_tiny,
                                                                       tmp_path, capsys):
    out, finished = interrupted_then_resumed
    assert sorted(finished) == ["train-000000.tar", "train-000001.tar"]
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == finished  # not rewritten
    assert not list(out.glob(f"*{TMP_MARK}*")) and not (out / "_progress").exists()
    card = out / "dataset.json"
    before = card.stat().st_mtime_ns
    assert cli(build_args(shapes_tiny, out)) == 0  # complete: nothing to do
    assert card.stat().st_mtime_ns == before
    capsys.readouterr()
    assert cli(build_args(shapes_tiny, out, "model.text_encoder.layers=2")) == 2  # other options, same folder
    assert "other inputs or options" in capsys.readouterr().err
    assert cli(build_args(out, tmp_path / "g")) == 2  # features of features
    assert "already holds feature shards" in capsys.readouterr().err
    assert cli(build_args(tmp_path / "nothing", tmp_path / "h")) == 2
    assert "no dataset card" in capsys.readouterr().err
    assert cli(build_args(shapes_tiny, tmp_path / "m", "model.image_encoder.name=/no/such/model")) == 2
    assert "local folder made with save_pretrained" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()  # nothing claimed: a corrected command starts afresh


def test_training_reads_features_and_refuses_the_wrong_encoders(features_tiny, shapes_tiny):
    from pipeline.data import DataError, DatasetCard, check_model_inputs
    from pipeline.models.encoders import FeatureInput, SmallCNN

    class Model(torch.nn.Module):
        def __init__(self, image, text):
            super().__init__()
            self.image_encoder, self.text_encoder = image, text

    card = DatasetCard.read(features_tiny)
    check_model_inputs(card, Model(FeatureInput(16), FeatureInput(32)))
    with pytest.raises(DataError, match="model.text_encoder.width=32"):
        check_model_inputs(card, Model(FeatureInput(16), FeatureInput(24)))
    with pytest.raises(DataError, match="model.image_encoder.name=features"):
        check_model_inputs(card, Model(SmallCNN(16), FeatureInput(32)))
    with pytest.raises(DataError, match="needs feature shards"):
        check_model_inputs(DatasetCard.read(shapes_tiny), Model(FeatureInput(16), FeatureInput(32)))


def test_hash_head_trains_on_feature_shards_end_to_end(features_tiny, tmp_path):
    args = ["--config", "coco_hash_64bit_features.yaml", f"data.root={features_tiny}", f"run.root={tmp_path}",
            "model.image_encoder.width=16", "model.text_encoder.width=32", "data.batch_size=32",
            "data.eval_batch_size=64", "data.num_workers=0", "trainer.max_epochs=2", "data.steps_per_epoch=4",
            "model.head_hidden=32", "hash.num_negatives=64", "optim.warmup_steps=2", "logger.wandb=false"]
    proc = run_train(args, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "coco_hash_64bit_features" / "test_metrics.json").read_text())
    assert 0 < metrics["i2t_mAP@N"] <= 1 and 0 < metrics["t2i_mAP@N"] <= 1
    assert "| i2t |" in proc.stdout
