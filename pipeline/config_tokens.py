"""The `tokens` section of the config schema (pipeline/config.py): token-level alignment, used by
`model.kind: fine_grained_tokens` (docs/methods.md). Its own module so that the schema's sections stay
apart; `pipeline.config` includes it in `Config` and in the start-up checks."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokensConfig:
    scorer: str = "late_interaction"  # late_interaction (FILIP / ColBERT) | cross_attention (SCAN)
    dim: int = 128  # width of the token embeddings both sides are projected to (L2-normalised)
    text_ends: str = "keep"  # keep | drop: a caption's first and last token ([CLS]/[SEP], CLIP's start/end) in its token set
    direction: str = "both"  # the score: t2i (words find regions) | i2t (regions find words) | both (their mean)
    pooling: str = "lse"  # cross_attention: lse | avg, the pooling of word (region) relevances
    attention_scale: float = 9.0  # cross_attention: SCAN's lambda_1, inverse temperature of the attention
    pooling_scale: float = 6.0  # cross_attention: SCAN's lambda_2, of the LogSumExp pooling
    loss: str = "infonce"  # infonce | vse_max_violation, on the token scores of in-batch pairs
    init_temperature: float = 0.07  # infonce: learnable temperature of the token scores
    max_logit_scale: float = 100.0  # infonce: clamp of its inverse
    margin: float = 0.2  # vse_max_violation: hinge margin
    global_weight: float = 1.0  # weight of the global embedding's loss (align.*): the screen, trained jointly
    val_scoring: str = "screened"  # screened (global top screen_k re-ranked by tokens) | exhaustive
    test_scoring: str = "exhaustive"  # the same choice for the test split
    screen_k: int = 100  # K of screened scoring; >= the gallery size is exhaustive
    block_elements: int = 1 << 20  # token similarities per scoring block (bounds evaluation memory)


CHOICES = {
    "tokens.scorer": ("late_interaction", "cross_attention"),
    "tokens.direction": ("both", "t2i", "i2t"),
    "tokens.text_ends": ("keep", "drop"),
    "tokens.pooling": ("lse", "avg"),
    "tokens.loss": ("infonce", "vse_max_violation"),
    "tokens.val_scoring": ("screened", "exhaustive"),
    "tokens.test_scoring": ("screened", "exhaustive"),
}


def checks(cfg) -> list[tuple[bool, str, str]]:
    """(ok, key, why) for the values the types allow but training cannot use."""
    t = cfg.tokens
    out = []
    for key, allowed in CHOICES.items():
        value = t[key.split(".", 1)[1]]
        out.append((value in allowed, key, f"is {value!r}; allowed: {', '.join(allowed)}"))
    return out + [
        (t.dim > 0, "tokens.dim", "must be positive"),
        (t.attention_scale > 0 and t.pooling_scale > 0, "tokens.attention_scale/pooling_scale", "must be positive"),
        (t.init_temperature > 0, "tokens.init_temperature", "must be positive"),
        (t.max_logit_scale >= 1.0 / t.init_temperature, "tokens.max_logit_scale",
         "must be at least 1 / tokens.init_temperature (the starting scale)"),
        (t.margin >= 0, "tokens.margin", "must be >= 0"),
        (t.global_weight >= 0, "tokens.global_weight", "must be >= 0"),
        (t.screen_k >= 1, "tokens.screen_k", "must be >= 1"),
        (t.block_elements >= 1, "tokens.block_elements", "must be >= 1"),
    ]
