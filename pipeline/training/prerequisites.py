"""What a run needs from outside its own config before it trains, checked at start-up with one-line
errors: labels on the training split for an objective that learns from them, and the distillation
teacher of an instance-level hashing run (a trained fine-grained run, rebuilt from its folder, frozen,
that must read this run's batches exactly as it read its own)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.config import ConfigError
from pipeline.training.restore import RunError, restore_module

TEACHER_KEY = "hash.instance.teacher"
# the inputs a teacher sees: the student's batches must be what its own training fed it
SAME_INPUTS = ("image_size", "mean", "std", "max_text_len", "tokenizer")


def check_prerequisites(cfg, datamodule) -> "FrozenTeacher | None":
    """Raises ConfigError naming the key and the fix; returns the distillation teacher when one is set
    (the training module's `teacher`)."""
    card = datamodule.card
    if cfg.model.kind == "hash" and not card.labelled("train"):
        key = ("hash.objective=supervised" if cfg.hash.objective == "supervised"
               else "hash.label_weight > 0" if cfg.hash.label_weight > 0 else None)
        if key:
            raise ConfigError(f"{key} learns from labels, but the training split of {card.root} has none: train on a "
                              f"labelled dataset (COCO, shapes), or choose hash.objective=ucch or instance "
                              f"with hash.label_weight=0")
    path = cfg.hash.instance.teacher if cfg.model.kind == "hash" and cfg.hash.objective == "instance" else None
    return load_teacher(path, cfg, datamodule.tokenizer) if path else None


def load_teacher(path: str, cfg, tokenizer) -> "FrozenTeacher":
    try:
        teacher_cfg, module, teacher_data, _ = restore_module(path)
    except RunError as e:
        raise ConfigError(f"config key '{TEACHER_KEY}': {e}; give a trained fine-grained run folder") from None
    if teacher_cfg.model.kind != "fine_grained":
        raise ConfigError(f"config key '{TEACHER_KEY}' is {path}, a {teacher_cfg.model.kind} run; a teacher is a "
                          f"trained fine-grained run (python train.py --config fine_grained.yaml)")
    differ = [f"data.{k}: {teacher_cfg.data[k]} vs {cfg.data[k]}" for k in SAME_INPUTS
              if teacher_cfg.data[k] != cfg.data[k]]
    vocab = getattr(tokenizer, "get_vocab", lambda: None)()
    if vocab != getattr(teacher_data.tokenizer, "get_vocab", lambda: None)():
        differ.append("the tokenizer's vocabulary")
    if differ:
        raise ConfigError(f"config key '{TEACHER_KEY}': the teacher {path} reads its inputs otherwise than this run "
                          f"({'; '.join(differ)}); it encodes this run's batches, so train it on the same data with "
                          f"the same settings")
    return FrozenTeacher(module)


class FrozenTeacher:
    """A trained module used for its embeddings only: eval mode, no gradients, on the student's device.
    A plain object, not a submodule: it is neither trained nor saved in the student's checkpoints."""

    def __init__(self, module: torch.nn.Module):
        self.module = module.eval().requires_grad_(False)

    @torch.no_grad()
    def embed(self, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised embeddings of the batch's images and captions."""
        self.module.to(device)  # a no-op once there
        images, text = self.module.encode_images(batch["images"]), self.module.encode_texts(batch["text"])
        return F.normalize(images.float(), dim=1), F.normalize(text.float(), dim=1)
