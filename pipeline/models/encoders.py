"""Image and text encoders: plain nn.Modules that return a global vector and token features.

Every encoder returns `Encoded(vector [B, D], tokens [B, T, D], mask [B, T])`: the
global vector feeds the retrieval heads; tokens (CNN cells, ViT patches, word
pieces) are there for token-level alignment objectives.
"""
from __future__ import annotations

import pickle

import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.models import openclip
from pipeline.models.encoded import Encoded
from pipeline.models.towers import Stack, Tower, checkpointed, find_stack

__all__ = ["Encoded", "FEATURES", "build_image_encoder", "build_text_encoder", "image_statistics"]

CNN_STATISTICS = ([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])  # what the shapes cnn is trained with
# text models whose attention is causal: the first token sees nothing, so they pool at the end of the text
CAUSAL_TEXT_TYPES = ("clip_text_model", "clip", "gpt2", "gpt_neo", "gptj", "llama", "mistral", "qwen2", "opt")


class SmallCNN(Tower):
    """Four stride-2 conv stages, then the 4x4 grid flattened: the grid keeps *where* things are,
    which global average pooling would throw away (captions say "top left"). Its blocks (to lock or
    checkpoint) are the four stages; the flattening layer runs after them."""

    STAGE_LAYERS = 6  # conv, norm, relu, conv, norm, relu: one flat Sequential keeps saved weights' names

    def __init__(self, width: int = 128, grid: int = 4):
        super().__init__()
        self.checkpointing = False
        chans = [3, width // 4, width // 2, width, width]
        stages = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            stages += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True), nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(grid))
        self.flatten = nn.Linear(width * grid * grid, width)
        self.out_dim = width
        self.token_positions = grid * grid  # tokens always at the same places: token heads may learn where

    def stages(self) -> list[nn.Sequential]:
        n = self.STAGE_LAYERS
        return [self.features[i:i + n] for i in range(0, len(self.features) - 1, n)]

    def stack(self) -> Stack:
        return Stack(self.stages(), after=[self.flatten])

    def enable_checkpointing(self, key: str) -> None:
        self.checkpointing = True

    def _stage(self, x: torch.Tensor, index: int) -> torch.Tensor:
        for layer in list(self.features)[index * self.STAGE_LAYERS:(index + 1) * self.STAGE_LAYERS]:
            x = layer(x)
        return x

    def forward(self, images: torch.Tensor) -> Encoded:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            x = images
            for index, stage in enumerate(self.stages()):  # locked stages (eval mode) keep nothing anyway
                x = checkpointed(lambda t, i=index: self._stage(t, i), x, stage) if stage[0].training else stage(x)
            grid = self.features[-1](x)
        else:
            grid = self.features(images)  # [B, C, g, g]
        tokens = grid.flatten(2).transpose(1, 2)  # [B, g*g, C]
        vector = self.flatten(grid.flatten(1))
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Encoded(vector, tokens, mask)


class HFTower(Tower):
    """A transformers model's blocks: its encoder layers; checkpointed by transformers itself."""

    def stack(self) -> Stack:
        return find_stack(self, f"the transformers model {type(self.model).__name__}")

    def enable_checkpointing(self, key: str) -> None:
        model = self.model
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"config key '{key}': transformers cannot checkpoint {type(model).__name__}; set it "
                              f"to false")
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})  # reentrant checkpoints give no gradient behind locked blocks
        # transformers also makes the word embeddings' output require a gradient (what reentrant checkpoints
        # need): that would build a graph through locked blocks for nothing
        if hasattr(model, "_require_grads_hook"):  # transformers 4.x removes a hook it may not have made
            model.disable_input_require_grads()


