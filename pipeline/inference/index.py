"""The search index on disk: what retrieval compares for every gallery item, written in blocks, and the
exhaustive top-k over it.

    INDEX/index.json     {"format", "gallery": "images" | "texts", "run": {"path", "name", "fingerprint"},
                          "measure", "arrays": {name: {"dtype", "shape"}}, "bytes_per_item", "count",
                          "blocks": [rows, ...], "root", "skipped", "skipped_files", "seconds"}
    INDEX/items.jsonl    one JSON string per line: the file's path under the folder, or the text
    INDEX/blocks/NNNNNN.<array>.npy   rows of each gallery array, block by block

What is stored is the run's `gallery_features` of each item: embeddings (fine-grained), packed codes
(hashing). A family whose `gallery_features` returns several arrays per item (a dict, e.g. a global
screen and its tokens) gets one file per array per block, and searches them with its own
`search_gallery(queries, gallery, k, screen_k)` (given a `GalleryReader`: blocks of one array, or any
rows of it); every other family is searched here,
block by block, exhaustively under its `measure`, best first with the protocol's tie rule (equal
scores in gallery order), so the ranking is the evaluation's. Memory: one block of the gallery and
the running top-k per query.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from data_prep import atomic_write_bytes, remove_tree, tmp_sibling
from pipeline.evaluation.exhaustive import blocked_topk

FORMAT = 1
MAIN = "gallery"  # the array of a family whose gallery_features is one tensor
INDEX_FILE, ITEMS_FILE, BLOCKS = "index.json", "items.jsonl", "blocks"
MAX_LISTED_SKIPS = 1000  # the summary lists at most this many skipped files (all are counted)


class IndexDamaged(ValueError):
    """A file of an index that is missing or cannot be read (the message names it)."""


def _load_block(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise IndexDamaged(f"{BLOCKS}/{path.name} is missing") from None
    except (OSError, ValueError) as e:  # a cut file: its header or its rows are short
        raise IndexDamaged(f"{BLOCKS}/{path.name} cannot be read ({str(e).splitlines()[0]})") from None


def as_arrays(features) -> dict[str, np.ndarray]:
    """gallery_features' output as named numpy arrays."""
    if isinstance(features, dict):
        return {name: t.detach().cpu().numpy() for name, t in features.items()}
    return {MAIN: features.detach().cpu().numpy()}


class IndexWriter:
    """Appends items and their gallery arrays, writes a block every `block_rows` rows, and renames the
    staged folder to `out` when finished (a killed build leaves no half index under the name)."""

    def __init__(self, out: Path, block_rows: int):
        self.out, self.block_rows = Path(out), block_rows
        self.staged = tmp_sibling(self.out)
        (self.staged / BLOCKS).mkdir(parents=True)
        self.items = open(self.staged / ITEMS_FILE, "w", encoding="utf-8")
        self.pending: dict[str, list[np.ndarray]] = {}
        self.pending_rows, self.blocks, self.arrays = 0, [], {}

    def add(self, features, items: list[str]) -> None:
        arrays = as_arrays(features)
        for name, array in arrays.items():
            layout = {"dtype": str(array.dtype), "shape": list(array.shape[1:])}
            if self.arrays.setdefault(name, layout) != layout:  # every block of an array has one row layout
                raise ValueError(f"gallery array {name!r}: rows of {layout}, earlier rows {self.arrays[name]}")
            self.pending.setdefault(name, []).append(array)
        for item in items:
            self.items.write(json.dumps(item, ensure_ascii=False) + "\n")
        self.pending_rows += len(items)
        if self.pending_rows >= self.block_rows:
            self._flush()

    @property
    def count(self) -> int:
        return sum(self.blocks) + self.pending_rows

    @property
    def bytes_per_item(self) -> int:
        """What the blocks store per item, every array together (a token set at its padded length)."""
        return sum(np.dtype(a["dtype"]).itemsize * int(np.prod(a["shape"])) for a in self.arrays.values())

    def _flush(self) -> None:
        if not self.pending_rows:
            return
        for name, parts in self.pending.items():
            np.save(self.staged / BLOCKS / f"{len(self.blocks):06d}.{name}.npy", np.concatenate(parts))
        self.blocks.append(self.pending_rows)
        self.pending, self.pending_rows = {}, 0

    def finish(self, meta: dict) -> dict:
        self._flush()
        self.items.close()
        meta = {"format": FORMAT, **meta, "arrays": self.arrays, "bytes_per_item": self.bytes_per_item,
                "count": sum(self.blocks), "blocks": self.blocks}
        atomic_write_bytes(self.staged / INDEX_FILE, (json.dumps(meta, indent=2) + "\n").encode())
        self.staged.rename(self.out)
        return meta

    def abort(self) -> None:
        self.items.close()
        remove_tree(self.staged)


class GalleryReader:
    """An index's gallery, read block by block (memory-mapped)."""

    def __init__(self, folder: Path, meta: dict):
        self.folder, self.meta = Path(folder), meta

    @property
    def count(self) -> int:
        return int(self.meta["count"])

    def blocks(self, name: str = MAIN):
        """(first row, array) of each block, in gallery order."""
        first = 0
        for b, rows in enumerate(self.meta["blocks"]):
            yield first, _load_block(self.folder / BLOCKS / f"{b:06d}.{name}.npy")
            first += rows

    def rows(self, name: str, positions: np.ndarray) -> np.ndarray:
        """Rows of array `name` at gallery `positions` (any order), read from the blocks that hold them."""
        positions = np.asarray(positions, dtype=np.int64)
        starts = np.cumsum([0] + list(self.meta["blocks"]))
        if positions.size and (positions.min() < 0 or positions.max() >= starts[-1]):
            raise IndexError(f"gallery positions outside 0..{starts[-1] - 1}")
        block_of = np.searchsorted(starts, positions, side="right") - 1
        layout = self.meta["arrays"][name]
        out = np.empty((len(positions), *layout["shape"]), dtype=layout["dtype"])
        for b in np.unique(block_of):
            here = block_of == b
            block = _load_block(self.folder / BLOCKS / f"{b:06d}.{name}.npy")
            out[here] = block[positions[here] - starts[b]]
        return out

    def items(self) -> list[str]:
        try:
            with open(self.folder / ITEMS_FILE, encoding="utf-8") as f:
                items = [json.loads(line) for line in f]
        except (OSError, ValueError) as e:  # missing, or a line cut short
            raise IndexDamaged(f"{ITEMS_FILE} cannot be read ({e.__class__.__name__})") from None
        if len(items) != self.count:
            raise IndexDamaged(f"{ITEMS_FILE} holds {len(items)} items, {INDEX_FILE} says {self.count}")
        return items


def search_blocks(queries: torch.Tensor, gallery: GalleryReader, k: int, measure: str):
    """(scores [q, k], gallery positions [q, k]) best first, the tie rule across blocks too: each block's
    top-k in gallery order, merged (every position of a later block is larger)."""
    return blocked_topk(queries, gallery.blocks(MAIN), min(k, gallery.count), measure)
