"""WebDataset shards -> batches, for one process of a (possibly distributed) run.

`build_stream` is the whole data stream in one function and knows its own size.
The rules it follows were each seen to fail here (shared/research/pipeline_conventions.md):
- training streams are resampled and cut to the same number of batches on every rank
  (`with_epoch` on the loader: on the dataset it would count per worker), full batches only;
- the resample / sample-shuffle seed differs per rank and worker and moves with the epoch,
  which reaches the workers through shared memory (Lightning never calls set_epoch on an
  IterableDataset);
- evaluation reads every record exactly once: shards are split by rank with the rank and world
  size taken from the trainer (never guessed from the environment), then by worker;
- a record that fails to decode, has no caption, or a label outside the card's categories is
  skipped and counted; the counts ride along with the next batch to the main process.
Feature shards (`python -m data_prep features`; the card has a `features` entry) go through the
same stream: `img.npy` takes the place of the pixels and each caption becomes its `txt.npy` row,
so batches carry `images` [B, D] and `text` = {"features": [N, D]} for `features` encoders.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import math
import multiprocessing as mp
import random
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import lightning as L
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import get_worker_info

log = logging.getLogger(__name__)

MAX_CAPTIONS = 1 << 16  # caption id = image index * MAX_CAPTIONS + caption number
TEXT_FEATURES_KEY = "txt.npy"  # feature shards: one row per caption, in the order of json captions


class DataError(ValueError):
    """A dataset that cannot be used, explained in one line."""


@dataclass
class DatasetCard:
    """`dataset.json`, written by data_prep next to the shards."""

    root: Path
    name: str
    categories: list[str]
    image_key: str
    tokenizer: str | None
    splits: dict
    features: dict | None = None  # feature shards: {"image_dim", "text_dim", "source_config", ...}

    @classmethod
    def read(cls, root: str | Path) -> "DatasetCard":
        root = Path(root)
        path = root / "dataset.json"
        if not path.is_file():
            raise DataError(f"no dataset card at {path}: point data.root at a folder made by "
                            f"`python -m data_prep ...`, or leave data.root empty for the shapes default")
        raw = json.loads(path.read_text())
        return cls(root, raw["name"], list(raw["categories"]), raw.get("image_key", "png"),
                   raw.get("tokenizer"), raw["splits"], raw.get("features"))

    def shards(self, split: str) -> list[str]:
        if split not in self.splits:
            raise DataError(f"{self.root}/dataset.json has no '{split}' split (has: {', '.join(self.splits)})")
        paths = [str(self.root / s) for s in self.splits[split]["shards"]]
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise DataError(f"{len(missing)} shard(s) of split '{split}' are missing, e.g. {missing[0]}: "
                            f"re-run data_prep into {self.root}")
        return paths

    def num_images(self, split: str) -> int:
        return int(self.splits[split]["num_images"])

    def shard_sizes(self, split: str) -> dict[str, int]:
        """Records per shard (path -> count), from the card, or counted in the tars for older cards."""
        urls = self.shards(split)
        sizes = self.splits[split].get("shard_sizes")
        if sizes is None or len(sizes) != len(urls):
            sizes = [count_records(u) for u in urls]
            self.splits[split]["shard_sizes"] = sizes  # once per process
        return dict(zip(urls, map(int, sizes)))

    def labelled(self, split: str) -> bool:
        """Whether the split's records carry category labels (category-level mAP needs them)."""
        entry = self.splits.get(split, {})
        return bool(self.categories) and int(entry.get("num_without_labels", 0)) < int(entry.get("num_images", 0))


def count_records(tar_path: str) -> int:
    """Records in a shard: distinct keys of its members (webdataset's grouping; headers only, the data
    is skipped). A damaged tar counts what it holds up to the damage."""
    keys = set()
    try:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.isfile():  # key = the name up to the first dot after the last slash
                    dot = member.name.find(".", member.name.rfind("/") + 1)
                    keys.add(member.name[:dot] if dot >= 0 else member.name)
    except (tarfile.TarError, OSError) as e:
        log.warning("%s: counted %d records before %s", tar_path, len(keys), e)
    return len(keys)


