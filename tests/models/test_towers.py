"""Towers that really fine-tune (pipeline/models/towers.py): train mode with dropout in training and eval
mode for validation, a frozen tower always in eval mode, locking all but the last blocks
(`unlocked_layers`) and activation checkpointing (`grad_checkpointing`). On transformers models of the
real classes, tiny and random, saved to disk and loaded by path as a user's config names them (loaded
back in eval mode, as from_pretrained hands every model back), and on the shapes cnn."""
import copy
import re
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.models.encoders import HFTextEncoder, SmallCNN, build_text_encoder, prepare
from pipeline.training.build import build_module, complete_config
from pipeline.training.module import encode

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shapes_tokenizer(shapes_tiny):
    from pipeline.data import DatasetCard, load_tokenizer

    return load_tokenizer(DatasetCard.read(shapes_tiny), None)


@pytest.fixture(scope="module")
def towers(tmp_path_factory, shapes_tokenizer) -> dict:
    """A 3-layer BERT over the shapes vocabulary and a 2-layer ViT for 64-pixel images, both with dropout."""
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    small = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32, "hidden_dropout_prob": 0.1}
    BertModel(BertConfig(vocab_size=len(shapes_tokenizer), num_hidden_layers=3, **small),
              add_pooling_layer=False).save_pretrained(root / "bert")
    ViTModel(ViTConfig(image_size=64, patch_size=16, num_hidden_layers=2, **small)).save_pretrained(root / "vit")
    return {"bert": root / "bert", "vit": root / "vit"}


def tiny_config(shapes_tiny, *overrides):
    return complete_config(load_config("fine_grained.yaml", [
        f"data.root={shapes_tiny}", "data.batch_size=8", "data.eval_batch_size=16", "data.num_workers=0",
        "model.image_encoder.init=null", "model.image_encoder.width=16", "model.head_hidden=16", "model.embed_dim=8",
        "optim.warmup_steps=0", *overrides]))


def fit(cfg, max_steps: int, callbacks=()):
    """A real Trainer fit of the config's module on its shapes shards (`data.steps_per_epoch` steps between
    validations); returns (module, trainer)."""
    from pipeline.data import RetrievalDataModule

    datamodule = RetrievalDataModule(cfg.data, seed=0)
    L.seed_everything(0, verbose=False)
    module = build_module(cfg, datamodule.card.num_images("train"), len(datamodule.tokenizer),
                          datamodule.tokenizer.pad_token_id or 0)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1, callbacks=list(callbacks))
    trainer.fit(module, datamodule=datamodule)
    return module, trainer


class ModeProbe(L.Callback):
    """At every training and validation batch: each tower's modes, and whether two forwards of it on the
    batch differ (dropout at work)."""

    def __init__(self):
        self.seen = {"train": [], "val": []}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen["train"].append(self.look(module, batch))

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self.seen["val"].append(self.look(module, batch))

    @staticmethod
    def look(module, batch) -> dict:
        with torch.no_grad():
            text = [module.text_encoder(**batch["text"]).vector for _ in range(2)]
            image = [encode(module.image_encoder, batch["images"]).vector for _ in range(2)]
        return {"text_modes": {m.training for m in module.text_encoder.modules()},
                "image_modes": {m.training for m in module.image_encoder.modules()},
                "text_differs": not torch.equal(*text), "image_differs": not torch.equal(*image)}


def test_fine_tuned_tower_trains_with_dropout_and_frozen_one_never(shapes_tiny, towers):
    cfg = tiny_config(shapes_tiny, f"model.text_encoder.name={towers['bert']}",
                      f"model.image_encoder.name={towers['vit']}", "model.image_encoder.freeze=true",
                      "data.steps_per_epoch=2")
    probe = ModeProbe()
    module, _ = fit(cfg, max_steps=4, callbacks=[probe])
    train, val = probe.seen["train"], probe.seen["val"]
    assert len(train) == 4 and len(val) == 2  # steps 3 and 4 come after the first validation
    for step in train:  # the fine-tuned BERT: every module in train mode, dropout changes its output
        assert step["text_modes"] == {True} and step["text_differs"]
        assert step["image_modes"] == {False} and not step["image_differs"]  # the frozen ViT (dropout 0.1 too)
    for batch in val:
        assert batch["text_modes"] == batch["image_modes"] == {False}
        assert not batch["text_differs"] and not batch["image_differs"]
    assert {m.training for m in module.text_encoder.modules()} == {True}  # back in train mode after validation


def test_unlocked_layers_freeze_all_but_the_last_blocks(shapes_tiny, towers):
    """BERT (3 layers) keeps its last one; the cnn keeps its last stage and the flattening layer after it.
    Locked parameters get no gradient, no optimizer state, and do not change; their modules stay in eval
    mode (BatchNorm keeps its statistics) while the rest trains."""
    cfg = tiny_config(shapes_tiny, f"model.text_encoder.name={towers['bert']}", "model.text_encoder.unlocked_layers=1",
                      "model.image_encoder.unlocked_layers=1")
    from pipeline.data import RetrievalDataModule

    datamodule = RetrievalDataModule(cfg.data, seed=0)
    L.seed_everything(0, verbose=False)  # the initialisation fit() starts from
    before = {k: v.clone() for k, v in build_module(cfg, 1, len(datamodule.tokenizer)).state_dict().items()}
    module, trainer = fit(cfg, max_steps=2)
    names = {p: n for n, p in module.named_parameters()}
    in_optimizer = {names[p] for p in trainer.optimizers[0].state}
    text, image = module.text_encoder, module.image_encoder
    unlocked = {n for n, p in module.named_parameters() if p.requires_grad}
    pooler = {f"text_encoder.model.pooler.dense.{n}" for n in ("weight", "bias")}  # after the blocks, unused
    assert {n for n in unlocked if n.startswith("text_encoder.")} == pooler | {
        f"text_encoder.{n}" for n, _ in text.model.encoder.layer[2].named_parameters(prefix="model.encoder.layer.2")}
    assert {n for n in unlocked if n.startswith("image_encoder.")} == {
        f"image_encoder.{n}" for n, p in image.named_parameters() if n.startswith(("features.18.", "features.19.",
                                                                                   "features.21.", "features.22.",
                                                                                   "flatten."))}
    assert in_optimizer == unlocked - pooler  # the heads and logit scale, the last blocks; nothing locked
    state = module.state_dict()
    for name, param in module.named_parameters():
        assert torch.equal(state[name], before[name]) != (name in in_optimizer), name  # trained iff unlocked
    assert not text.model.embeddings.training and not text.model.encoder.layer[1].training
    assert text.model.encoder.layer[2].training and image.flatten.training
    assert not image.features[1].training and image.features[19].training
    bn_locked, bn_trained = "image_encoder.features.1.running_mean", "image_encoder.features.19.running_mean"
    assert torch.equal(state[bn_locked], before[bn_locked]) and not torch.equal(state[bn_trained], before[bn_trained])


