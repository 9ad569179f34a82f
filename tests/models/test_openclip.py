"""open_clip backbones on their real code path: a tiny architecture registered with open_clip here, randomly
initialised (no download), built through the config, trained one step by train.py's main and encoded by
the restored run. Skipped only where the openclip extra is not installed (FICO_REQUIRE_OPEN_CLIP=1,
set by .ci/run, turns that into a failure)."""
import json
import os

import pytest
import torch

from pipeline.config import load_config

if os.environ.get("FICO_REQUIRE_OPEN_CLIP") == "1":
    import open_clip
else:
    open_clip = pytest.importorskip("open_clip", reason="the openclip extra is not installed")

ARCH = "fico-tiny-clip"
TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
BOTH = [f"model.image_encoder.name=open_clip:{ARCH}", f"model.text_encoder.name=open_clip:{ARCH}",
        "model.image_encoder.init=null"]
DEEP = "fico-tiny-clip-2"  # the same with two blocks a side: one to lock, one to train
DEEP_CFG = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "layers": 2}, "text_cfg": {**TINY["text_cfg"], "layers": 2}}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def tiny_architecture(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open_clip")
    for name, arch in ((ARCH, TINY), (DEEP, DEEP_CFG)):
        (folder / f"{name}.json").write_text(json.dumps(arch))
        open_clip.add_model_config(folder / f"{name}.json")
    return ARCH


def test_encoders_tokenizer_and_end_of_text_pooling():
    from pipeline.training.build import build_module, complete_config, model_tokenizer

    cfg = complete_config(load_config("fine_grained.yaml", BOTH))
    assert cfg.data.mean == pytest.approx(list(open_clip.constants.OPENAI_DATASET_MEAN))  # the backbone's own
    tok = model_tokenizer(cfg)
    batch = tok(["a red circle", "a small blue square on the left of a green star"])
    assert batch["input_ids"].shape == (2, 24)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.tolist() == [5, 13] and batch["input_ids"][0, 4] == tok.tokenizer.eot_token_id
    torch.manual_seed(0)
    module = build_module(cfg, 1, len(tok), 0).eval()
    with torch.no_grad():
        image = module.image_encoder(torch.randn(3, 3, 64, 64))
        text = module.text_encoder(**batch)
    assert image.vector.shape == (3, 16) and image.tokens.shape == (3, 16, 32)  # 4 x 4 patches at width 32
    assert text.vector.shape == (2, 16) and text.tokens.shape == (2, 24, 32) and text.mask.sum() == 18
    assert module.text_encoder.token_dim == module.image_encoder.token_dim == 32
    assert torch.allclose(text.tokens[0, 0], text.tokens[1, 0], atol=1e-6)  # causal: the start token alone
    assert not torch.allclose(text.vector[0], text.vector[1], atol=1e-3)  # pooled at the end of each text


def test_config_statistics_override_and_image_size_check():
    from pipeline.config import ConfigError
    from pipeline.training.build import complete_config

    coco = complete_config(load_config("coco_fine_grained_openclip.yaml"))  # ViT-B-32, its LAION-2B tag's statistics
    tag = open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")
    assert list(coco.data.mean) == pytest.approx(list(tag.get("mean") or open_clip.constants.OPENAI_DATASET_MEAN))

    cfg = complete_config(load_config("fine_grained.yaml", BOTH + ["data.mean=[0.1,0.2,0.3]"]))
    assert list(cfg.data.mean) == [0.1, 0.2, 0.3]
    with pytest.raises(ConfigError, match="data.image_size=64"):
        complete_config(load_config("fine_grained.yaml", BOTH + ["data.image_size=32"]))
    with pytest.raises(ConfigError, match="pretrained tag"):
        from pipeline.training.build import build_module
        build_module(complete_config(load_config("fine_grained.yaml", [*BOTH[:2], "model.image_encoder.init=nope"])),
                     1, 10)


def test_tiny_open_clip_run_trains_one_step_and_encodes(shapes_tiny, tmp_path, monkeypatch):
    from pipeline.inference.runs import load_run
    from pipeline.training.cli import main as train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = ["--config", "fine_grained.yaml", *BOTH, f"data.root={shapes_tiny}", "data.batch_size=8",
            "data.num_workers=0", "trainer.max_steps=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
            "data.eval_batch_size=16", "model.head_hidden=16", "model.embed_dim=8", "logger.wandb=false",
            f"run.root={tmp_path}", "run.name=oc"]
    assert train(args) == 0
    run_dir = tmp_path / "oc"
    assert json.loads((run_dir / "model.json").read_text())["tokenizer"] == "open_clip"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 1
    before = ckpt["state_dict"]
    run = load_run(run_dir)
    texts = run.inputs.tokenize(["a red circle", "a blue square"])
    with torch.inference_mode():
        vectors = run.module.encode_texts(texts)
        images = run.module.encode_images(torch.randn(2, 3, 64, 64))
    assert vectors.shape == images.shape == (2, 8)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(vectors[0], vectors[1], atol=1e-3)
    key = next(k for k in before if k.startswith("text_encoder.text.transformer"))
    assert torch.equal(run.module.state_dict()[key], before[key])  # the trained tower, restored


def deep_towers(*overrides):
    """Both open_clip towers of the two-block architecture, built through the config, from seed 0."""
    from pipeline.training.build import build_module, complete_config

    cfg = complete_config(load_config("fine_grained.yaml", [
        f"model.image_encoder.name=open_clip:{DEEP}", f"model.text_encoder.name=open_clip:{DEEP}",
        "model.image_encoder.init=null", *overrides]))
    torch.manual_seed(0)
    module = build_module(cfg, 1, 49408, 0)
    return module.image_encoder, module.text_encoder


def test_open_clip_unlocked_layers_keep_the_last_block_and_what_follows():
    image, text = deep_towers("model.image_encoder.unlocked_layers=1", "model.text_encoder.unlocked_layers=1")
    trained = {n for n, p in [*image.named_parameters(), *text.named_parameters()] if p.requires_grad}
    assert {n.split(".")[1] for n in trained} == {"transformer", "ln_post", "proj", "ln_final", "text_projection"}
    assert {n.split(".")[3] for n in trained if ".resblocks." in n} == {"1"}  # the last block only
    frozen = {n for n, p in [*image.named_parameters(), *text.named_parameters()] if not p.requires_grad}
    assert {"visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight",
            "text.token_embedding.weight", "text.positional_embedding"} <= frozen
    assert any(".resblocks.0." in n for n in frozen)
    image.train()  # what Lightning's loops do: the locked parts stay in eval mode, the rest trains
    assert image.visual.training and image.visual.transformer.resblocks[1].training and image.visual.ln_post.training
    assert not image.visual.transformer.resblocks[0].training and not image.visual.ln_pre.training
    assert text.text.training and not text.text.token_embedding.training


@pytest.mark.parametrize("unlocked", [None, 1])
def test_open_clip_grad_checkpointing_keeps_loss_and_gradients(unlocked):
    """open_clip's own block checkpoints, non-reentrant: equal loss and gradients (also for the block behind a
    locked one, which a reentrant checkpoint would leave without any), fewer bytes kept for the backward."""
    lock = [] if unlocked is None else [f"model.{s}_encoder.unlocked_layers={unlocked}" for s in ("image", "text")]
    plain = deep_towers(*lock)
    light = deep_towers(*lock, *[f"model.{s}_encoder.grad_checkpointing=true" for s in ("image", "text")])
    torch.manual_seed(1)
    images, ids = torch.randn(2, 3, 64, 64), torch.randint(1, 49000, (2, 24))
    mask = torch.ones_like(ids)

    def step(image, text):
        kept = [0]

        def pack(t):
            kept[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            a, b = image(images), text(ids, mask)
        loss = (a.vector * b.vector).sum() + a.tokens.square().mean() + b.tokens.square().mean()
        loss.backward()
        grads = {n: p.grad for n, p in [*image.named_parameters(), *text.named_parameters()] if p.grad is not None}
        return loss, kept[0], grads

    loss, kept, grads = step(*plain)
    loss_ckpt, kept_ckpt, grads_ckpt = step(*light)
    assert torch.allclose(loss, loss_ckpt, rtol=0, atol=1e-6) and grads.keys() == grads_ckpt.keys()
    for tower in ("visual", "text"):  # the last block: behind a locked one when unlocked is 1
        assert f"{tower}.transformer.resblocks.1.mlp.c_fc.weight" in grads
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_ckpt[name], rtol=0, atol=1e-6), name
    assert kept_ckpt < kept
