"""Experiment configuration: a typed schema, YAML inheritance and key=value overrides.

A config file may name a parent with `base: other.yaml` (relative to its own folder) and overrides only what
changes. Everything is checked against the dataclass schema (the `tokens` section: config_tokens.py) before any
work starts: an unknown key, a wrong type or an impossible value raises `ConfigError` with one line naming the
key, what is allowed and, for typos, the closest valid keys."""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline import config_checks, config_tokens
from pipeline.config_checks import PIPE, template_problem  # noqa: F401 (for the data stream: a command handed to it)
from pipeline.config_hash import HashConfig

# configs/ at the top of a checkout; inside the package once installed from a wheel
CONFIG_DIR = next((d for d in (Path(__file__).resolve().parent / "configs", Path(__file__).resolve().parent.parent /
                               "configs") if d.is_dir()), Path(__file__).resolve().parent.parent / "configs")


class ConfigError(ValueError):
    """A configuration problem, explained in one line."""


@dataclass
class DataConfig:
    root: Optional[str] = None  # folder holding dataset.json (or its http(s):// URL); None builds the shapes default
    shapes_dir: str = "data/shapes"  # where the shapes default is built on first use
    batch_size: int = 128  # per device
    eval_batch_size: int = 256
    num_workers: int = 2
    shuffle_buffer: int = 1000
    steps_per_epoch: Optional[int] = None  # None: one pass over the training images across all ranks
    image_size: int = 64  # evaluation resizes the shorter side to this and centre-crops a square
    mean: Optional[list[float]] = None  # None: the image encoder's own (open_clip's, else 0.5 ...)
    std: Optional[list[float]] = None  # None: the image encoder's own (open_clip's, else 0.25 ...)
    augment: str = "none"  # none | crop (random resized crops in training; captions may name position, size)
    # shards from elsewhere than data.root (an object store): a command ("pipe:aws s3 cp s3://b/p/{shard} -")
    # or URL template, {shard} being a name from dataset.json. Only from the user's config, never from a card.
    shard_url_command: Optional[str] = None
    shard_retries: int = 3  # a shard from a server or a command is re-read this many times before it is skipped
    shard_retry_wait: float = 1.0  # seconds before the first retry (doubling after each)
    shard_timeout: float = 60.0  # seconds a shard read may wait for data before it counts as failed
    max_text_len: int = 48  # shapes captions reach 36 tokens; truncation would drop objects
    tokenizer: Optional[str] = None  # None: the dataset's tokenizer.json (open_clip text: its own); a hub name or path


@dataclass
class EncoderConfig:
    name: str = "cnn"  # image: cnn | a transformers vision model; text: tiny_bert | a transformers text model;
    # either side: open_clip:<architecture> (the openclip extra; its tokenizer comes with the text side)
    width: int = 128  # cnn channels of the last stage / tiny_bert hidden size
    layers: int = 2  # tiny_bert layers
    heads: int = 2  # tiny_bert attention heads
    pooling: str = "auto"  # text: auto (eot for causal models such as CLIP's, else cls) | cls | eot | mean
    init: Optional[str] = None  # weights to start from: cnn: a .pt file or "shapes"; open_clip: a tag or a file
    init_steps: int = 500  # pretraining steps of the "shapes" backbone (made once, cached in data/backbones)
    freeze: bool = False  # a fixed feature extractor: no gradients, BatchNorm statistics kept
    unlocked_layers: Optional[int] = None  # train only the last N blocks (and the final norm, projection); null: all
    grad_checkpointing: bool = False  # recompute the blocks' activations in the backward: less memory, more time


@dataclass
class ModelConfig:
    kind: str = "hash"  # hash | fine_grained | fine_grained_tokens (token-level, section `tokens`)
    image_encoder: EncoderConfig = field(default_factory=EncoderConfig)
    text_encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(name="tiny_bert"))
    embed_dim: int = 256  # fine-grained embedding size
    bits: int = 64  # hash code length
    head_hidden: int = 512  # hidden width of the hash / embedding MLP heads