class HFVisionEncoder(HFTower):
    """Any transformers vision model (ViT, CLIP's vision tower, ...), by hub name, local path or instance."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = getattr(model, "vision_model", model)  # CLIPModel -> its vision tower
        self.out_dim = self.model.config.hidden_size

    def forward(self, images: torch.Tensor) -> Encoded:
        out = self.model(pixel_values=images)
        tokens = out.last_hidden_state
        pooled = getattr(out, "pooler_output", None)
        vector = pooled if pooled is not None else tokens[:, 0]
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Encoded(vector, tokens, mask)


class HFTextEncoder(HFTower):
    """Any transformers text model (BERT-style, CLIP's text tower, ...).

    Pooling: `cls` the first token (BERT's [CLS]); `eot` the last real token, where a causal model
    (CLIP's text tower, GPT-style) has seen the whole caption (its first token is the same vector for
    every caption); `mean` the mean over real tokens; `auto` eot for causal models, else cls."""

    def __init__(self, model: nn.Module, pooling: str = "auto"):
        super().__init__()
        self.model = getattr(model, "text_model", model)
        config = self.model.config
        causal = bool(getattr(config, "is_decoder", False)) or config.model_type in CAUSAL_TEXT_TYPES
        if causal and pooling == "cls":
            raise ConfigError(f"config key 'model.text_encoder.pooling' is cls: the first token of a causal text "
                              f"model ({config.model_type}) is the same for every caption; use auto or eot")
        self.pooling = ("eot" if causal else "cls") if pooling == "auto" else pooling
        self.out_dim = config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Encoded:
        tokens = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.bool()
        if self.pooling == "mean":
            weights = mask.unsqueeze(-1).to(tokens.dtype)
            vector = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)
        elif self.pooling == "eot":  # the last real token, whichever side the padding is on
            last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
            vector = tokens[torch.arange(len(tokens), device=tokens.device), last]
        else:
            vector = tokens[:, 0]
        return Encoded(vector, tokens, mask)


class FeatureInput(nn.Module):
    """Precomputed features as the encoder output (feature shards, `python -m pipeline.features`):
    the heads train on top of frozen-backbone vectors, as UCCH and most hashing work do.
    Selected by the encoder name `features`; `width` is the feature dimension (dataset.json
    `features.image_dim` / `text_dim`). Shards made with `--tokens` also hand it each item's tokens."""

    def __init__(self, dim: int):
        super().__init__()
        self.feature_dim = self.out_dim = dim

    def forward(self, features: torch.Tensor, tokens: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> Encoded:
        """`tokens [B, T, D]` and `mask [B, T]` come from shards made with `--tokens`; without them the
        vector is the one token."""
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"expected features of shape [batch, {self.feature_dim}], got {list(features.shape)}: "
                             f"set the encoder's width to the dataset card's feature dimension")
        if tokens is None:
            tokens, mask = features.unsqueeze(1), torch.ones(features.shape[0], 1, dtype=torch.bool,
                                                             device=features.device)
        return Encoded(features, tokens, mask)


class Frozen(nn.Module):
    """An encoder used as a fixed feature extractor: no gradients, and always in eval mode (BatchNorm
    keeps its pretrained statistics whatever Lightning's .train() asks), as UCCH trains its hash
    layers on fixed VGG features."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.out_dim = encoder.out_dim
        self.token_dim = getattr(encoder, "token_dim", encoder.out_dim)
        self.token_positions = getattr(encoder, "token_positions", None)
        self.train(False)

    def train(self, mode: bool = True) -> "Frozen":
        return super().train(False)

    def forward(self, *args, **kwargs) -> Encoded:
        with torch.no_grad():
            return self.encoder(*args, **kwargs)


FEATURES = "features"  # the encoder name that reads precomputed features


def load_weights(encoder: nn.Module, path) -> nn.Module:
    """Load a state_dict file (plain, or under "state_dict" as the shapes backbone is saved)."""

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        encoder.load_state_dict(state.get("state_dict", state))
    except pickle.UnpicklingError:
        raise ConfigError(f"config key 'model.image_encoder.init': refused {path}: it holds Python objects beyond "
                          f"tensors and plain data, and unpickling them could run code") from None
    except RuntimeError:
        raise ConfigError(f"config key 'model.image_encoder.init': the weights in {path} do not fit this "
                          f"encoder; check model.image_encoder.width") from None
    return encoder


def image_statistics(cfg) -> tuple[list[float], list[float]]:
    """(mean, std) of the image encoder's own input normalisation (`cfg`: model.image_encoder), what
    data.mean / data.std default to: open_clip's of the backbone, else the shapes cnn's."""
    if openclip.is_open_clip(cfg.name):
        return openclip.statistics(cfg.name, cfg.init)
    return list(CNN_STATISTICS[0]), list(CNN_STATISTICS[1])


def build_image_encoder(cfg, init=None) -> nn.Module:
    """`cfg` is a config's model.image_encoder section; `init` where its weights come from (resolved by
    pipeline.training.backbone.resolve_init): a weights file for the cnn, a pretrained tag or a file for
    open_clip; None starts from random weights."""
    if cfg.name == "cnn":
        encoder = SmallCNN(width=cfg.width)
        if init is not None:
            load_weights(encoder, init)
    elif cfg.name == FEATURES:
        encoder = FeatureInput(cfg.width)
    elif openclip.is_open_clip(cfg.name):
        encoder = openclip.build_vision(cfg, None if init is None else str(init))
    else:
        from transformers import AutoModel

        encoder = HFVisionEncoder(AutoModel.from_pretrained(cfg.name))
    return prepare(encoder, cfg, "model.image_encoder")


def build_text_encoder(cfg, vocab_size: int, max_len: int, pad_token_id: int = 0, init=None) -> nn.Module:
    """`cfg` is a config's model.text_encoder section; tiny_bert is built from scratch (no download);
    `init`: an open_clip text tower's weights (a pretrained tag or a file), None for random ones."""
    encoder = _text_encoder(cfg, vocab_size, max_len, pad_token_id, init)
    return prepare(encoder, cfg, "model.text_encoder")


def prepare(encoder: nn.Module, cfg, key: str) -> nn.Module:
    """The built encoder as its config section says it trains: its blocks locked (`unlocked_layers`) and
    checkpointed (`grad_checkpointing`); frozen, or in train mode: transformers hands models back from
    from_pretrained in eval mode, and Lightning keeps each module in the mode it finds it in, so a
    fine-tuned tower would otherwise train without dropout. Lightning's validation and test loops switch
    everything to eval mode and back."""
    if (cfg.unlocked_layers is not None or cfg.grad_checkpointing) and not isinstance(encoder, Tower):
        raise ConfigError(f"config keys '{key}.unlocked_layers' / '{key}.grad_checkpointing': the {cfg.name} "
                          f"encoder has no blocks to lock or checkpoint; set them to null / false")
    if cfg.unlocked_layers is not None:
        encoder.lock(cfg.unlocked_layers, f"{key}.unlocked_layers")
    if cfg.grad_checkpointing:
        encoder.enable_checkpointing(f"{key}.grad_checkpointing")
    return Frozen(encoder) if cfg.freeze else encoder.train()


def _text_encoder(cfg, vocab_size: int, max_len: int, pad_token_id: int, init) -> nn.Module:
    if cfg.name == FEATURES:
        return FeatureInput(cfg.width)
    if openclip.is_open_clip(cfg.name):
        return openclip.build_text(cfg, init)
    if cfg.name == "tiny_bert":
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers,
                            num_attention_heads=cfg.heads, intermediate_size=4 * cfg.width,
                            max_position_embeddings=max(64, max_len), pad_token_id=pad_token_id)
        return HFTextEncoder(BertModel(config, add_pooling_layer=False), pooling=cfg.pooling)
    from transformers import AutoModel

    return HFTextEncoder(AutoModel.from_pretrained(cfg.name), pooling=cfg.pooling)