def encoder_section(**kwargs):
    base = {"name": "x", "unlocked_layers": None, "grad_checkpointing": False, "freeze": False}
    return SimpleNamespace(**{**base, **kwargs})


def test_unlocked_layers_and_checkpointing_refused_in_one_line(shapes_tiny, towers):
    refusals = [(["model.text_encoder.unlocked_layers=1", "model.text_encoder.freeze=true"], "drop one of them"),
                (["model.image_encoder.grad_checkpointing=true", "model.image_encoder.freeze=true"], "frozen tower"),
                (["model.image_encoder.unlocked_layers=5"], "the cnn encoder has 4 blocks"),
                (["model.text_encoder.unlocked_layers=3"], "the tiny_bert encoder has 2 blocks"),
                (["model.text_encoder.unlocked_layers=-1"], "must be null"),
                (["model.image_encoder.name=features", "model.image_encoder.init=null",
                  "model.image_encoder.unlocked_layers=0"], "`features` (precomputed) has none")]
    for overrides, message in refusals:
        with pytest.raises(ConfigError, match=re.escape(message)) as error:
            load_config("fine_grained.yaml", overrides)
        assert "\n" not in str(error.value)
    from transformers import AutoModel

    with pytest.raises(ConfigError, match="has 3 blocks: give at most 3"):  # known once the model is loaded
        prepare(HFTextEncoder(AutoModel.from_pretrained(towers["bert"])), encoder_section(unlocked_layers=4),
                "model.text_encoder")


def saved_and_gradients(encoder, inputs: tuple, weights: torch.Tensor):
    """One forward (seeded: the same dropout) and backward of a fixed linear function of the tokens and the
    vector: (loss, bytes kept for the backward, {name: gradient})."""
    kept = [0]

    def pack(t):
        kept[0] += t.numel() * t.element_size()
        return t

    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = encoder(*inputs)
    loss = (out.tokens * weights).sum() + out.vector.sum()
    loss.backward()
    return loss, kept[0], {n: p.grad for n, p in encoder.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tower", ["bert", "tiny_bert", "cnn"])
@pytest.mark.parametrize("unlocked", [None, 1])
def test_grad_checkpointing_keeps_loss_and_gradients_and_less_memory(towers, tower, unlocked):
    """float64 with dropout on (the recomputation replays the same masks): loss and every gradient equal
    within 1e-6 with and without checkpointing, also for the last block behind locked ones; fewer bytes kept
    for the backward (the checkpoints are really taken); BatchNorm statistics counted once."""
    from transformers import AutoModel

    torch.manual_seed(0)
    if tower == "cnn":
        model, inputs = SmallCNN(16).double(), (torch.randn(4, 3, 64, 64, dtype=torch.float64),)
        weights = torch.randn(4, 16, 16, dtype=torch.float64)
    else:
        if tower == "bert":
            model = HFTextEncoder(AutoModel.from_pretrained(towers["bert"])).double()
        else:
            cfg = encoder_section(name="tiny_bert", width=16, layers=2, heads=2, pooling="auto")
            model = build_text_encoder(cfg, 40, 12).double()
        ids = torch.randint(5, 40, (4, 12))
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0
        inputs, weights = (ids, mask), torch.randn(4, 12, 16, dtype=torch.float64)
    plain = prepare(copy.deepcopy(model), encoder_section(unlocked_layers=unlocked), "k")
    light = prepare(copy.deepcopy(model), encoder_section(unlocked_layers=unlocked, grad_checkpointing=True), "k")
    loss, kept, grads = saved_and_gradients(plain, inputs, weights)
    loss_ckpt, kept_ckpt, grads_ckpt = saved_and_gradients(light, inputs, weights)
    assert torch.allclose(loss, loss_ckpt, rtol=0, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys()
    last_block = {"cnn": "features.21.weight", "bert": "model.encoder.layer.2.output.dense.weight",
                  "tiny_bert": "model.encoder.layer.1.output.dense.weight"}[tower]
    assert last_block in grads and (unlocked is None or len(grads) < len(list(plain.parameters())))
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_ckpt[name], rtol=0, atol=1e-6), name
    assert kept_ckpt < 0.75 * kept
    for key, value in plain.state_dict().items():  # BatchNorm's running statistics, its batch count
        assert torch.equal(value, light.state_dict()[key]), key
    if tower != "cnn":  # and dropout was on in both
        with torch.no_grad():
            assert not torch.equal(light(*inputs).tokens, light(*inputs).tokens)
