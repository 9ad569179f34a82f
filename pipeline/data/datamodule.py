"""The LightningDataModule: the dataset folder (on disk or on a server; or the shapes default, built on
first use), its tokenizer, and one stream per split for the trainer's rank."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from data_prep import DataError, DatasetCard, build_shapes, is_url
from pipeline.data.records import image_transform
from pipeline.data.shard_reader import ShardReader
from pipeline.data.stream import SharedEpoch, build_stream

log = logging.getLogger(__name__)


def load_tokenizer(card: DatasetCard, override: str | None = None):
    """The dataset's own tokenizer.json (trained by data_prep on training captions), or a pretrained
    tokenizer by hub name / local path when the config names one."""
    from transformers import AutoTokenizer

    if override:
        return AutoTokenizer.from_pretrained(override)
    if card.tokenizer and card.remote:  # read from the server into memory: nothing written to disk
        return wordpiece_tokenizer(text=card.file_bytes(card.tokenizer).decode("utf-8"))
    if not card.tokenizer or not (card.root / card.tokenizer).is_file():
        raise DataError(f"{card.root} has no tokenizer.json: re-run data_prep, or set data.tokenizer "
                        f"to a pretrained tokenizer (hub name or local path)")
    return wordpiece_tokenizer(card.root / card.tokenizer)


def wordpiece_tokenizer(path=None, text: str | None = None):
    """A tokenizer.json written by data_prep (its special tokens named; see data_prep/tokenizer.py), from
    its path or its text."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    source = {"tokenizer_file": str(path)} if text is None else {"tokenizer_object": Tokenizer.from_str(text)}
    return PreTrainedTokenizerFast(**source, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


class NoTokenizer:
    """Feature shards carry text features, not text: nothing to tokenize. Stands in where a vocabulary
    is asked for (the pad token alone: a `features` text encoder has no embedding table, and a
    mistaken text model still builds, so that `check_model_inputs` can name the mistake)."""

    pad_token_id = 0

    def __len__(self) -> int:
        return 1


def check_model_inputs(card: DatasetCard, model) -> None:
    """Feature shards need `features` encoders of the card's widths, image-and-text shards need real
    encoders: a DataError naming the fix, before any data is read."""
    for side in ("image", "text"):
        takes = getattr(getattr(model, f"{side}_encoder", None), "feature_dim", None)
        if card.features:
            dim = card.features[f"{side}_dim"]
            if takes != dim:
                raise DataError(f"{card.root} holds feature shards ({side} features of dim {dim}): set "
                                f"model.{side}_encoder.name=features model.{side}_encoder.width={dim} "
                                f"(as configs/*_features.yaml do)")
        elif takes is not None:
            raise DataError(f"model.{side}_encoder.name=features needs feature shards (made by "
                            f"`python -m pipeline.features`), but {card.root} holds images and text")
    if card.features and getattr(model, "token_scorer", None) is not None and not card.features.get("tokens"):
        raise DataError(f"{card.root} holds feature shards without token features, and a token-level model "
                        f"compares tokens: make them with `python -m pipeline.features ... --tokens`")


def resolve_dataset(cfg_data) -> Path | str:
    """data.root (a folder, or the http(s) URL of one: its card is fetched by `DatasetCard.read`), or the
    shapes default (built on first use)."""
    if cfg_data.root and is_url(cfg_data.root):
        return cfg_data.root
    if cfg_data.root:
        root = Path(cfg_data.root).expanduser()
        if not (root / "dataset.json").is_file():
            raise DataError(f"data.root={cfg_data.root}: no dataset.json there; build one with "
                            f"`python -m data_prep ...` or unset data.root for the shapes default")
        return root
    root = Path(cfg_data.shapes_dir).expanduser()
    if not (root / "dataset.json").is_file():
        log.warning("no dataset configured: building the shapes default in %s (once)", root)
    try:
        return build_shapes(root, image_size=cfg_data.image_size)
    except ValueError as e:  # e.g. an older generator's dataset in the same folder
        raise DataError(f"data.shapes_dir={cfg_data.shapes_dir}: {e}") from None


class RetrievalDataModule(L.LightningDataModule):
    """Shards of one dataset for train / val / test; rank and world size come from the trainer.
    `tokenizer`: the text encoder's own when it has one (open_clip's), else the dataset's (or
    data.tokenizer). `accum_steps`: chunks of data.batch_size in one training batch (optim.accum_steps:
    the module cuts it; a step of the loader is an optimizer step)."""

    def __init__(self, cfg_data, seed: int = 0, tokenizer=None, accum_steps: int = 1):
        super().__init__()
        self.cfg, self.seed, self.accum_steps = cfg_data, seed, accum_steps
        self.reader = ShardReader.from_config(cfg_data)  # before the card: a bad command fails first
        self.card = DatasetCard.read(resolve_dataset(cfg_data))
        if tokenizer is None:
            tokenizer = NoTokenizer() if self.card.features else load_tokenizer(self.card, cfg_data.tokenizer)
        self.tokenizer = tokenizer
        self.epoch = SharedEpoch()
        self.transform = image_transform(cfg_data.image_size, cfg_data.mean, cfg_data.std)
        self.num_train_batches: int | None = None
        self.test_split = self._test_split()

    def _test_split(self) -> str:
        """Decided at start-up, so that a run on a card without a test split (`data_prep wds` without
        --test) finishes: its test stage evaluates the val split instead, said once here."""
        if "test" in self.card.splits or "val" not in self.card.splits:
            return "test"
        log.warning("%s has no test split: the test stage evaluates the val split (test/* metrics and "
                    "test_metrics.json are val figures)", self.card.root)
        return "val"

    @property
    def num_categories(self) -> int:
        return len(self.card.categories)

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None and self.trainer.lightning_module is not None:
            check_model_inputs(self.card, self.trainer.lightning_module)

    def set_epoch(self, epoch: int) -> None:
        self.epoch.set(epoch)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _stream(self, split: str, train: bool):
        rank, world = self._rank_world()
        loader, n = build_stream(
            self.card, split, train=train, batch_size=self.cfg.batch_size * self.accum_steps if train else self.cfg.eval_batch_size,
            rank=rank, world=world, num_workers=self.cfg.num_workers, seed=self.seed, epoch=self.epoch,
            tokenizer=self.tokenizer, max_text_len=self.cfg.max_text_len, transform=self.transform,
            shuffle_buffer=self.cfg.shuffle_buffer, steps_per_epoch=self.cfg.steps_per_epoch, augment=self.cfg.augment,
            reader=self.reader)
        if train:
            self.num_train_batches = n
        return loader

    def train_dataloader(self):
        return self._stream("train", train=True)

    def val_dataloader(self):
        return self._stream("val", train=False)

    def test_dataloader(self):
        return self._stream(self.test_split, train=False)
