"""Feature shards: a config's frozen encoders run once over a dataset; their outputs become shards.

    python -m pipeline.features --shards data/coco --config coco_hash_64bit.yaml --out data/coco_features
           [key=value ...] [--tokens] [--dtype float16|float32] [--batch-size 256] [--workers 8]

Every record keeps its key and its json byte for byte; the image becomes `img.npy` (the image
encoder's global vector, [D]) and the captions `txt.npy` (the text encoder's global vector for
each json caption, in order, [C, D]). `--tokens` adds `img_tokens.npy` [T, D] (patches, CNN cells)
and `txt_tokens.npy` [C, L, D] with `txt_mask.npy` [C, L] (L: the record's longest caption).
The card says `"image_key": "img.npy"` and `"features": {"image_dim", "text_dim", "source_config",
...}`; train on it with the `features` encoders (configs/*_features.yaml), which is how UCCH and
most hashing work train: heads and sweeps in minutes instead of a backbone pass per step.

How it runs: the encoders are built exactly as training builds them (same config, same seed,
so even randomly initialised ones are reproducible), put in eval mode, frozen, and run under
torch.inference_mode, batched, on the GPU when there is one (bf16 autocast there). DataLoader
workers read and decode whole shards, so each output shard mirrors one input shard (same name,
same records, same order, whatever the number of workers). A shard is written atomically
(data_prep's write_shard) and then marked done (data_prep's ResumableBuild, as the shard writers
build): a re-run with the same inputs and options skips finished shards, and refuses a folder
holding another build. A record that cannot be
decoded or encoded is skipped and counted in the card; json `index` values are kept, so the
split's `num_images` stays the source's (the index space the training state is sized by).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # fork-safe tokenizers in the data workers

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset, get_worker_info  # noqa: E402

from data_prep import (CARD_NAME, IMAGE_FEATURES_KEY, IMAGE_TOKENS_KEY, TEXT_FEATURES_KEY,  # noqa: E402
                       TEXT_MASK_KEY, TEXT_TOKENS_KEY, WDS_LAYOUT, DataError, DatasetCard, InputError,
                       ResumableBuild, make_card, split_entry, write_shard)
from pipeline.cli import progress_bar  # noqa: E402
from pipeline.config import ConfigError, load_config  # noqa: E402
from pipeline.data import RecordDecoder, image_transform, load_tokenizer  # noqa: E402
from pipeline.models.encoders import FEATURES, build_image_encoder, build_text_encoder  # noqa: E402
from pipeline.training.backbone import resolve_init  # noqa: E402
from pipeline.training.build import complete_config, model_tokenizer  # noqa: E402

log = logging.getLogger("features")

DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class Task:
    """One input shard -> one output shard of the same name."""

    split: str
    name: str
    source: str


# ---- reading and decoding (in DataLoader workers) -------------------------------------------

class ShardReader(IterableDataset):
    """Batches of decoded records, shard by shard; worker w takes shards w, w + W, ... and ends each
    shard with a batch marked `last` (empty when every record of it was skipped)."""

    def __init__(self, tasks: list[Task], card: DatasetCard, transform, tokenizer, max_len: int, batch_size: int):
        self.tasks, self.tokenizer = tasks, tokenizer
        self.max_len, self.batch_size = max_len, batch_size
        self.decoder = RecordDecoder(card.image_key, len(card.categories), transform)

    def _batch(self, task_id: int, records: list, last: bool) -> dict:
        batch = {"task": task_id, "last": last, "keys": [r[0] for r in records], "jsons": [r[1] for r in records],
                 "num_captions": [len(r[3]) for r in records], "skipped": self.decoder.pop_skips()}
        if records:
            captions = [c for r in records for c in r[3]]
            tok = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_len,
                                 return_tensors="pt")
            batch.update(images=torch.stack([r[2] for r in records]), input_ids=tok["input_ids"],
                         attention_mask=tok["attention_mask"])
        return batch

    def _records(self, task: Task):
        stream = wds.DataPipeline(wds.SimpleShardList([task.source]),
                                  wds.tarfile_to_samples(handler=self.decoder.handler))
        for sample in stream:
            record = self.decoder.decode(sample)  # the training stream's checks: same skips, same reasons
            if record is None:
                continue
            meta = json.loads(sample["json"])
            # one row per json caption as stored, so that row j is caption j (blank ones included)
            captions = [c if isinstance(c, str) else "" for c in meta["captions"]]
            yield sample["__key__"], sample["json"], record["image"], captions

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for task_id in range(worker, len(self.tasks), workers):
            records = []
            for record in self._records(self.tasks[task_id]):
                records.append(record)
                if len(records) == self.batch_size:
                    yield self._batch(task_id, records, last=False)
                    records = []
            yield self._batch(task_id, records, last=True)


# ---- encoding (main process, on the device) ----------------------------------------------------

def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class FrozenEncoders:
    """The config's encoders in eval mode, without gradients, on `device`."""

    def __init__(self, cfg, tokenizer, device: torch.device, precision: str):
        for side in ("image_encoder", "text_encoder"):
            if cfg.model[side].name == FEATURES:
                raise InputError(f"model.{side}.name=features reads feature shards; --config must name the "
                                 f"encoders that make them (e.g. coco_hash_64bit.yaml, not *_features.yaml)")
        torch.manual_seed(cfg.run.seed)  # randomly initialised encoders come out as training builds them
        try:
            image = build_image_encoder(cfg.model.image_encoder, resolve_init(cfg))
            text = build_text_encoder(cfg.model.text_encoder, len(tokenizer), cfg.data.max_text_len,
                                      tokenizer.pad_token_id or 0, cfg.model.text_encoder.init)
        except OSError as e:  # a hub name offline, a wrong local path
            raise InputError(f"cannot load an encoder ({str(e).splitlines()[0]}); point model.*_encoder.name "
                             f"at a local folder made with save_pretrained") from None
        self.image, self.text = (m.eval().requires_grad_(False).to(device) for m in (image, text))
        self.device = device
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                         else contextlib.nullcontext())

    @torch.inference_mode()
    def __call__(self, batch: dict, tokens: bool) -> dict:
        move = {"non_blocking": True}
        with self.autocast:
            img = self.image(batch["images"].to(self.device, **move))
            txt = self.text(input_ids=batch["input_ids"].to(self.device, **move),
                            attention_mask=batch["attention_mask"].to(self.device, **move))
        out = {"img": img.vector.float().cpu(), "txt": txt.vector.float().cpu()}
        if tokens:
            out.update(img_tokens=img.tokens.float().cpu(), txt_tokens=txt.tokens.float().cpu(),
                       txt_mask=txt.mask.cpu())
        return out


