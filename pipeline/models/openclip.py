"""open_clip backbones: `model.image_encoder.name: open_clip:<architecture>` (and the same for text).

open_clip is an optional extra (`pip install -e ".[openclip]"`; it brings timm and torchvision). The
architecture is any name open_clip knows (`open_clip.list_models()`, or one registered with
`open_clip.add_model_config`); `init` says where the weights come from: an open_clip pretrained tag
(`openai`, `laion2b_s34b_b79k`, ...; downloaded by open_clip into its cache on first use), a local
checkpoint file, or null for random weights. Both towers come from one CLIP model, so a config names
the same architecture and init on both sides to start from a pretrained pair.

What the encoders return, like the others (`Encoded`): `vector` is the tower's output in CLIP's joint
space (what `encode_image` / `encode_text` give, `out_dim` = the model's embed_dim), `tokens` the last
layer's patch or word tokens at the transformer's width (`token_dim`), `mask` which tokens are real.
The text tower is causal and pools at its end-of-text token, as open_clip's own model does.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.models.encoded import Encoded
from pipeline.models.towers import Stack, Tower, find_stack

PREFIX = "open_clip:"


def is_open_clip(name: str | None) -> bool:
    return bool(name) and str(name).startswith(PREFIX)


def architecture(name: str) -> str:
    return name[len(PREFIX):]


def import_open_clip():
    """open_clip, or a one-line ConfigError saying how to install it."""
    try:
        import open_clip
    except ModuleNotFoundError as e:
        raise ConfigError(f"open_clip encoders need the openclip extra ({e}): pip install -e \".[openclip]\" "
                          f"(with a torchvision built for this torch: docs/inference.md)") from None
    return open_clip


def model_config(name: str, key: str) -> dict:
    """open_clip's architecture config of `name` (a ConfigError naming `key` when it is unknown)."""
    open_clip = import_open_clip()
    cfg = open_clip.get_model_config(architecture(name))
    if cfg is None:
        known = ", ".join(open_clip.list_models()[:8])
        raise ConfigError(f"config key '{key}': open_clip has no architecture '{architecture(name)}' "
                          f"(open_clip.list_models(): {known}, ...)")
    return cfg


