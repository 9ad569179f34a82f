"""WebDataset shards -> batches, for one process of a (possibly distributed) run.

`build_stream` is the whole data stream in one function and knows its own size.
The rules it follows were each seen to fail otherwise:
- an epoch visits every training record once across all ranks and workers (`shard_runs`), and
  every rank takes the same number of full batches (the last one topped up: `PadForever`,
  `with_epoch` on the loader: on the dataset it would count per worker);
- the order moves with the epoch, which reaches the workers through shared memory (Lightning never
  calls set_epoch on an IterableDataset); the sample-shuffle seed differs per rank and worker;
- evaluation reads every record exactly once: shards are split by rank with the rank and world
  size taken from the trainer (never guessed from the environment), then by worker;
- shards are read by a `ShardReader` (a folder, a server, or the user's command): a read that keeps
  failing gives up the rest of its shard and counts the records lost (`unreadable_shard`); the step
  counts come from the card's shard sizes, never from what was read, so every rank still takes the
  same number of batches (`PadForever` tops up what is missing).
"""
from __future__ import annotations

import itertools
import math
import random
from typing import Callable, Iterable, Iterator

import webdataset as wds

from data_prep import WDS_LAYOUT, DataError, DatasetCard
from pipeline.data.records import Collate, RandomCrop, RecordDecoder
from pipeline.data.seeds import SharedEpoch, stream_seed, worker_slot
from pipeline.data.shard_reader import ShardReader


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


def epoch_records(sizes: dict[str, int], seed: int, epoch: SharedEpoch, rank: int, world: int,
                  reader: ShardReader, lost, fixed_steps: bool) -> Callable[[], Iterator[dict]]:
    """This rank-and-worker's share of an epoch: its run of `shard_runs`, record by record.

    By default one pass: every training record once across all ranks and workers (UCCH's memory bank
    expects every item to be visited once an epoch), after which `PadForever` tops the last batch up.
    With `fixed_steps` (data.steps_per_epoch) pass follows pass, each in a fresh order, until the
    loader has its steps. A pass of which not one record could be read stops the run with a DataError
    (a server that is down): with nothing to top up, this rank would take fewer steps than the others."""

    def stream():
        worker, workers = worker_slot()
        streams, me = world * workers, rank * workers + worker
        for p in itertools.count() if fixed_steps else (0,):
            read, failed = 0, []
            for url, first, end in shard_runs(sizes, streams, seed, epoch.get() * 1_000_003 + p)[me]:
                # wds-layout records get their index from their __position__
                for sample in reader.records(url, first, end, lambda *a: (failed.append(a), lost(*a))):
                    read += 1
                    yield sample
            if failed and not read:
                url, _, why = failed[-1]
                raise DataError(f"no training record of this rank's share could be read ({len(failed)} shard(s) "
                                f"failed, e.g. {url}: {why}): is the server or data.shard_url_command reachable?")

    return stream


class PadForever:
    """Passes records through, then repeats random ones of them for ever: the tail of an epoch's pass is
    topped up to whole batches, and every rank and worker yields as many batches as the others (DDP
    needs equal steps; `with_epoch` cuts the stream). Keeps at most `keep` encoded records."""

    def __init__(self, keep: int, seed: int, epoch: SharedEpoch, rank: int):
        self.keep, self.seed, self.epoch, self.rank = keep, seed, epoch, rank

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        rng = random.Random(stream_seed(self.seed, self.epoch.get(), self.rank) ^ 0x9AD)
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
        worker, workers = worker_slot()
        for url in urls[rank::world][worker::workers]:
            yield {"url": url}

    return stream


def positioned_samples(reader: ShardReader, sizes: dict[str, int], lost):
    """Each shard's samples, with their position in the shard (as `epoch_records` gives them)."""

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        for item in src:
            yield from reader.records(item["url"], 0, sizes[item["url"]], lost)

    return stage


def seeded_shuffle(bufsize: int, seed: int, epoch: SharedEpoch, rank: int):
    def stage(src: Iterable) -> Iterator:
        rng = random.Random(stream_seed(seed, epoch.get(), rank) ^ 0x5EED)
        return wds.filters._shuffle(src, bufsize, initial=max(1, bufsize // 4), rng=rng)

    return stage


def build_stream(card: DatasetCard, split: str, *, train: bool, batch_size: int, rank: int, world: int,
                 num_workers: int, seed: int, epoch: SharedEpoch, tokenizer, max_text_len: int,
                 transform: Callable, shuffle_buffer: int = 1000, steps_per_epoch: int | None = None,
                 augment: str = "none", reader: ShardReader | None = None) -> tuple[Iterable, int | None]:
    """The loader for one split on one rank, and its number of batches (None for evaluation, where
    it depends on how the shards fall across ranks). `augment=crop` crops training images at random.
    `reader`: where shards are read from (default: the card's folder, on disk or on a server)."""
    reader = reader or ShardReader()
    urls = reader.locations(card, split)
    sizes = dict(zip(urls, card.record_counts(split)))  # from the card: known before any read
    if train and augment == "crop":
        transform = RandomCrop(transform, seed, epoch, rank)
    decoder = RecordDecoder(card.image_key, len(card.categories), transform, features=bool(card.features),
                            tokens=bool(card.features and card.features.get("tokens")),
                            first_index=dict(zip(urls, card.first_index(split))) if card.layout == WDS_LAYOUT else None)
    collate = Collate(decoder, None if card.features else tokenizer, max_text_len, train, seed, rank)
    if train:
        # one pass over the records (or passes, for a fixed number of steps); shuffle the encoded records,
        # then decode: the buffer holds JPEG bytes (~0.1 MB) rather than pixels (0.6 MB at 224 px), and
        # filling it costs tar reads, not decodes (benchmarks/bench_loader.py)
        stages = [epoch_records(sizes, seed, epoch, rank, world, reader, decoder.lost,
                                fixed_steps=steps_per_epoch is not None),
                  seeded_shuffle(shuffle_buffer, seed, epoch, rank), PadForever(batch_size, seed, epoch, rank),
                  decoder, wds.batched(batch_size, collation_fn=collate, partial=False)]
    else:
        stages = [split_shards(urls, rank, world), positioned_samples(reader, sizes, decoder.lost),
                  decoder, wds.batched(batch_size, collation_fn=collate, partial=True)]
    dataset = wds.DataPipeline(*stages)
    loader = wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                           persistent_workers=train and num_workers > 0)
    if not train:
        return loader, None
    num_batches = steps_per_epoch or train_steps(sum(sizes.values()), batch_size, world, num_workers)
    return loader.with_epoch(num_batches).with_length(num_batches, silent=True), num_batches


def train_steps(records: int, batch_size: int, world: int, num_workers: int) -> int:
    """Steps per epoch on every rank for one pass: each of the world x workers streams holds at most
    ceil(records / streams) records and yields that many batches (the last topped up), and a rank's
    loader takes its workers' batches in turn."""
    workers = max(1, num_workers)
    return workers * max(1, math.ceil(math.ceil(records / (world * workers)) / batch_size))