def records_of(batch: dict, out: dict, dtype, skips: Counter) -> tuple[list[dict], int]:
    """Output shard records (key and json unchanged, feature members added) and their caption count."""
    records, first, captions = [], 0, 0
    for i, (key, meta, n) in enumerate(zip(batch["keys"], batch["jsons"], batch["num_captions"])):
        rows = slice(first, first + n)
        first += n
        members = {IMAGE_FEATURES_KEY: out["img"][i], TEXT_FEATURES_KEY: out["txt"][rows]}
        if "img_tokens" in out:
            mask = out["txt_mask"][rows]
            length = int(mask.sum(1).max()) if n else 0
            members.update({IMAGE_TOKENS_KEY: out["img_tokens"][i], TEXT_TOKENS_KEY: out["txt_tokens"][rows, :length],
                            TEXT_MASK_KEY: mask[:, :length]})
        arrays = {k: v.numpy().astype(dtype if v.is_floating_point() else bool) for k, v in members.items()}
        if not all(np.isfinite(a).all() for a in arrays.values() if a.dtype != bool):
            skips["non_finite_features"] += 1  # float16 overflow: --dtype float32 keeps them
            log.warning("skipped %s: non-finite features (with --dtype float16: try float32)", key)
            continue
        records.append({"__key__": key, "json": meta, **{k: _npy(a) for k, a in arrays.items()}})
        captions += n
    return records, captions


