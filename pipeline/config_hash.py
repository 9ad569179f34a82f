"""The hashing family's part of the config schema (`hash.*`), kept beside `pipeline/config.py`, which
holds it in `Config` and runs `hash_checks` with its other start-up checks.

    hash.objective    ucch | supervised | instance: the loss on the relaxed codes
    hash.prefixes     nested codes: shorter lengths trained and evaluated as codes of their own
    hash.binary_weight  the share of the objective scored on the binary codes themselves
    hash.*            UCCH's settings (and its optional label term)
    hash.supervised.* DCMH's term weights          hash.instance.* the instance objective's
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

OBJECTIVES = ("ucch", "supervised", "instance")


@dataclass
class SupervisedHashConfig:
    """DCMH-style supervised hashing (hash.objective=supervised); needs labels on the training split."""

    scale: float = 0.5  # Theta = scale * <h_x, h_y>, the pairwise likelihood's logit (DCMH: 1/2)
    quant_weight: float = 1.0  # gamma: ||B - H||^2 towards each pair's shared code B = sign(h_x + h_y)
    balance_weight: float = 1.0  # eta: each bit's squared mean over the batch


@dataclass
class InstanceHashConfig:
    """Instance-level hashing (hash.objective=instance): InfoNCE on the codes' cosines."""

    scale: float = 24.0  # logit = scale * cosine of the relaxed codes (a temperature on Hamming distances)
    quant_weight: float = 0.0  # (|h| - 1)^2 towards the signs; > 0 saturates tanh and slowed learning (benchmarks.md)
    teacher: Optional[str] = None  # a trained fine-grained run folder to distil from; null: no distillation
    distill_weight: float = 1.0  # KL of the teacher's in-batch similarity softmax to the codes'
    teacher_scale: float = 20.0  # logit = teacher_scale * the teacher's cosine
    joint_weight: float = 0.0  # > 0: a model.embed_dim embedding trained beside the codes teaches them (no teacher run)


@dataclass
class HashConfig:
    """UCCH (Hu et al., TPAMI 2022); defaults from the paper (docs/methods.md). With `objective`, the
    other hashing objectives; with `prefixes`, nested codes of any of them."""

    objective: str = "ucch"  # ucch | supervised | instance
    prefixes: list[int] = field(default_factory=list)  # e.g. [16, 32, 64] of a 128-bit code: each a code too
    binary_weight: float = 0.0  # share of the objective on straight-through binary codes (sign forward)
    binarise_over: float = 0.0  # fraction of training over which binary_weight and quant weights grow from 0
    alpha: float = 0.7  # weight of the contrastive (memory-bank) loss vs the cross-modal ranking loss
    tau: float = 0.9  # temperature of the contrastive loss
    momentum: float = 0.4  # delta of the memory-bank update
    num_negatives: int = 4096
    margin: float = 0.2  # m of the ranking loss
    shift: float = 0.1  # xi: how much easy negatives are shifted down
    warmup_epochs: int = 1  # in-batch negatives and no momentum while epoch < warmup_epochs
    label_weight: float = 0.0  # > 0 adds a supervised label-similarity loss (DCMH-style); 0 = pure UCCH
    label_scale: float = 5.0  # cosine -> logit scale of that loss
    supervised: SupervisedHashConfig = field(default_factory=SupervisedHashConfig)
    instance: InstanceHashConfig = field(default_factory=InstanceHashConfig)


def hash_checks(h, bits: int) -> list[tuple[bool, str, str]]:
    """(ok, key, why not) for every `hash.*` value the types allow but training cannot use."""
    s, i = h.supervised, h.instance
    prefixes = list(h.prefixes)
    return [
        (h.objective in OBJECTIVES, "hash.objective", f"is {h.objective!r}; allowed: {', '.join(OBJECTIVES)}"),
        (all(p % 8 == 0 and 0 < p < bits for p in prefixes) and len(set(prefixes)) == len(prefixes),
         "hash.prefixes", f"is {prefixes}: distinct multiples of 8 below model.bits ({bits}), e.g. [16, 32, 64]"),
        (0.0 <= h.binary_weight <= 1.0, "hash.binary_weight", "must be in [0, 1]"),
        (0.0 <= h.binarise_over <= 1.0, "hash.binarise_over", "must be in [0, 1] (a fraction of training)"),
        (0.0 <= h.alpha <= 1.0, "hash.alpha", "must be in [0, 1]"),
        (h.tau > 0, "hash.tau", "must be positive"),
        (0.0 <= h.momentum < 1.0, "hash.momentum", "must be in [0, 1)"),
        (h.num_negatives > 0, "hash.num_negatives", "must be positive"),
        (h.margin >= 0 and h.shift >= 0, "hash.margin/shift", "must be >= 0"),
        (h.warmup_epochs >= 0, "hash.warmup_epochs", "must be >= 0"),
        (h.label_weight >= 0 and h.label_scale > 0, "hash.label_weight/label_scale", "must be >= 0 / positive"),
        (s.scale > 0, "hash.supervised.scale", "must be positive"),
        (s.quant_weight >= 0 and s.balance_weight >= 0, "hash.supervised.quant_weight/balance_weight",
         "must be >= 0"),
        (i.scale > 0 and i.teacher_scale > 0, "hash.instance.scale/teacher_scale", "must be positive"),
        (i.quant_weight >= 0 and i.distill_weight >= 0 and i.joint_weight >= 0,
         "hash.instance.quant_weight/distill_weight/joint_weight", "must be >= 0"),
        (not i.teacher or h.objective == "instance", "hash.instance.teacher",
         f"is set, but hash.objective is {h.objective!r}: only the instance objective distils from a teacher"),
    ]
