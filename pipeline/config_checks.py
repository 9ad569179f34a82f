"""The start-up checks of a config's values (pipeline/config.py runs them after the schema's type checks):
values the types allow but the pipeline, or Lightning later, cannot run with, each as (ok, key, why)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import ListConfig

from data_prep import is_url
from pipeline import config_tokens
from pipeline.config_hash import hash_checks

PIPE = "pipe:"


def checks(cfg) -> list[tuple[bool, str, str]]:
    d, m, h, a, o, t, r = cfg.data, cfg.model, cfg.hash, cfg.align, cfg.optim, cfg.trainer, cfg.run
    img, txt = m.image_encoder, m.text_encoder
    checks = [
        (d.batch_size > 1, "data.batch_size", "must be at least 2 (contrastive losses need negatives)"),
        (d.eval_batch_size > 0, "data.eval_batch_size", "must be positive"),
        (d.num_workers >= 0, "data.num_workers", "must be >= 0"),
        (d.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1"),
        (d.steps_per_epoch is None or d.steps_per_epoch >= 1, "data.steps_per_epoch", "must be null or >= 1"),
        (d.image_size > 0, "data.image_size", "must be positive"),
        (d.max_text_len > 1, "data.max_text_len", "must be at least 2 (the special tokens)"),
        (all(v is None or len(v) == 3 for v in (d.mean, d.std)), "data.mean/std", "need 3 values (RGB) or null"),
        (d.std is None or all(v > 0 for v in d.std), "data.std", "must be positive"),
        (not d.shard_url_command or not template_problem(d.shard_url_command), "data.shard_url_command",
         f"is {d.shard_url_command!r}: it {template_problem(d.shard_url_command or '{shard}')}"),
        (d.shard_retries >= 0, "data.shard_retries", "must be >= 0 (0: a failed shard is skipped at once)"),
        (d.shard_retry_wait >= 0, "data.shard_retry_wait", "must be >= 0 (seconds)"),
        (d.shard_timeout > 0, "data.shard_timeout", "must be positive (seconds)"),
        (not d.root or "://" not in d.root or is_url(d.root), "data.root",
         f"is {d.root!r}, neither a folder nor an http(s):// URL: for an object store, keep dataset.json in a folder "
         f"(or on a web server) and set data.shard_url_command, e.g. 'pipe:aws s3 cp s3://bucket/prefix/{{shard}} -'"),
        (m.bits > 0 and m.bits % 8 == 0, "model.bits",
         f"must be a positive multiple of 8 (codes are packed into bytes), got {m.bits}"),
        (m.embed_dim > 0, "model.embed_dim", "must be positive"),
        (m.head_hidden > 0, "model.head_hidden", "must be positive"),
        *hash_checks(h, m.bits),
        (a.init_temperature > 0, "align.init_temperature", "must be positive"),
        (a.max_logit_scale >= 1.0 / a.init_temperature, "align.max_logit_scale",
         "must be at least 1 / align.init_temperature (the starting scale)"),
        (a.margin >= 0, "align.margin", "must be >= 0"),
        (o.lr > 0, "optim.lr", "must be positive"),
        (o.weight_decay >= 0 and o.warmup_steps >= 0 and o.grad_clip >= 0, "optim.weight_decay/warmup_steps/grad_clip",
         "must be >= 0"),
        (o.accum_steps >= 1, "optim.accum_steps", "must be >= 1 (1: one chunk, no accumulation)"),
        (o.accum_steps == 1 or t.precision not in ("16-mixed", "16", "16-true"), "optim.accum_steps",
         f"> 1 cannot run with trainer.precision={t.precision}: the cached gradients of the representations are "
         f"not loss-scaled and fp16 would lose them; use trainer.precision=bf16-mixed (or 32-true)"),
        (t.max_epochs >= -1 and t.max_steps >= -1, "trainer.max_epochs/max_steps", "must be >= -1 (-1: no limit)"),
        (t.num_nodes > 0, "trainer.num_nodes", "must be positive"),
        (devices_ok(t.devices), "trainer.devices",
         f"is {t.devices!r}; Lightning takes a count (1, 2, ...), -1 (all), \"auto\", \"0,1\" or a list [0, 1] "
         f"(each device once)"),
        (t.log_every_n_steps >= 1, "trainer.log_every_n_steps", "must be >= 1"),
        (t.ckpt_every_n_steps >= 0, "trainer.ckpt_every_n_steps", "must be >= 0 (0 disables)"),
        (t.collective_timeout > 0, "trainer.collective_timeout",
         "must be a positive number of seconds (how long ranks wait for a peer in a collective)"),
        (limit_ok(t.limit_val_batches), "trainer.limit_val_batches",
         "must be null, a fraction in (0, 1] or a number of batches >= 1"),
        (limit_ok(t.limit_test_batches), "trainer.limit_test_batches",
         "must be null, a fraction in (0, 1] or a number of batches >= 1"),
        (0 <= r.seed < 2**32, "run.seed", "must be in [0, 2**32)"),
        (bool(r.root), "run.root", "must name a folder"),
        (r.monitor is None or str(r.monitor).startswith("val/"), "run.monitor",
         "must be a validation metric, e.g. val/rsum or val/i2t_mAP@N"),
    ]
    for side, enc in (("image", img), ("text", txt)):
        checks += [
            (bool(enc.name), f"model.{side}_encoder.name", "must name an encoder"),
            (enc.width > 0 and enc.layers > 0 and enc.heads > 0, f"model.{side}_encoder.width/layers/heads",
             "must be positive"),
            (enc.name != "tiny_bert" or enc.width % enc.heads == 0, f"model.{side}_encoder.heads",
             f"must divide model.{side}_encoder.width ({enc.width})"),
            *tower_checks(enc, f"model.{side}_encoder"),
        ]
    open_clip = [enc.name.startswith("open_clip:") for enc in (img, txt)]
    checks += [
        (img.init is None or img.name == "cnn" or open_clip[0], "model.image_encoder.init",
         "loads weights into the cnn or an open_clip tower (transformers models load theirs by name); set it to null"),
        (img.init in (None, "shapes") or open_clip[0] or Path(img.init).expanduser().is_file(), "model.image_encoder.init",
         f"is {img.init!r}: no such file; give a weights file, \"shapes\" (the built-in shapes backbone) or null"),
        (txt.init is None or open_clip[1], "model.text_encoder.init",
         "is for the cnn and open_clip towers only; transformers text models load their weights by name"),
        (img.init_steps > 0, "model.image_encoder.init_steps", "must be positive"),
    ]
    return checks + config_tokens.checks(cfg)


def tower_checks(enc, key: str) -> list[tuple[bool, str, str]]:
    """`unlocked_layers` and `grad_checkpointing` of one encoder section (a tower's own block count is checked
    when it is built)."""
    unlocked = enc.unlocked_layers
    blocks = {"cnn": 4, "tiny_bert": enc.layers}.get(enc.name)
    return [
        (unlocked is None or unlocked >= 0, f"{key}.unlocked_layers",
         "must be null (train every block) or >= 0 (0: only what runs after the blocks)"),
        (unlocked is None or not enc.freeze, f"{key}.unlocked_layers",
         f"is {unlocked} with {key}.freeze true: a frozen tower trains no block; drop one of them"),
        (not (enc.grad_checkpointing and enc.freeze), f"{key}.grad_checkpointing",
         f"is true with {key}.freeze true: a frozen tower keeps no activations to recompute; drop one of them"),
        (enc.name != "features" or (unlocked is None and not enc.grad_checkpointing), f"{key}.unlocked_layers",
         "and grad_checkpointing are for encoders with blocks; `features` (precomputed) has none: null / false"),
        (unlocked is None or blocks is None or unlocked <= blocks, f"{key}.unlocked_layers",
         f"is {unlocked}, but the {enc.name} encoder has {blocks} blocks: at most {blocks}, or null"),
    ]


def devices_ok(devices) -> bool:
    """What Lightning's Trainer(devices=...) accepts."""
    if isinstance(devices, (bool, int)):
        return not isinstance(devices, bool) and (devices >= 1 or devices == -1)
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            return True
        parts = [p.strip() for p in text.split(",")]
        if len(parts) == 1:
            return parts[0].isdigit() and int(parts[0]) >= 1
        listed = [p for p in parts if p]
        return all(p.isdigit() for p in listed) and any(parts) and len(set(map(int, listed))) == len(listed)
    if isinstance(devices, (list, ListConfig)):  # device indices: each once (a device twice is two ranks on one GPU)
        return (len(devices) > 0 and len(set(devices)) == len(devices)
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in devices))
    return False


def limit_ok(limit) -> bool:
    if limit is None or isinstance(limit, bool):
        return limit is None
    return limit >= 1 if isinstance(limit, int) else isinstance(limit, float) and 0.0 < limit <= 1.0


def template_problem(template: str) -> str | None:
    """What is wrong with a `data.shard_url_command` (None when it is usable)."""
    if "{shard}" not in template:
        return "must contain {shard} (replaced by each shard's name from dataset.json)"
    if not (template.startswith(PIPE) and template[len(PIPE):].strip() or is_url(template)):
        return ("must start with 'pipe:' (a command that writes the shard to stdout, e.g. "
                "'pipe:aws s3 cp s3://bucket/prefix/{shard} -') or be an http(s):// URL template")
    return None