# ---- the build ----------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.features", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, type=Path, help="a dataset folder (dataset.json + shards)")
    p.add_argument("--config", required=True, help="the config whose encoders make the features")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. model.image_encoder.name=/w/vit")
    p.add_argument("--out", required=True, type=Path, help="feature dataset folder (re-run the same command to resume)")
    p.add_argument("--tokens", action="store_true", help="also store token / patch features (large)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="storage type of the features")
    p.add_argument("--batch-size", type=int, default=256, help="images per encoder batch")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding processes")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=["auto", "32", "bf16"], default="auto",
                   help="auto: bf16 autocast on a GPU, float32 on the CPU")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_intermixed_args(argv)  # key=value overrides may come between the options
    if args.batch_size < 1 or args.workers < 0:
        p.error("--batch-size must be >= 1 and --workers >= 0")
    return args


def _fingerprint(card: DatasetCard, cfg, args) -> tuple[str, dict]:
    from omegaconf import OmegaConf

    source_config = {"config": args.config, "overrides": list(args.overrides), "seed": cfg.run.seed,
                     "image_encoder": OmegaConf.to_container(cfg.model.image_encoder, resolve=True),
                     "text_encoder": OmegaConf.to_container(cfg.model.text_encoder, resolve=True),
                     **{k: OmegaConf.to_container(cfg.data, resolve=True)[k]
                        for k in ("image_size", "mean", "std", "tokenizer", "max_text_len")}}
    source = (card.root / CARD_NAME).read_bytes()
    h = hashlib.sha256(source)
    h.update(json.dumps([source_config, args.dtype, args.tokens], sort_keys=True).encode())
    return h.hexdigest()[:16], source_config


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_features(args: argparse.Namespace) -> dict:
    """Write (or finish, or confirm) the feature dataset in args.out; returns its card."""
    try:
        cfg = complete_config(load_config(args.config, args.overrides))
        card = DatasetCard.read(args.shards)
        if card.remote:
            raise DataError(f"--shards {args.shards}: feature shards are made from a dataset folder on disk; "
                            f"copy the folder from the server first")
        tasks = [Task(split, Path(name).name, path) for split in card.splits
                 for name, path in zip(card.splits[split]["shards"], card.shards(split))]
    except (ConfigError, DataError) as e:
        raise InputError(str(e)) from None
    if card.features:
        raise InputError(f"{args.shards} already holds feature shards: point --shards at an image dataset")
    if card.layout == WDS_LAYOUT:
        raise InputError(f"{args.shards} reads shards made by others in place (data_prep wds), whose records "
                         f"carry no json of ours to copy: feature shards are made from our own shards only")
    fp, source_config = _fingerprint(card, cfg, args)
    build = ResumableBuild(args.out, fp)
    if (finished := build.finished()) is not None:
        return finished

    device = _device(args.device)
    precision = ("bf16" if device.type == "cuda" else "32") if args.precision == "auto" else args.precision
    try:
        tokenizer = model_tokenizer(cfg) or load_tokenizer(card, cfg.data.tokenizer)
    except (DataError, OSError) as e:
        raise InputError(f"cannot load the tokenizer ({str(e).splitlines()[0]}); point data.tokenizer at a "
                         f"local folder made with save_pretrained") from None
    encoders = FrozenEncoders(cfg, tokenizer, device, precision)
    dtype = DTYPES[args.dtype]
    build.start()
    todo = [t for t in tasks if not build.is_done(t.name)]
    done = sum(build.stats(t.name)["records"] for t in tasks if t not in todo)
    if len(todo) < len(tasks):
        log.info("%d of %d shards already written", len(tasks) - len(todo), len(tasks))
    reader = ShardReader(todo, card, image_transform(cfg.data.image_size, cfg.data.mean, cfg.data.std),
                         tokenizer, cfg.data.max_text_len, args.batch_size)
    workers = min(args.workers, len(todo))
    loader = DataLoader(reader, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None)
    pending: dict[int, dict] = {}  # task -> records so far, captions, skips
    dims: dict[str, int] = {}
    with progress_bar(sum(card.num_images(s) for s in card.splits), "features", not args.no_progress, "img",
                      initial=done) as bar:
        for batch in loader:
            state = pending.setdefault(batch["task"], {"records": [], "captions": 0, "skipped": Counter()})
            state["skipped"].update(batch["skipped"])
            if batch["keys"]:
                arrays = encoders(batch, args.tokens)
                dims = {"image_dim": arrays["img"].shape[1], "text_dim": arrays["txt"].shape[1]}
                kept, captions = records_of(batch, arrays, dtype, state["skipped"])
                state["records"] += kept
                state["captions"] += captions
                bar.update(len(batch["keys"]))
            if batch["last"]:
                state = pending.pop(batch["task"])
                name = todo[batch["task"]].name
                if state["records"]:  # a shard whose every record was skipped is not written (nor listed)
                    write_shard(state["records"], build.out / name)
                build.mark_done(name, {"records": len(state["records"]), "captions": state["captions"],
                                       "skipped": dict(state["skipped"])})
    return _write_card(build, card, tasks, source_config, args, encoders, dims)


