"""Image and text encoders: plain nn.Modules that return a global vector and token features.

Every encoder returns `Encoded(vector [B, D], tokens [B, T, D], mask [B, T])`: the
global vector feeds the retrieval heads; tokens (CNN cells, ViT patches, word
pieces) are there for token-level alignment objectives.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import ConfigError


@dataclass
class Encoded:
    vector: torch.Tensor  # [B, D]
    tokens: torch.Tensor  # [B, T, D]
    mask: torch.Tensor  # [B, T] bool, True where a token is real


class SmallCNN(nn.Module):
    """Four stride-2 conv stages, then the 4x4 grid flattened: the grid keeps *where* things are,
    which global average pooling would throw away (captions say "top left")."""

    def __init__(self, width: int = 128, grid: int = 4):
        super().__init__()
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

    def forward(self, images: torch.Tensor) -> Encoded:
        grid = self.features(images)  # [B, C, g, g]
        tokens = grid.flatten(2).transpose(1, 2)  # [B, g*g, C]
        vector = self.flatten(grid.flatten(1))
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Encoded(vector, tokens, mask)


class HFVisionEncoder(nn.Module):
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


class HFTextEncoder(nn.Module):
    """Any transformers text model (BERT-style, CLIP's text tower, ...)."""

    def __init__(self, model: nn.Module, pooling: str = "cls"):
        super().__init__()
        self.model = getattr(model, "text_model", model)
        self.pooling = pooling
        self.out_dim = self.model.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Encoded:
        tokens = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.bool()
        if self.pooling == "mean":
            weights = mask.unsqueeze(-1).to(tokens.dtype)
            vector = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)
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


def build_image_encoder(cfg, init=None) -> nn.Module:
    """`cfg` is a config's model.image_encoder section; `init` a weights file for the cnn
    (pipeline.training.backbone.resolve_init resolves `cfg.init`; None starts from random weights)."""
    if cfg.name == "cnn":
        encoder = SmallCNN(width=cfg.width)
        if init is not None:
            load_weights(encoder, init)
    elif cfg.name == FEATURES:
        encoder = FeatureInput(cfg.width)
    else:
        from transformers import AutoModel

        encoder = HFVisionEncoder(AutoModel.from_pretrained(cfg.name))
    return Frozen(encoder) if cfg.freeze else encoder


def build_text_encoder(cfg, vocab_size: int, max_len: int, pad_token_id: int = 0) -> nn.Module:
    """`cfg` is a config's model.text_encoder section; tiny_bert is built from scratch (no download)."""
    encoder = _text_encoder(cfg, vocab_size, max_len, pad_token_id)
    return Frozen(encoder) if cfg.freeze else encoder


def _text_encoder(cfg, vocab_size: int, max_len: int, pad_token_id: int) -> nn.Module:
    if cfg.name == FEATURES:
        return FeatureInput(cfg.width)
    if cfg.name == "tiny_bert":
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers,
                            num_attention_heads=cfg.heads, intermediate_size=4 * cfg.width,
                            max_position_embeddings=max(64, max_len), pad_token_id=pad_token_id)
        return HFTextEncoder(BertModel(config, add_pooling_layer=False), pooling=cfg.pooling)
    from transformers import AutoModel

    return HFTextEncoder(AutoModel.from_pretrained(cfg.name), pooling=cfg.pooling)