@dataclass
class AlignConfig:
    loss: str = "infonce"  # infonce | vse_max_violation
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    margin: float = 0.2  # VSE++ hinge margin


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | constant
    grad_clip: float = 1.0  # 0 disables
    accum_steps: int = 1  # chunks of data.batch_size per optimizer step; negatives span all of them (GradCache)


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    max_steps: int = -1
    accelerator: str = "auto"  # auto | cpu | gpu | cuda | mps | tpu
    devices: Any = 1  # as Lightning takes it: a count, -1 (all), "auto", "0,1", or a list of device indices
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn | ddp_fork | fsdp | deepspeed ... (Lightning's names)
    precision: str = "32-true"  # Lightning's: 32-true | bf16-mixed | 16-mixed | 64-true | bf16-true | 32 | bf16 ...
    log_every_n_steps: int = 10
    ckpt_every_n_steps: int = 200  # periodic last.ckpt against crashes and SIGTERM pre-emption
    collective_timeout: float = 600.0  # seconds a rank waits in a collective for a peer before it gives up
    limit_val_batches: Any = None  # None: all; a fraction in (0, 1] or a number of batches
    limit_test_batches: Any = None
    compile: bool = False  # torch.compile the encoders for training (ours, not a Trainer argument)


@dataclass
class LoggerConfig:
    wandb: bool = True
    project: str = "fico-itr"
    entity: Optional[str] = None
    mode: Optional[str] = None  # online | offline | disabled; None: online when logged in, else offline
    tags: list[str] = field(default_factory=list)
    log_model: bool = False  # upload best.ckpt as a W&B model artifact at the end (online runs only)


@dataclass
class RunConfig:
    name: Optional[str] = None  # default: the config file's stem
    root: str = "runs"
    id: Optional[str] = None  # fixed run id (resume it); default: from the SLURM job id or the name
    seed: int = 0
    train: bool = True  # false: evaluate the randomly initialised model (the untrained baseline)
    monitor: Optional[str] = None  # default: val/i2t_mAP@N (hash; val/rsum when val has no labels) or val/rsum
    allow_changes: list[str] = field(default_factory=list)  # keys a resume may change, e.g. [trainer.max_epochs]


@dataclass
class Config:
    base: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    hash: HashConfig = field(default_factory=HashConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    tokens: config_tokens.TokensConfig = field(default_factory=config_tokens.TokensConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run: RunConfig = field(default_factory=RunConfig)


CHOICES = {
    "model.kind": ("hash", "fine_grained", "fine_grained_tokens"),
    "model.text_encoder.pooling": ("auto", "cls", "eot", "mean"),
    "model.image_encoder.pooling": ("auto", "cls", "eot", "mean"),
    "data.augment": ("none", "crop"),
    "align.loss": ("infonce", "vse_max_violation"),
    "optim.schedule": ("cosine", "constant"),
    "logger.mode": (None, "online", "offline", "disabled"),
    # What Lightning 2.x accepts (tests/test_config.py compares these with Lightning's own lists), kept
    # here so that a typo fails before torch and Lightning are even imported.
    "trainer.accelerator": ("auto", "cpu", "gpu", "cuda", "mps", "tpu"),
    "trainer.precision": ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true",
                          "bf16-mixed", "32-true", "64-true", "64", "32", "16", "bf16"),
    "trainer.strategy": ("auto", "ddp", "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true",
                         "ddp_fork", "ddp_fork_find_unused_parameters_false", "ddp_fork_find_unused_parameters_true",
                         "ddp_notebook", "ddp_notebook_find_unused_parameters_false",
                         "ddp_notebook_find_unused_parameters_true", "ddp_spawn",
                         "ddp_spawn_find_unused_parameters_false", "ddp_spawn_find_unused_parameters_true",
                         "deepspeed", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload",
                         "deepspeed_stage_3", "deepspeed_stage_3_offload", "deepspeed_stage_3_offload_nvme", "fsdp",
                         "fsdp_cpu_offload", "single_device", "single_tpu", "single_xla", "xla", "xla_debug"),
}


def resolve_path(name: str) -> Path:
    """`name` as given when it exists, else looked up in configs/."""
    for candidate in (Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config '{name}' not found (looked in . and {CONFIG_DIR}); "
                      f"available: {', '.join(sorted(p.name for p in CONFIG_DIR.glob('*.yaml')))}")


def _read_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The YAML at `path` merged over its `base:` chain (child wins)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config inheritance loops: {' -> '.join(p.name for p in seen + (path,))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = path.parent / base if (path.parent / base).is_file() else resolve_path(base)
    return _deep_merge(_read_with_bases(base_path, seen + (path,)), data)


def _deep_merge(parent: dict, child: dict) -> dict:
    out = dict(parent)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _check_keys(user: dict, schema: type, prefix: str = "") -> None:
    """Unknown keys fail with the closest valid names (OmegaConf's message is multi-line)."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in user.items():
        full = f"{prefix}{key}"
        if full == "trainer.accumulate_grad_batches":  # Lightning's: per-chunk losses, no pooled negatives
            raise ConfigError("'trainer.accumulate_grad_batches' sums per-chunk losses, each seeing only its own "
                              "chunk's negatives: use optim.accum_steps=N (one step over N chunks of "
                              "data.batch_size whose loss sees the negatives of all of them)")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            hint = f"did you mean {' or '.join(repr(prefix + c) for c in close)}? " if close else ""
            raise ConfigError(f"unknown config key '{full}': {hint}allowed under "
                              f"'{prefix.rstrip('.') or '<top>'}': {', '.join(fields)}")
        sub = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        if isinstance(value, dict) and sub is not None and dataclasses.is_dataclass(sub()):
            _check_keys(value, type(sub()), f"{full}.")


def _parse_overrides(overrides: list[str]) -> dict:
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. optim.lr=3e-4)")
        key, raw = item.split("=", 1)
        if key.strip() == "base":
            raise ConfigError("'base' cannot be set on the command line (it names a YAML file's parent): train "
                              "another experiment with --config NAME.yaml, or write a YAML file with "
                              "`base: NAME.yaml` and your changes")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as e:  # e.g. `optim.lr=[`: the value is parsed as YAML, as in a config file
            raise ConfigError(f"override '{item}': the value is not valid YAML ({getattr(e, 'problem', None) or e}); "
                              f"quote it for a string (key='\"...\"') or close the brackets") from None
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def load_config(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Load `name` (a path or a file in configs/), apply `key=value` overrides, validate."""
    path = resolve_path(name)
    user = _deep_merge(_read_with_bases(path), _parse_overrides(overrides or []))
    _check_keys(user, Config)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), user)
    except OmegaConfBaseException as e:
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"config key '{getattr(e, 'full_key', '?')}': {msg}") from None
    if cfg.run.name is None:
        cfg.run.name = path.stem
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Values the types allow but the pipeline (or Lightning, later) cannot run with."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' is {value!r}; allowed: {', '.join(map(str, allowed))}")
    unknown = [k for k in cfg.run.allow_changes if not _is_key(k)]
    for ok, key, why in [*config_checks.checks(cfg), (not unknown, "run.allow_changes", f"names unknown keys: {unknown}")]:
        if not ok:
            raise ConfigError(f"config key '{key}' {why}")


def _is_key(dotted: str) -> bool:
    node: Any = Config
    for part in dotted.split("."):
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return False
        f = fields[part]
        node = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        node = type(node) if dataclasses.is_dataclass(node) else node
    return True


def trainer_devices(cfg):
    """trainer.devices as Lightning takes it (a YAML list arrives as an OmegaConf ListConfig)."""
    devices = cfg.trainer.devices
    return list(devices) if isinstance(devices, ListConfig) else devices


def flat(d: dict, prefix: str = "") -> dict:
    """A nested config dict as {"dotted.key": value}, the names overrides and sweeps use."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