class SharedEpoch:
    """The epoch number in shared memory, so that persistent workers see it change."""

    def __init__(self, epoch: int = 0):
        self.value = mp.Value("i", epoch)

    def set(self, epoch: int) -> None:
        self.value.value = epoch

    def get(self) -> int:
        return self.value.value


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _stream_seed(seed: int, epoch: int, rank: int) -> int:
    """Distinct per (seed, epoch, rank, worker), reproducible."""
    worker, _ = _worker()
    return hash((seed, epoch, rank, worker)) & 0x7FFFFFFF


def shard_runs(sizes: dict[str, int], streams: int, seed: int, epoch: int) -> list[list[tuple[str, int, int]]]:
    """One pass over the training records cut into `streams` runs of equal length (within one record).

    The shards are put in a seeded order (the same on every rank, new every epoch and pass) and laid
    end to end; run s is the records [s * total / streams, (s + 1) * total / streams) of that
    sequence, as (shard, first record, end record) pieces. So every record is in exactly one run,
    whether shards outnumber the streams or not (the shapes set has 10 training shards: with 8 ranks
    x 2 workers most runs are part of a shard, and a shard is read by the runs that share it), and a
    short last shard only shortens the sequence."""
    order = list(sizes)
    random.Random(f"shard-order/{seed}/{epoch}").shuffle(order)
    total = sum(sizes[u] for u in order)
    runs: list[list[tuple[str, int, int]]] = [[] for _ in range(streams)]
    start = 0  # position of the current shard's first record in the sequence
    for url in order:
        end = start + sizes[url]
        for s in range(start * streams // max(total, 1), streams):
            lo, hi = max(start, total * s // streams), min(end, total * (s + 1) // streams)
            if lo >= hi:
                if total * s // streams >= end:
                    break
                continue
            runs[s].append((url, lo - start, hi - start))
        start = end
    return runs


def epoch_records(sizes: dict[str, int], seed: int, epoch: SharedEpoch, rank: int, world: int, handler,
                  fixed_steps: bool) -> Callable[[], Iterator[dict]]:
    """This rank-and-worker's share of an epoch: its run of `shard_runs`, record by record.

    By default one pass: every training record once across all ranks and workers (UCCH's memory bank
    expects every item to be visited once an epoch), after which `PadForever` tops the last batch up.
    With `fixed_steps` (data.steps_per_epoch) pass follows pass, each in a fresh order, until the
    loader has its steps."""

    def stream():
        worker, workers = _worker()
        streams, me = world * workers, rank * workers + worker
        for p in itertools.count() if fixed_steps else (0,):
            for url, first, end in shard_runs(sizes, streams, seed, epoch.get() * 1_000_003 + p)[me]:
                samples = wds.tarfile_to_samples(handler=handler)(iter([{"url": url}]))
                for position, sample in enumerate(samples):
                    if position >= end:
                        break
                    if position >= first:
                        yield sample

    return stream


class PadForever:
    """Passes records through, then repeats random ones of them for ever: the tail of an epoch's pass is
    topped up to whole batches, and every rank and worker yields as many batches as the others (DDP
    needs equal steps; `with_epoch` cuts the stream). Keeps at most `keep` encoded records."""

    def __init__(self, keep: int, seed: int, epoch: SharedEpoch, rank: int):
        self.keep, self.seed, self.epoch, self.rank = keep, seed, epoch, rank

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        rng = random.Random(_stream_seed(self.seed, self.epoch.get(), self.rank) ^ 0x9AD)
        kept: list[dict] = []
        for n, sample in enumerate(src):
            if len(kept) < self.keep:
                kept.append(sample)
            elif (j := rng.randrange(n + 1)) < self.keep:  # reservoir sampling: a uniform sample of the pass
                kept[j] = sample
            yield sample
        while kept:
            yield rng.choice(kept)


def split_shards(urls: list[str], rank: int, world: int) -> Callable[[], Iterator[dict]]:
    """Each shard once: rank r takes shards r, r+world, ...; then its workers take turns."""

    def stream():
        worker, workers = _worker()
        for url in urls[rank::world][worker::workers]:
            yield {"url": url}

    return stream


def seeded_shuffle(bufsize: int, seed: int, epoch: SharedEpoch, rank: int):
    def stage(src: Iterable) -> Iterator:
        rng = random.Random(_stream_seed(seed, epoch.get(), rank) ^ 0x5EED)
        return wds.filters._shuffle(src, bufsize, initial=max(1, bufsize // 4), rng=rng)

    return stage


class RecordDecoder:
    """Shard record -> {image tensor, index, labels, captions}; bad records are skipped and counted.

    One instance lives in each worker; `pop_skips` hands the counts since the last batch to the
    collate function, so that they reach the main process with the batch itself."""

    LOG_EVERY = 100

    def __init__(self, image_key: str, num_categories: int, transform: Callable[[Image.Image], torch.Tensor],
                 features: bool = False):
        self.image_key, self.num_categories, self.transform = image_key, num_categories, transform
        self.features = features  # feature shards: image and caption vectors instead of pixels and text
        self.skips: Counter = Counter()
        self.seen: Counter = Counter()

    def skip(self, reason: str, key: str, detail: str = "") -> None:
        self.skips[reason] += 1
        self.seen[reason] += 1
        if self.seen[reason] == 1 or self.seen[reason] % self.LOG_EVERY == 0:
            log.warning("skipped record %s (%s, %d so far in this worker) %s", key, reason, self.seen[reason], detail)

    def handler(self, exn: Exception) -> bool:
        """webdataset handler for unreadable or truncated shards: count and carry on."""
        self.skip("unreadable_shard", str(exn.args[-1]) if exn.args else "?", repr(exn)[:200])
        return True

    def pop_skips(self) -> dict:
        out, self.skips = dict(self.skips), Counter()
        return out

    def decode(self, sample: dict) -> dict | None:
        key = sample.get("__key__", "?")
        try:
            meta = json.loads(sample["json"])
            if self.features:
                pixels = _npy(sample[self.image_key])
                text_rows = _npy(sample[TEXT_FEATURES_KEY])
            else:
                image = Image.open(io.BytesIO(sample[self.image_key])).convert("RGB")
                pixels = self.transform(image)
        except Exception as e:  # any corrupt or missing member: skip, never crash the run
            self.skip("undecodable", key, repr(e)[:200])
            return None
        captions = meta.get("captions", [])
        if self.features:  # from here on a caption is its row of text features
            if len(text_rows) != len(captions):
                self.skip("feature_mismatch", key, f"{len(text_rows)} text feature rows for {len(captions)} captions")
                return None
            captions = [row for c, row in zip(captions, text_rows) if isinstance(c, str) and c.strip()]
        else:
            captions = [c for c in captions if isinstance(c, str) and c.strip()]
        if not captions:
            self.skip("no_caption", key)
            return None
        labels = meta.get("labels", [])
        if any(not isinstance(l, int) or not 0 <= l < self.num_categories for l in labels):
            self.skip("bad_label", key, f"labels {labels} outside 0..{self.num_categories - 1}")
            return None
        if not isinstance(meta.get("index"), int):
            self.skip("no_index", key)
            return None
        return {"image": pixels, "index": meta["index"], "labels": labels, "captions": captions}

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        for sample in src:
            record = self.decode(sample)
            if record is not None:
                yield record


def _npy(data: bytes) -> torch.Tensor:
    """An .npy member (float16 or float32) as a float32 tensor."""
    return torch.tensor(np.load(io.BytesIO(data), allow_pickle=False), dtype=torch.float32)


def image_transform(size: int, mean, std) -> Callable[[Image.Image], torch.Tensor]:
    mean_t = torch.tensor(mean).view(3, 1, 1)
    std_t = torch.tensor(std).view(3, 1, 1)

    def transform(image: Image.Image) -> torch.Tensor:
        if image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return (pixels.float() / 255.0 - mean_t) / std_t

    return transform


class Collate:
    """Records -> a batch: `images`, `image_ids`, `labels` (multi-hot), `text` (the text encoder's
    keyword inputs) and `skipped`. Training: one random caption per image. Evaluation: every
    caption, with `text_ids` and `text_image_ids` that tie each caption to its image (never
    their positions)."""

    def __init__(self, decoder: RecordDecoder, tokenizer, max_len: int, train: bool, seed: int, rank: int):
        self.decoder, self.tokenizer, self.max_len, self.train = decoder, tokenizer, max_len, train
        self.seed, self.rank, self.rng = seed, rank, None

    def tokenize(self, texts: list) -> dict:
        """The text encoder's keyword inputs (feature shards: the caption vectors, no tokenizer)."""
        if self.tokenizer is None:
            return {"features": torch.stack(texts)}
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}

    def __call__(self, records: list[dict]) -> dict:
        if self.rng is None:  # created in the worker, so that each worker draws its own captions
            self.rng = random.Random(_stream_seed(self.seed, 0, self.rank) ^ 0xCA9)
        labels = torch.zeros(len(records), self.decoder.num_categories)
        for row, r in enumerate(records):
            labels[row, r["labels"]] = 1.0
        batch = {"images": torch.stack([r["image"] for r in records]),
                 "image_ids": torch.tensor([r["index"] for r in records], dtype=torch.long),
                 "labels": labels}
        if self.train:
            batch["text"] = self.tokenize([self.rng.choice(r["captions"]) for r in records])
        else:
            texts, text_ids, text_image_ids = [], [], []
            for r in records:
                for j, caption in enumerate(r["captions"][:MAX_CAPTIONS]):
                    texts.append(caption)
                    text_ids.append(r["index"] * MAX_CAPTIONS + j)
                    text_image_ids.append(r["index"])
            batch["text"] = self.tokenize(texts)
            batch["text_ids"] = torch.tensor(text_ids, dtype=torch.long)
            batch["text_image_ids"] = torch.tensor(text_image_ids, dtype=torch.long)
        batch["skipped"] = self.decoder.pop_skips()
        return batch


def build_stream(card: DatasetCard, split: str, *, train: bool, batch_size: int, rank: int, world: int,
                 num_workers: int, seed: int, epoch: SharedEpoch, tokenizer, max_text_len: int,
                 transform: Callable, shuffle_buffer: int = 1000,
                 steps_per_epoch: int | None = None) -> tuple[Iterable, int | None]:
    """The loader for one split on one rank, and its number of batches (None for evaluation, where
    it depends on how the shards fall across ranks)."""
    urls = card.shards(split)
    decoder = RecordDecoder(card.image_key, len(card.categories), transform, features=bool(card.features))
    collate = Collate(decoder, None if card.features else tokenizer, max_text_len, train, seed, rank)
    if train:
        # one pass over the records (or passes, for a fixed number of steps); shuffle the encoded records,
        # then decode: the buffer holds JPEG bytes (~0.1 MB) rather than pixels (0.6 MB at 224 px), and
        # filling it costs tar reads, not decodes (benchmarks/bench_loader.py)
        stages = [epoch_records(card.shard_sizes(split), seed, epoch, rank, world, decoder.handler,
                                fixed_steps=steps_per_epoch is not None),
                  seeded_shuffle(shuffle_buffer, seed, epoch, rank), PadForever(batch_size, seed, epoch, rank),
                  decoder, wds.batched(batch_size, collation_fn=collate, partial=False)]
    else:
        stages = [split_shards(urls, rank, world), wds.tarfile_to_samples(handler=decoder.handler),
                  decoder, wds.batched(batch_size, collation_fn=collate, partial=True)]
    dataset = wds.DataPipeline(*stages)
    loader = wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                           persistent_workers=train and num_workers > 0)
    if not train:
        return loader, None
    num_batches = steps_per_epoch or train_steps(sum(card.shard_sizes(split).values()), batch_size, world,
                                                 num_workers)
    return loader.with_epoch(num_batches).with_length(num_batches, silent=True), num_batches


def train_steps(records: int, batch_size: int, world: int, num_workers: int) -> int:
    """Steps per epoch on every rank for one pass: each of the world x workers streams holds at most
    ceil(records / streams) records and yields that many batches (the last topped up), and a rank's
    loader takes its workers' batches in turn."""
    workers = max(1, num_workers)
    return workers * max(1, math.ceil(math.ceil(records / (world * workers)) / batch_size))


def load_tokenizer(card: DatasetCard, override: str | None = None):
    """The dataset's own tokenizer.json (trained by data_prep on training captions), or a pretrained
    tokenizer by hub name / local path when the config names one."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if override:
        return AutoTokenizer.from_pretrained(override)
    if not card.tokenizer or not (card.root / card.tokenizer).is_file():
        raise DataError(f"{card.root} has no tokenizer.json: re-run data_prep, or set data.tokenizer "
                        f"to a pretrained tokenizer (hub name or local path)")
    return PreTrainedTokenizerFast(tokenizer_file=str(card.root / card.tokenizer), pad_token="[PAD]",
                                   unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


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
                            f"`python -m data_prep features`), but {card.root} holds images and text")


def resolve_dataset(cfg_data) -> Path:
    """data.root, or the shapes default (built on first use)."""
    if cfg_data.root:
        root = Path(cfg_data.root).expanduser()
        if not (root / "dataset.json").is_file():
            raise DataError(f"data.root={cfg_data.root}: no dataset.json there; build one with "
                            f"`python -m data_prep ...` or unset data.root for the shapes default")
        return root
    from data_prep.shapes import build_shapes

    root = Path(cfg_data.shapes_dir).expanduser()
    if not (root / "dataset.json").is_file():
        log.warning("no dataset configured: building the shapes default in %s (once)", root)
    try:
        return build_shapes(root, image_size=cfg_data.image_size)
    except ValueError as e:  # e.g. an older generator's dataset in the same folder
        raise DataError(f"data.shapes_dir={cfg_data.shapes_dir}: {e}") from None


class RetrievalDataModule(L.LightningDataModule):
    """Shards of one dataset for train / val / test; rank and world size come from the trainer."""

    def __init__(self, cfg_data, seed: int = 0):
        super().__init__()
        self.cfg, self.seed = cfg_data, seed
        self.card = DatasetCard.read(resolve_dataset(cfg_data))
        self.tokenizer = NoTokenizer() if self.card.features else load_tokenizer(self.card, cfg_data.tokenizer)
        self.epoch = SharedEpoch()
        self.transform = image_transform(cfg_data.image_size, cfg_data.mean, cfg_data.std)
        self.num_train_batches: int | None = None

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
            self.card, split, train=train, batch_size=self.cfg.batch_size if train else self.cfg.eval_batch_size,
            rank=rank, world=world, num_workers=self.cfg.num_workers, seed=self.seed, epoch=self.epoch,
            tokenizer=self.tokenizer, max_text_len=self.cfg.max_text_len, transform=self.transform,
            shuffle_buffer=self.cfg.shuffle_buffer, steps_per_epoch=self.cfg.steps_per_epoch)
        if train:
            self.num_train_batches = n
        return loader

    def train_dataloader(self):
        return self._stream("train", train=True)

    def val_dataloader(self):
        return self._stream("val", train=False)

    def test_dataloader(self):
        return self._stream("test", train=False)
