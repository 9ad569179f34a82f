"""One shard record -> tensors, and records -> a batch: decoding, checks, the image transform, tokenising.

A record that fails to decode, has no caption, a label outside the card's categories or no index is
skipped and counted (`RecordDecoder`); the counts ride along with the next batch to the main process.
Feature shards (made by `python -m pipeline.features`) take the same path: `img.npy` replaces the
pixels and each caption becomes its `txt.npy` row, so batches carry `images` [B, D] and
`text` = {"features": [N, D]} for the `features` encoders. Shards made with `--tokens` carry token
features too, for token-level models: then `images` = {"features": [B, D], "tokens": [B, T, D],
"mask": [B, T]} and `text` = {"features": [N, D], "tokens": [N, L, D], "mask": [N, L]} (L: the batch's
longest caption).
"""
from __future__ import annotations

import io
import json
import logging
import math
import random
from collections import Counter
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from data_prep import IMAGE_TOKENS_KEY, TEXT_FEATURES_KEY, TEXT_MASK_KEY, TEXT_TOKENS_KEY, caption_of
from pipeline.data.seeds import stream_seed

log = logging.getLogger(__name__)

MAX_CAPTIONS = 1 << 16  # caption id = image index * MAX_CAPTIONS + caption number


class RecordDecoder:
    """Shard record -> {image tensor, index, labels, captions}; bad records are skipped and counted.

    One instance lives in each worker; `pop_skips` hands the counts since the last batch to the
    collate function, so that they reach the main process with the batch itself."""

    LOG_EVERY = 100

    def __init__(self, image_key: str, num_categories: int, transform: Callable[[Image.Image], torch.Tensor],
                 features: bool = False, tokens: bool = False, first_index: dict[str, int] | None = None):
        self.image_key, self.num_categories, self.transform = image_key, num_categories, transform
        self.features = features  # feature shards: image and caption vectors instead of pixels and text
        self.tokens = tokens  # feature shards with token features: each item a (vector, its tokens) pair
        # shards made by others (card layout wds): shard -> index of its first record; no json index there
        self.first_index = first_index
        self.skips: Counter = Counter()
        self.seen: Counter = Counter()

    def skip(self, reason: str, key: str, detail: str = "") -> None:
        self.skips[reason] += 1
        self.seen[reason] += 1
        if self.seen[reason] == 1 or self.seen[reason] % self.LOG_EVERY == 0:
            log.warning("skipped record %s (%s, %d so far in this worker) %s", key, reason, self.seen[reason], detail)

    def handler(self, exn: Exception) -> bool:
        """webdataset handler for unreadable or truncated shards (`pipeline.features` reads with it): count
        and carry on."""
        self.skip("unreadable_shard", str(exn.args[-1]) if exn.args else "?", repr(exn)[:200])
        return True

    def lost(self, shard: str, count: int, why: str) -> None:
        """A shard given up after its last try (pipeline/data/shard_reader.py, which logs it): its unread
        records are counted as `unreadable_shard`."""
        if count > 0:
            self.skips["unreadable_shard"] += count
            self.seen["unreadable_shard"] += count

    def pop_skips(self) -> dict:
        out, self.skips = dict(self.skips), Counter()
        return out

    def decode(self, sample: dict) -> dict | None:
        key = sample.get("__key__", "?")
        try:
            meta = json.loads(sample["json"]) if self.first_index is None else self.wds_meta(sample)
            if self.features:
                pixels = _npy(sample[self.image_key])
                text_rows = _npy(sample[TEXT_FEATURES_KEY])
                if self.tokens:
                    pixels, text_rows = self._with_tokens(sample, pixels, text_rows)
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

    def wds_meta(self, sample: dict) -> dict:
        """What our json holds, for a record in the common layout: its caption (txt, or json's caption)
        and its index, its shard's first index plus its position in the shard (the scan's numbering)."""
        caption = caption_of({k: sample[k] for k in ("txt", "json") if k in sample})
        return {"index": self.first_index[sample["__url__"]] + sample["__position__"],
                "captions": [caption] if caption else [], "labels": []}

    @staticmethod
    def _with_tokens(sample: dict, vector: torch.Tensor, text_rows: torch.Tensor):
        """(image vector, its tokens) and, per caption, (vector, its real tokens)."""
        txt_tokens = _npy(sample[TEXT_TOKENS_KEY])
        txt_mask = torch.from_numpy(np.load(io.BytesIO(sample[TEXT_MASK_KEY]), allow_pickle=False).astype(bool))
        if len(txt_tokens) != len(text_rows) or txt_mask.shape != txt_tokens.shape[:2]:
            raise ValueError(f"{len(txt_tokens)} token sets, {tuple(txt_mask.shape)} masks for {len(text_rows)} captions")
        return (vector, _npy(sample[IMAGE_TOKENS_KEY])), [(row, t[m]) for row, t, m in
                                                           zip(text_rows, txt_tokens, txt_mask)]

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        for sample in src:
            record = self.decode(sample)
            if record is not None:
                yield record


