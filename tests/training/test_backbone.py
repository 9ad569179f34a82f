"""The shapes backbone (pipeline/backbone.py) and frozen encoders: what `init: shapes, freeze: true` does."""
import torch

from data_prep import TMP_MARK
from pipeline.config import load_config
from pipeline.models.encoders import Frozen, SmallCNN, build_image_encoder
from pipeline.training.backbone import pretrain, resolve_init, shapes_backbone

MEAN, STD = [0.5] * 3, [0.25] * 3


def test_pretraining_learns_the_shapes_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _, accuracy = pretrain(width=16, image_size=32, mean=MEAN, std=STD, steps=60)
    assert torch.equal(torch.rand(3), expected)  # a cached and a fresh backbone give a run the same init
    assert accuracy > 0.25, accuracy  # 8 shapes: chance is 0.125 (60 tiny steps reach ~0.34; 500 at width 64, 98%)


def test_backbone_is_made_once_per_recipe_and_loads_into_the_encoder(tmp_path):
    path = shapes_backbone(16, 32, MEAN, STD, steps=2, cache_dir=tmp_path)
    made = path.stat().st_mtime_ns
    assert shapes_backbone(16, 32, MEAN, STD, steps=2, cache_dir=tmp_path) == path
    assert path.stat().st_mtime_ns == made  # cached: not pretrained again
    other = shapes_backbone(16, 32, MEAN, STD, steps=3, cache_dir=tmp_path)
    assert other != path and other.is_file()  # another recipe, another file: never stale weights
    assert not list(tmp_path.glob(f"*{TMP_MARK}*"))  # no temporary file left behind

    cfg = load_config("hash_64bit.yaml", ["model.image_encoder.width=16", "data.image_size=32",
                                          "model.image_encoder.init_steps=2", f"data.shapes_dir={tmp_path}/shapes"])
    assert resolve_init(cfg) == tmp_path / "backbones" / path.name  # init: shapes -> the same recipe's file
    encoder = build_image_encoder(cfg.model.image_encoder, path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    for name, value in encoder.encoder.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_frozen_encoder_stays_fixed_through_training_steps():
    encoder = Frozen(SmallCNN(16))
    head = torch.nn.Linear(16, 4)
    model = torch.nn.ModuleDict({"encoder": encoder, "head": head}).train()  # Lightning calls .train()
    assert not encoder.training and not encoder.encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    before = {k: v.clone() for k, v in encoder.state_dict().items()}  # weights and BatchNorm statistics
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        loss = head(encoder(torch.randn(8, 3, 32, 32)).vector).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert head.weight.grad is not None
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_weights_of_another_width_fail_at_start_up_in_one_line(tmp_path, shapes_tiny):
    from tests.helpers.runs import run_train

    path = tmp_path / "cnn16.pt"
    torch.save(SmallCNN(16).state_dict(), path)
    proc = run_train(["--config", "hash_64bit.yaml", f"data.root={shapes_tiny}", f"run.root={tmp_path}",
                      f"model.image_encoder.init={path}", "model.image_encoder.width=32"], cwd=tmp_path)
    assert proc.returncode == 2
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "model.image_encoder.width" in error and str(path) in error
