"""A config's LightningModule: encoders and heads built from the config and injected."""
from __future__ import annotations

from pipeline.config import to_dict
from pipeline.models.encoders import build_image_encoder, build_text_encoder
from pipeline.models.token_scorers import build_token_scorer
from pipeline.training.aligner import FineGrainedAligner
from pipeline.training.backbone import resolve_init
from pipeline.training.hasher import CrossModalHasher
from pipeline.training.module import RetrievalModule
from pipeline.training.token_aligner import TokenAligner


def module_class(cfg) -> type[RetrievalModule]:
    """The LightningModule class of the config's model family (its class attributes say what it logs)."""
    return {"fine_grained": FineGrainedAligner, "fine_grained_tokens": TokenAligner}.get(cfg.model.kind,
                                                                                        CrossModalHasher)


def build_module(cfg, num_train_items: int, vocab_size: int, pad_token_id: int = 0,
                 load_init: bool = True) -> RetrievalModule:
    """The config's module. `load_init=False` skips `model.image_encoder.init` (and pretraining the
    shapes backbone): for a module whose weights come from a checkpoint next."""
    image_encoder = build_image_encoder(cfg.model.image_encoder, resolve_init(cfg) if load_init else None)
    text_encoder = build_text_encoder(cfg.model.text_encoder, vocab_size, cfg.data.max_text_len, pad_token_id)
    optim = {k: cfg.optim[k] for k in ("lr", "weight_decay", "warmup_steps", "schedule")}
    if cfg.model.kind == "fine_grained":
        a = cfg.align
        return FineGrainedAligner(image_encoder, text_encoder, optim, cfg.model.embed_dim, cfg.model.head_hidden,
                                  a.loss, a.init_temperature, a.max_logit_scale, a.margin)
    if cfg.model.kind == "fine_grained_tokens":
        align = {k: cfg.align[k] for k in ("loss", "init_temperature", "max_logit_scale", "margin")}
        return TokenAligner(image_encoder, text_encoder, optim, cfg.model.embed_dim, cfg.model.head_hidden, align,
                            to_dict(cfg.tokens), build_token_scorer(cfg.tokens))
    h = cfg.hash
    return CrossModalHasher(image_encoder, text_encoder, optim, cfg.model.bits, cfg.model.head_hidden,
                            num_train_items, h.alpha, h.tau, h.momentum, h.num_negatives, h.margin, h.shift,
                            h.warmup_epochs, h.label_weight, h.label_scale, cfg.run.seed)
