"""A config's LightningModule: encoders and heads built from the config and injected; and what the
config leaves to the encoders (their image statistics, their own tokenizer)."""
from __future__ import annotations

from pipeline.config import ConfigError, to_dict
from pipeline.evaluation.protocol import metric_names
from pipeline.models import openclip
from pipeline.models.encoders import build_image_encoder, build_text_encoder, image_statistics
from pipeline.models.token_scorers import build_token_scorer
from pipeline.training.aligner import FineGrainedAligner
from pipeline.training.backbone import resolve_init
from pipeline.training.hasher_instance import InstanceHasher
from pipeline.training.hasher_supervised import SupervisedHasher
from pipeline.training.hasher_ucch import CrossModalHasher
from pipeline.training.module import RetrievalModule
from pipeline.training.token_aligner import TokenAligner

HASHERS = {"ucch": CrossModalHasher, "supervised": SupervisedHasher, "instance": InstanceHasher}


def module_class(cfg) -> type[RetrievalModule]:
    """The LightningModule class of the config's model family (its class attributes say what it logs)."""
    if cfg.model.kind == "hash":
        return HASHERS[cfg.hash.objective]
    return {"fine_grained": FineGrainedAligner, "fine_grained_tokens": TokenAligner}[cfg.model.kind]


def logged_metric_names(cfg) -> list[str]:
    """The protocol names a run of this config logs at validation and test (without the stage): those
    of the model, and for nested codes the same under `<L>bit/` for every prefix."""
    names = metric_names(module_class(cfg).ks)
    prefixes = cfg.hash.prefixes if cfg.model.kind == "hash" else []
    return names + [f"{bits}bit/{name}" for bits in prefixes for name in names]


def complete_config(cfg):
    """Fills in what the config leaves to the image encoder, in place: data.mean / data.std when null
    (the backbone's own statistics), so that the resolved config a run saves says what it used. Checks
    that an open_clip image tower gets the image size it was built for."""
    enc = cfg.model.image_encoder
    if cfg.data.mean is None or cfg.data.std is None:
        mean, std = image_statistics(enc)
        cfg.data.mean = cfg.data.mean if cfg.data.mean is not None else mean
        cfg.data.std = cfg.data.std if cfg.data.std is not None else std
    if openclip.is_open_clip(enc.name) and (size := openclip.image_size(enc.name)) != cfg.data.image_size:
        raise ConfigError(f"config key 'data.image_size' is {cfg.data.image_size}, but {enc.name} takes "
                          f"{size} x {size} images: set data.image_size={size}")
    return cfg


def model_tokenizer(cfg):
    """The text encoder's own tokenizer when it has one (open_clip's, unless data.tokenizer names
    another), else None: the dataset's tokenizer.json, or data.tokenizer."""
    name = cfg.model.text_encoder.name
    if openclip.is_open_clip(name) and not cfg.data.tokenizer:
        return openclip.OpenClipTokenizer(name)
    return None


def build_module(cfg, num_train_items: int, vocab_size: int, pad_token_id: int = 0,
                 load_init: bool = True) -> RetrievalModule:
    """The config's module. `load_init=False` skips `model.*_encoder.init` (and pretraining the shapes
    backbone): for a module whose weights come from a checkpoint next. `trainer.compile` marks its
    encoders for torch.compile when training starts (RetrievalModule.on_fit_start), so that the tools that
    only encode with a trained run never pay for compiling."""
    module = _build_module(cfg, num_train_items, vocab_size, pad_token_id, load_init)
    module.compile_encoders = bool(cfg.trainer.compile)
    return module


def _build_module(cfg, num_train_items: int, vocab_size: int, pad_token_id: int,
                  load_init: bool) -> RetrievalModule:
    image_encoder = build_image_encoder(cfg.model.image_encoder, resolve_init(cfg) if load_init else None)
    text_init = cfg.model.text_encoder.init if load_init else None
    text_encoder = build_text_encoder(cfg.model.text_encoder, vocab_size, cfg.data.max_text_len, pad_token_id,
                                      text_init)
    optim = {k: cfg.optim[k] for k in ("lr", "weight_decay", "warmup_steps", "schedule", "grad_clip", "accum_steps")}
    if cfg.model.kind == "fine_grained":
        a = cfg.align
        return FineGrainedAligner(image_encoder, text_encoder, optim, cfg.model.embed_dim, cfg.model.head_hidden,
                                  a.loss, a.init_temperature, a.max_logit_scale, a.margin)
    if cfg.model.kind == "fine_grained_tokens":
        align = {k: cfg.align[k] for k in ("loss", "init_temperature", "max_logit_scale", "margin")}
        return TokenAligner(image_encoder, text_encoder, optim, cfg.model.embed_dim, cfg.model.head_hidden, align,
                            to_dict(cfg.tokens), build_token_scorer(cfg.tokens))
    h, codes = cfg.hash, (image_encoder, text_encoder, optim, cfg.model.bits, cfg.model.head_hidden)
    shared = {"prefixes": list(h.prefixes), "binary_weight": h.binary_weight, "binarise_over": h.binarise_over}
    if h.objective == "supervised":
        s = h.supervised
        return SupervisedHasher(*codes, s.scale, s.quant_weight, s.balance_weight, **shared)
    if h.objective == "instance":
        i = h.instance
        return InstanceHasher(*codes, i.scale, i.quant_weight, i.distill_weight, i.teacher_scale, **shared,
                              joint_weight=i.joint_weight, embed_dim=cfg.model.embed_dim,
                              init_temperature=cfg.align.init_temperature, max_logit_scale=cfg.align.max_logit_scale)
    return CrossModalHasher(*codes, num_train_items, h.alpha, h.tau, h.momentum, h.num_negatives, h.margin,
                            h.shift, h.warmup_epochs, h.label_weight, h.label_scale, cfg.run.seed, **shared)