def _write_card(build: ResumableBuild, card: DatasetCard, tasks: list[Task], source_config: dict, args,
                encoders: FrozenEncoders, dims: dict) -> dict:
    splits, skipped = {}, Counter()
    for task in tasks:
        stats = build.stats(task.name)
        entry = splits.setdefault(task.split, {**split_entry([], card.num_images(task.split), 0),
                                               "num_written": 0, "num_without_labels":
                                               int(card.splits[task.split].get("num_without_labels", 0))})
        if stats["records"]:
            entry["shards"].append(task.name)
            entry["shard_sizes"].append(stats["records"])
        entry["num_written"] += stats["records"]
        entry["num_captions"] += stats["captions"]
        skipped.update(stats["skipped"])
    if not any(e["shards"] for e in splits.values()):
        build.abandon()
        raise NothingWritten(f"no record of {card.root} could be encoded; skipped: {dict(skipped)}")
    features = {"image_dim": int(dims.get("image_dim", encoders.image.out_dim)),
                "text_dim": int(dims.get("text_dim", encoders.text.out_dim)),
                "dtype": args.dtype, "text_key": TEXT_FEATURES_KEY, "tokens": bool(args.tokens),
                "source_config": source_config}
    made_with = {"command": "features", "source": str(card.root.resolve()), "fingerprint": build.fingerprint}
    return build.finish(make_card(card.name, card.categories, IMAGE_FEATURES_KEY, splits, made_with, dict(skipped),
                                  tokenizer=None, features=features))


class NothingWritten(Exception):
    """Every record was skipped."""


def run(args: argparse.Namespace) -> int:
    """0 written (or already complete), 1 nothing could be encoded; InputError: the inputs cannot be used."""
    start = time.perf_counter()
    try:
        new = build_features(args)
    except NothingWritten as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    f = new["features"]
    print(f"{new['name']} features: image {f['image_dim']}-d, text {f['text_dim']}-d, {f['dtype']}"
          f"{', with tokens' if f['tokens'] else ''} ({time.perf_counter() - start:.1f} s)")
    return 0


def main(argv=None) -> int:
    """Exit status: 0 written, 1 nothing could be encoded, 2 the inputs cannot be used."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="features: %(message)s")
    try:
        return run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