def _npy(data: bytes) -> torch.Tensor:
    """An .npy member (float16 or float32) as a float32 tensor."""
    return torch.tensor(np.load(io.BytesIO(data), allow_pickle=False), dtype=torch.float32)


def image_transform(size: int, mean, std) -> Callable[[Image.Image], torch.Tensor]:
    """Evaluation's preprocessing: the shorter side resized to `size` (bicubic), the centre square cut
    out (what CLIP-family backbones expect; squashing to a square would distort shapes), normalised."""
    if mean is None or std is None:
        raise ValueError("image_transform needs data.mean and data.std: resolve them from the image encoder "
                         "first (pipeline.training.build.complete_config)")
    mean_t = torch.tensor(mean).view(3, 1, 1)
    std_t = torch.tensor(std).view(3, 1, 1)

    def transform(image: Image.Image) -> torch.Tensor:
        image = center_square(image, size)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return (pixels.float() / 255.0 - mean_t) / std_t

    return transform


def center_square(image: Image.Image, size: int) -> Image.Image:
    """The shorter side resized to `size`, then the centre `size` x `size` square."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


class RandomCrop:
    """Training augmentation `data.augment=crop`: a random crop of 60-100 % of the image's area (aspect
    3:4 to 4:3), then evaluation's preprocessing of that crop. No flips: captions name left and right.
    Seeded per (seed, epoch, rank, worker), so a run and its resume draw the same crops."""

    SCALE, RATIO, TRIES = (0.6, 1.0), (3 / 4, 4 / 3), 10

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], seed: int, epoch, rank: int):
        self.transform, self.seed, self.epoch, self.rank = transform, seed, epoch, rank
        self.rng, self.rng_epoch = None, None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.rng_epoch != self.epoch.get():
            self.rng_epoch = self.epoch.get()
            self.rng = random.Random(stream_seed(self.seed, self.rng_epoch, self.rank) ^ 0xC209)
        width, height = image.size
        for _ in range(self.TRIES):
            area = width * height * self.rng.uniform(*self.SCALE)
            ratio = math.exp(self.rng.uniform(math.log(self.RATIO[0]), math.log(self.RATIO[1])))
            crop_w, crop_h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                left, top = self.rng.randint(0, width - crop_w), self.rng.randint(0, height - crop_h)
                image = image.crop((left, top, left + crop_w, top + crop_h))
                break
        return self.transform(image)


def tokenize(tokenizer, texts: list[str], max_len: int) -> dict:
    """Captions -> the text encoder's keyword inputs, padded to the longest (what every tool feeds
    `encode_texts`, so that a caption gives the same vector in training, evaluation and search)."""
    tok = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}

def feature_inputs(items: list) -> dict:
    """A `features` encoder's keyword inputs: vectors, or (vector, tokens) pairs whose token sets are padded
    to the longest (padding zero, masked)."""
    if not isinstance(items[0], tuple):
        return {"features": torch.stack(items)}
    vectors, token_sets = zip(*items)
    length = max(len(t) for t in token_sets)
    tokens = torch.zeros(len(items), length, token_sets[0].shape[1])
    mask = torch.zeros(len(items), length, dtype=torch.bool)
    for i, t in enumerate(token_sets):
        tokens[i, :len(t)], mask[i, :len(t)] = t, True
    return {"features": torch.stack(vectors), "tokens": tokens, "mask": mask}


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
            return feature_inputs(texts)
        return tokenize(self.tokenizer, texts, self.max_len)

    def __call__(self, records: list[dict]) -> dict:
        if self.rng is None:  # created in the worker, so that each worker draws its own captions
            self.rng = random.Random(stream_seed(self.seed, 0, self.rank) ^ 0xCA9)
        labels = torch.zeros(len(records), self.decoder.num_categories)
        for row, r in enumerate(records):
            labels[row, r["labels"]] = 1.0
        images = [r["image"] for r in records]
        batch = {"images": feature_inputs(images) if isinstance(images[0], tuple) else torch.stack(images),
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
