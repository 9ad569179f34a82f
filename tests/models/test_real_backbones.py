"""The real-data configs on their real code path: transformers backbones of the classes they name
(ViTModel, CLIPModel's vision tower, BertModel + its WordPiece tokenizer), tiny and randomly
initialised, saved with save_pretrained and loaded by path, as a user points a config at weights
on disk; a dataset made by `python -m data_prep manifest` from generated JPEGs. No mocks."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml

from data_prep import read_card
from data_prep.__main__ import main as cli
from pipeline.inference.features import main as features_cli
from tests.helpers.runs import run_train

IMAGE_SIZE = 32
WORDS = "a an the red green blue yellow big small square circle star dog cat car on in of with near".split()
CATEGORIES = ["dog", "cat", "car"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # before the module's builds


@pytest.fixture(scope="module")
def backbones(tmp_path_factory) -> dict[str, Path]:
    from transformers import BertConfig, BertModel, BertTokenizer, CLIPConfig, CLIPModel, ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    ViTModel(ViTConfig(image_size=IMAGE_SIZE, patch_size=8, **small)).save_pretrained(root / "vit")
    CLIPModel(CLIPConfig(vision_config={"image_size": IMAGE_SIZE, "patch_size": 8, **small},
                         text_config={"vocab_size": 64, "max_position_embeddings": 32, **small},
                         projection_dim=16)).save_pretrained(root / "clip")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    BertModel(BertConfig(vocab_size=len(vocab), max_position_embeddings=64, **small)).save_pretrained(root / "bert")
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(root / "bert")  # a hub model's layout
    return {"vit": root / "vit", "clip": root / "clip", "bert": root / "bert"}


@pytest.fixture(scope="module")
def manifest_dataset(tmp_path_factory) -> Path:
    """20 JPEGs, 1-5 captions each, 12 train / 4 val / 4 test; labels over 3 categories on the test split
    only (as FiCo-ITR's Flickr30K label file has them)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("manifest")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(20):
        pixels = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i:02d}.jpg", quality=85)
        captions = [" ".join(rng.choice(WORDS, 6)) for _ in range(1 + i % 5)]
        split = "train" if i < 12 else "val" if i < 16 else "test"
        labels = [CATEGORIES[i % 3]] + ([CATEGORIES[(i + 1) % 3]] if i % 4 == 0 else [])
        lines.append(json.dumps({"path": f"{i:02d}.jpg", "captions": captions, "split": split,
                                 **({"labels": labels} if split == "test" else {})}))
    (root / "m.jsonl").write_text("\n".join(lines) + "\n")
    (root / "categories.txt").write_text("\n".join(CATEGORIES) + "\n")
    out = root / "ds"
    assert cli(["manifest", "--jsonl", str(root / "m.jsonl"), "--images", str(root), "--categories",
                str(root / "categories.txt"), "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    return out


def local(backbones, image: str) -> list[str]:
    """The documented override from hub names to weights on disk."""
    return [f"model.image_encoder.name={backbones[image]}", f"model.text_encoder.name={backbones['bert']}",
            f"data.tokenizer={backbones['bert']}", f"data.image_size={IMAGE_SIZE}"]


TINY_RUN = ["data.batch_size=4", "data.eval_batch_size=8", "data.num_workers=0", "trainer.max_epochs=1",
            "data.steps_per_epoch=3", "model.head_hidden=16", "hash.num_negatives=16", "optim.warmup_steps=1",
            "trainer.precision=32-true", "logger.wandb=false"]


@pytest.mark.parametrize("config, image, weight", [
    ("coco_hash_64bit.yaml", "vit", "image_encoder.model.embeddings.patch_embeddings.projection.weight"),
    pytest.param("f30k_fine_grained.yaml", "clip", "image_encoder.model.embeddings.patch_embedding.weight",
                 marks=pytest.mark.slow),  # CLIP's vision tower is also covered by the features test below
])
def test_real_config_trains_end_to_end_on_local_backbones(tmp_path, backbones, manifest_dataset, config, image,
                                                          weight):
    from safetensors.torch import load_file

    proc = run_train(["--config", config, f"data.root={manifest_dataset}", f"run.root={tmp_path}",
                      *local(backbones, image), *TINY_RUN], cwd=tmp_path,
                     env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / config.removesuffix(".yaml")
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert 0 <= metrics["i2t_R@1"] <= 100 and "t2i_R@10" in metrics and "t2i_mAP@N" in metrics  # test has labels
    if "hash" in config:  # no validation labels: best.ckpt by val/rsum, decided and said at start-up
        assert "best.ckpt is chosen by val/rsum" in proc.stderr
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["image_encoder"]["name"] == str(backbones[image])
    assert saved["data"]["image_size"] == IMAGE_SIZE  # the override; the backbone's own normalisation stays
    assert saved["data"]["mean"][0] == pytest.approx({"vit": 0.5, "clip": 0.48145466}[image])
    # the backbone itself was loaded from disk and fine-tuned (not only the heads)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    pretrained = load_file(backbones[image] / "model.safetensors")
    key = weight.removeprefix("image_encoder.model.")
    before = pretrained[key] if key in pretrained else pretrained["vision_model." + key]
    assert state[weight].shape == before.shape and not torch.equal(state[weight], before)


def test_features_from_transformers_backbones_with_tokens(tmp_path, backbones, manifest_dataset):
    out = tmp_path / "features"  # CLIP's vision tower (a CLIPModel on disk) and BERT
    assert features_cli(["--shards", str(manifest_dataset), "--config", "coco_fine_grained.yaml",
                *local(backbones, "clip"), "--out", str(out), "--tokens", "--dtype", "float32", "--workers", "0",
                "--no-progress"]) == 0
    card = read_card(out)
    assert (card["features"]["image_dim"], card["features"]["text_dim"], card["features"]["tokens"]) == (32, 32, True)
    assert card["features"]["source_config"]["image_encoder"]["name"] == str(backbones["clip"])
    urls = [str(out / s) for split in ("train", "val", "test") for s in card["splits"][split]["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 20
    for s in samples:
        load = {k: np.load(io.BytesIO(s[k])) for k in s if k.endswith(".npy")}
        n = len(json.loads(s["json"])["captions"])
        assert load["img.npy"].shape == (32,) and load["txt.npy"].shape == (n, 32)
        assert load["img_tokens.npy"].shape == ((IMAGE_SIZE // 8) ** 2 + 1, 32)  # [CLS] + patches
        tokens, mask = load["txt_tokens.npy"], load["txt_mask.npy"]
        assert tokens.shape[:2] == mask.shape and mask.shape[0] == n and tokens.shape[2] == 32
        assert mask.dtype == bool and mask[:, 0].all() and mask.any(0).all()  # trimmed to the longest caption
        # the global vector is the tower's pooled output (CLIP: post-layernorm [CLS]), not the raw [CLS] token
        assert not np.allclose(load["img.npy"], load["img_tokens.npy"][0])


TINY_TOKENS = [*TINY_RUN, "tokens.dim=16", "tokens.screen_k=4"]


@pytest.mark.slow  # the same token code as the shapes configs; the feature-shard test below covers the data path
def test_token_config_on_patch_tokens_and_word_pieces(tmp_path, backbones, manifest_dataset):
    """Cross-attention end to end on a ViT's patch tokens and BERT's word pieces, loaded from disk."""
    proc = run_train(["--config", "coco_fine_grained_scan.yaml", f"data.root={manifest_dataset}",
                      *local(backbones, "vit"), *TINY_TOKENS, f"run.root={tmp_path}"], cwd=tmp_path,
                     env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    scoring = json.loads((tmp_path / "coco_fine_grained_scan" / "test_scoring.json").read_text())
    assert scoring["mode"] == "exhaustive" and scoring["scorer"] == "CrossAttention (t2i)"
    assert "t2i_mAP@N" in json.loads((tmp_path / "coco_fine_grained_scan" / "test_metrics.json").read_text())


def test_token_config_on_token_feature_shards(tmp_path, backbones, manifest_dataset):
    """Late interaction on shards made with `pipeline.features --tokens` (ViT patches, BERT word pieces):
    the stream hands the token sets to the `features` encoders; without token features it is refused."""
    out = tmp_path / "token_features"
    assert features_cli(["--shards", str(manifest_dataset), "--config", "coco_fine_grained_tokens.yaml",
                         *local(backbones, "vit"), "--out", str(out), "--tokens", "--workers", "0",
                         "--no-progress"]) == 0
    proc = run_train(["--config", "coco_fine_grained_tokens_features.yaml", f"data.root={out}",
                      "model.image_encoder.width=32", "model.text_encoder.width=32", *TINY_TOKENS,
                      f"run.root={tmp_path}"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "coco_fine_grained_tokens_features" / "test_metrics.json").read_text())
    assert 0 <= metrics["i2t_R@1"] <= 100 and "t2i_mAP@N" in metrics
    # a token-level model on vector-only feature shards is refused at start-up: it needs the token features
    from pipeline.data import DataError, DatasetCard, check_model_inputs
    from pipeline.models.encoders import FeatureInput
    from pipeline.models.token_scorers import LateInteraction

    class TokenModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.image_encoder, self.text_encoder = FeatureInput(32), FeatureInput(32)
            self.token_scorer = LateInteraction()

    card = DatasetCard.read(out)
    check_model_inputs(card, TokenModel())
    card.features = {**card.features, "tokens": False}
    with pytest.raises(DataError, match="--tokens"):
        check_model_inputs(card, TokenModel())