def create_model(name: str, init: str | None, key: str) -> nn.Module:
    """The open_clip model (text as its own tower), its weights from `init`: a pretrained tag, a file, or
    None (random)."""
    open_clip = import_open_clip()
    model_config(name, f"{key}.name")
    arch = architecture(name)
    if init is not None and not Path(init).expanduser().is_file() and not open_clip.is_pretrained_cfg(arch, init):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise ConfigError(f"config key '{key}.init' is {init!r}: neither a file nor a pretrained tag of "
                          f"open_clip:{arch} (its tags: {tags}); or null for random weights")
    pretrained = str(Path(init).expanduser()) if init and Path(init).expanduser().is_file() else init
    try:
        return open_clip.create_model(arch, pretrained=pretrained, force_custom_text=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:  # offline, a file that does not fit
        # (or holds Python objects: open_clip loads files weights_only too)
        raise ConfigError(f"config key '{key}.init': cannot load open_clip:{arch} weights {init!r} "
                          f"({str(e).splitlines()[0][:200]}); give a local checkpoint file, or null") from None


def statistics(name: str, init: str | None) -> tuple[list[float], list[float]]:
    """The image normalisation the backbone was trained with: its pretrained tag's, else CLIP's (what
    open_clip itself uses for a model without one)."""
    open_clip = import_open_clip()
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    tag_cfg = open_clip.get_pretrained_cfg(architecture(name), init) if init else {}
    mean = tag_cfg.get("mean") or OPENAI_DATASET_MEAN
    std = tag_cfg.get("std") or OPENAI_DATASET_STD
    return [float(v) for v in mean], [float(v) for v in std]


def image_size(name: str) -> int | None:
    size = model_config(name, "model.image_encoder.name").get("vision_cfg", {}).get("image_size")
    return size if isinstance(size, int) else (size[0] if size else None)


CHECKPOINTS_NON_REENTRANT = (2, 32)  # open_clip's first release whose block checkpoints are non-reentrant


class OpenClipTower(Tower):
    """An open_clip tower's blocks: its transformer's resblocks (a ResNet tower has none to lock);
    checkpointed by open_clip itself, whose checkpoints are non-reentrant since 2.32: a reentrant one gives
    no gradient to blocks behind locked ones, so older releases are refused."""

    def tower(self) -> nn.Module:
        raise NotImplementedError

    def stack(self) -> Stack:
        return find_stack(self, f"the open_clip tower {type(self.tower()).__name__}")

    def enable_checkpointing(self, key: str) -> None:
        from importlib.metadata import version

        release = version("open_clip_torch")
        if tuple(int(p) for p in release.split(".")[:2] if p.isdigit()) < CHECKPOINTS_NON_REENTRANT:
            raise ConfigError(f"config key '{key}': open_clip {release} checkpoints reentrantly (no gradient behind "
                              f"locked blocks); pip install 'open_clip_torch>=2.32', or set it to false")
        if not hasattr(self.tower(), "set_grad_checkpointing"):
            raise ConfigError(f"config key '{key}': open_clip cannot checkpoint {type(self.tower()).__name__}; set "
                              f"it to false")
        self.tower().set_grad_checkpointing(True)


class OpenClipVision(OpenClipTower):
    """An open_clip image tower: global vector in the joint space, and its patch tokens."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        if hasattr(visual, "output_tokens"):
            visual.output_tokens = True
        self.out_dim = int(visual.output_dim)
        self.token_dim = int(getattr(getattr(visual, "transformer", None), "width", self.out_dim))

    def tower(self) -> nn.Module:
        return self.visual

    def forward(self, images: torch.Tensor):
        out = self.visual(images)
        vector, tokens = out if isinstance(out, tuple) else (out, out.unsqueeze(1))
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Encoded(vector, tokens, mask)


class OpenClipText(OpenClipTower):
    """An open_clip text tower: pooled at the end-of-text token (its own pooling), and the word tokens."""

    def __init__(self, text: nn.Module):
        super().__init__()
        self.text = text
        if hasattr(text, "output_tokens"):
            text.output_tokens = True
        self.out_dim = int(text.output_dim)
        self.token_dim = int(getattr(text, "width", self.out_dim))

    def tower(self) -> nn.Module:
        return self.text

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = self.text(input_ids)  # causal: padding after the end-of-text token changes nothing before it
        vector, tokens = out if isinstance(out, tuple) else (out, out.unsqueeze(1))
        mask = attention_mask[:, :tokens.shape[1]].bool() if tokens.shape[1] > 1 else \
            torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Encoded(vector, tokens, mask)


def build_vision(cfg, init: str | None) -> OpenClipVision:
    return OpenClipVision(create_model(cfg.name, init, "model.image_encoder").visual)


def build_text(cfg, init: str | None) -> OpenClipText:
    return OpenClipText(create_model(cfg.name, init, "model.text_encoder").text)


class OpenClipTokenizer:
    """open_clip's tokenizer of an architecture behind the interface the data stream calls (a
    transformers tokenizer's): ids padded to the model's context length (its causal mask and positions
    are sized by it), and an attention mask that ends at each caption's end-of-text token."""

    pad_token_id = 0

    def __init__(self, name: str):
        open_clip = import_open_clip()
        self.name = name
        self.tokenizer = open_clip.get_tokenizer(architecture(name))
        text_cfg = model_config(name, "model.text_encoder.name").get("text_cfg", {})
        self.context_length = int(text_cfg.get("context_length", 77))
        self.vocab_size = int(getattr(self.tokenizer, "vocab_size", text_cfg.get("vocab_size", 49408)))

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, texts, padding=True, truncation=True, max_length=None, return_tensors="pt") -> dict:
        ids = self.tokenizer(list(texts), context_length=self.context_length).long()
        real = ids != self.pad_token_id
        # a caption's tokens run up to its last non-padding id (the end-of-text token)
        length = torch.where(real.any(1), ids.shape[1] - real.flip(1).long().argmax(1), 0)
        mask = (torch.arange(ids.shape[1])[None, :] < length[:, None]).long()
        return {"input_ids": ids, "attention_mask": mask}
