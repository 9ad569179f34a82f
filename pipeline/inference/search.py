"""Search your own images and texts with a trained run (or its export).

    python -m pipeline.search index --run RUN --images DIR --out INDEX      # every image file under DIR
    python -m pipeline.search index --run RUN --texts FILE --out INDEX      # one text per line
    python -m pipeline.search query --index INDEX --text "a red circle" -k 10
    python -m pipeline.search query --index INDEX --image photo.jpg -k 10
    python -m pipeline.search query --index INDEX --queries FILE -k 10      # one text per line
    python -m pipeline.search serve --index INDEX [--port 8000]            # a search page on 127.0.0.1

A query prints one JSON line: {"query": ..., "results": [{"path" | "text": ..., "score": ...}, ...]},
best first: cosine similarity for fine-grained runs, Hamming distance for hashing runs (smallest
first), the token score for token-level runs (the global embedding's top `tokens.screen_k`, or
--screen-k, re-ranked by the run's token scorer, as its screened evaluation ranks); equal scores in
gallery order (the protocol's tie rule). Images are read with the run's own
evaluation preprocessing and texts with its own tokenizer, through the module's encode_images /
encode_texts and gallery_features, so a search ranks exactly as evaluation does for the same pixels
and texts. The index records the run and refuses to open, in one line, when its weights changed.

Python:  build_image_index(run, folder, out); index = SearchIndex.open(out); index.query_texts([...], k)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from pipeline.cli import progress_bar
from pipeline.inference.folder import image_batches, load_image, scan_images
from pipeline.inference.index import (INDEX_FILE, MAX_LISTED_SKIPS, GalleryReader, IndexDamaged, IndexWriter,
                                      search_blocks)
from pipeline.inference.runs import Run, RunError, load_run

BLOCK_ROWS = 1 << 16  # gallery rows per block file
META_KEYS = ("gallery", "run", "measure", "arrays", "count", "blocks", "root")  # what a query reads of index.json


class SearchError(RunError):
    """An index or a query that cannot be used, explained in one line."""


def _runnable(run: Run) -> Run:
    if not run.inputs.takes_pixels:
        raise SearchError(f"{run.path} was trained on feature shards: its encoders take features, not images "
                          f"and texts; search needs a run trained on images")
    return run


@torch.inference_mode()
def encode_images(run: Run, images: torch.Tensor):
    return _gallery_features(run.module, *run.module.encode_images_with_tokens(images))


@torch.inference_mode()
def encode_texts(run: Run, texts: list[str], token_slots: int | None = None):
    """`token_slots`: a token-level run's caption token sets padded to that many slots (a gallery's blocks
    hold one width: the run's max_text_len)."""
    return _gallery_features(run.module, *run.module.encode_texts_with_tokens(run.inputs.tokenize(texts)),
                             token_slots)


def _gallery_features(module, output: torch.Tensor, tokens, token_slots: int | None = None):
    """What the index stores and queries are searched with: gallery_features, with the token set for a
    token-level run (its search screens by the global embedding and re-ranks by tokens)."""
    if tokens is None:
        return module.gallery_features(output)
    return module.gallery_features(output, tokens if token_slots is None else tokens.padded(token_slots))


def _run_meta(run: Run) -> dict:
    return {"path": str(run.path.resolve()), "name": run.name, "fingerprint": run.fingerprint}


def build_image_index(run, folder, out, batch_size: int = 64, workers: int = 2, progress: bool = True,
                      block_rows: int = BLOCK_ROWS) -> dict:
    """Indexes every image file under `folder` (a run folder, export, or loaded Run); returns index.json."""
    run = _runnable(run if isinstance(run, Run) else load_run(run))
    folder, out, start = Path(folder), _new_folder(out), time.perf_counter()
    if not folder.is_dir():
        raise SearchError(f"--images {folder}: no such folder")
    files, skipped = scan_images(folder)
    writer = IndexWriter(out, block_rows)
    try:
        with progress_bar(len(files), f"index {folder}", progress, "img") as bar:
            for batch in image_batches(folder, files, run.inputs.transform, batch_size, workers):
                skipped += [(files[i], reason) for i, reason in batch["skipped"]]
                if batch["positions"]:
                    writer.add(encode_images(run, batch["images"]), [files[i] for i in batch["positions"]])
                bar.update(len(batch["positions"]) + len(batch["skipped"]))
        if not writer.count:
            raise SearchError(f"--images {folder}: no readable image among {len(files)} file(s)")
        return writer.finish(_meta(run, "images", str(folder.resolve()), skipped, start))
    except BaseException:
        writer.abort()
        raise


def build_text_index(run, texts_file, out, batch_size: int = 256, progress: bool = True,
                     block_rows: int = BLOCK_ROWS) -> dict:
    """Indexes every non-empty line of `texts_file`; returns index.json."""
    run = _runnable(run if isinstance(run, Run) else load_run(run))
    out, start = _new_folder(out), time.perf_counter()
    lines = _read_lines(texts_file, "--texts")
    texts = [t for t in lines if t.strip()]
    skipped = [(f"line {n + 1}", "empty_line") for n, t in enumerate(lines) if not t.strip()]
    if not texts:
        raise SearchError(f"--texts {texts_file}: no text in it")
    writer = IndexWriter(out, block_rows)
    try:
        with progress_bar(len(texts), f"index {texts_file}", progress, "text") as bar:
            for first in range(0, len(texts), batch_size):
                chunk = texts[first:first + batch_size]
                writer.add(encode_texts(run, chunk, run.inputs.max_text_len), chunk)
                bar.update(len(chunk))
        return writer.finish(_meta(run, "texts", str(Path(texts_file).resolve()), skipped, start))
    except BaseException:
        writer.abort()
        raise


def _meta(run: Run, gallery: str, root: str, skipped: list, start: float) -> dict:
    return {"gallery": gallery, "run": _run_meta(run), "measure": run.module.measure, "root": root,
            "skipped": dict(Counter(reason for _, reason in skipped)),
            "skipped_files": [{"path": p, "reason": r} for p, r in skipped[:MAX_LISTED_SKIPS]],
            "seconds": round(time.perf_counter() - start, 3)}


def _new_folder(out) -> Path:
    out = Path(out)
    if out.exists():
        raise SearchError(f"--out {out} exists: give a new folder (an index is never written into another one)")
    return out


def _read_lines(path, option: str) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SearchError(f"{option} {path}: cannot be read as UTF-8 text ({e.__class__.__name__})") from None


class SearchIndex:
    """An index opened with the run it was built with (or `run`: the same weights moved, or exported)."""

    def __init__(self, folder: Path, meta: dict, run: Run):
        self.folder, self.meta, self.run = folder, meta, run
        self.gallery = GalleryReader(folder, meta)
        self.item_key = "path" if meta["gallery"] == "images" else "text"
        self._items: list[str] | None = None

    @classmethod
    def open(cls, folder, run=None) -> "SearchIndex":
        folder = Path(folder)
        try:
            meta = json.loads((folder / INDEX_FILE).read_text())
        except (OSError, ValueError):
            raise SearchError(f"--index {folder}: not an index (no readable {INDEX_FILE})") from None
        missing = [k for k in META_KEYS if k not in meta] if isinstance(meta, dict) else list(META_KEYS)
        if missing or not isinstance(meta["run"], dict) or not {"path", "fingerprint"} <= set(meta["run"]):
            raise SearchError(f"--index {folder}: {INDEX_FILE} lacks {', '.join(missing) or 'run.path'} (damaged, or "
                              f"not written by this tool): build the index again")
        if run is None and not Path(meta["run"]["path"]).is_dir():
            raise SearchError(f"--index {folder} was built with {meta['run']['path']}, which is no longer there: give "
                              f"the run's new folder (or its export) with --run")
        run = run if isinstance(run, Run) else load_run(run or meta["run"]["path"])
        if run.fingerprint != meta["run"]["fingerprint"]:
            raise SearchError(f"--index {folder} was built with {meta['run']['path']} and {run.path}'s weights "
                              f"differ from those (changed since, or another run): build the index again")
        if hasattr(run.module, "search_gallery") and "screen" not in meta.get("arrays", {}):
            raise SearchError(f"--index {folder} holds only global embeddings (built before token-level search): "
                              f"build it again to search with {run.path}'s token scorer")
        return cls(folder, meta, _runnable(run))

    @property
    def items(self) -> list[str]:
        if self._items is None:
            try:
                self._items = self.gallery.items()
            except IndexDamaged as e:
                raise SearchError(f"--index {self.folder}: {e}: build the index again") from None
        return self._items

    def search(self, queries, k: int, screen_k: int | None = None) -> list[list[tuple[str, float]]]:
        """Top-k (item, score) per query, given the queries' gallery_features. `screen_k`: a token-level
        run's screen depth (default: its tokens.screen_k)."""
        return self.named(self.ranked(queries, k, screen_k))

    def ranked(self, queries, k: int, screen_k: int | None = None) -> list[list[tuple[int, float]]]:
        """Top-k (gallery position, score) per query: what `search` names."""
        module = self.run.module
        try:
            if hasattr(module, "search_gallery"):  # a family with its own search (screen, then tokens)
                scores, positions = module.search_gallery(queries, self.gallery, k, screen_k)
            else:
                scores, positions = search_blocks(queries, self.gallery, k, self.meta["measure"])
        except IndexDamaged as e:
            raise SearchError(f"--index {self.folder}: {e}: build the index again") from None
        hamming = self.meta["measure"] == "hamming"
        return [[(p, int(-s) if hamming else float(s)) for s, p in zip(row_s.tolist(), row_p.tolist())]
                for row_s, row_p in zip(scores, positions)]

    def named(self, ranked: list[list[tuple[int, float]]]) -> list[list[tuple[str, float]]]:
        return [[(self._item(p), s) for p, s in row] for row in ranked]

    def _item(self, position: int) -> str:
        item = self.items[position]
        return str(Path(self.meta["root"]) / item) if self.item_key == "path" else item

    def line(self, query: str, found: list[tuple[str, float]]) -> str:
        """The JSON line `query` prints for one query and its (item, score) list."""
        return result_line(query, found, self.item_key)

    def query_texts(self, texts: list[str], k: int = 10, batch_size: int = 256,
                    screen_k: int | None = None) -> list[list[tuple[str, float]]]:
        out = []
        for first in range(0, len(texts), batch_size):
            out += self.search(encode_texts(self.run, texts[first:first + batch_size]), k, screen_k)
        return out

    def query_images(self, paths: list, k: int = 10, screen_k: int | None = None) -> list[list[tuple[str, float]]]:
        pixels = []
        for path in paths:
            image, reason = load_image(Path(path), self.run.inputs.transform)
            if image is None:
                raise SearchError(f"--image {path}: {reason.replace('_', ' ')}")
            pixels.append(image)
        return self.named(self.rank_pixels(pixels, k, screen_k))

    def rank_pixels(self, pixels: list[torch.Tensor], k: int, screen_k: int | None = None):
        """Images already read with the run's transform: top-k (gallery position, score) per image."""
        return self.ranked(encode_images(self.run, torch.stack(pixels)), k, screen_k)

    def rank_texts(self, texts: list[str], k: int, screen_k: int | None = None):
        return self.ranked(encode_texts(self.run, texts), k, screen_k)


def result_line(query: str, results: list[tuple[str, float]], item_key: str) -> str:
    """One query's JSON line; similarities to 4 decimals (Hamming distances are whole numbers)."""
    return json.dumps({"query": query, "results": [{item_key: item, "score": round(score, 4)}
                                                   for item, score in results]}, ensure_ascii=False)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    idx = sub.add_parser("index", help="encode a folder of images (or a file of texts) into an index")
    idx.add_argument("--run", required=True, type=Path, help="a run folder or an export")
    source = idx.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="a folder: every image file under it, recursively")
    source.add_argument("--texts", type=Path, help="a text file: one gallery text per line")
    idx.add_argument("--out", required=True, type=Path, help="the index folder to create")
    idx.add_argument("--batch-size", type=int, default=64)
    idx.add_argument("--workers", type=int, default=2, help="image decoding processes")
    idx.add_argument("--no-progress", action="store_true")
    q = sub.add_parser("query", help="search an index; prints one JSON line per query")
    q.add_argument("--index", required=True, type=Path)
    what = q.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a text query")
    what.add_argument("--image", type=Path, help="an image query")
    what.add_argument("--queries", type=Path, help="a text file: one query per line")
    q.add_argument("-k", type=int, default=10, help="results per query")
    q.add_argument("--run", type=Path, help="the run (or its export) if it moved since the index was built")
    q.add_argument("--screen-k", type=int, help="token-level runs: how many of the global embedding's best the "
                   "token scorer re-ranks (default: the run's tokens.screen_k; >= the gallery: every item)")
    web = sub.add_parser("serve", help="a search page and a JSON API over an index (needs the [serve] extra)")
    web.add_argument("--index", required=True, type=Path)
    web.add_argument("--run", type=Path, help="the run (or its export) if it moved since the index was built")
    web.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this "
                     "machine only; any other makes the index readable by whoever reaches it)")
    web.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    web.add_argument("--screen-k", type=int, help="token-level runs: the screen depth, as for query")
    args = p.parse_args(argv)
    if (getattr(args, "k", 1) < 1 or getattr(args, "batch_size", 1) < 1 or getattr(args, "workers", 0) < 0
            or (getattr(args, "screen_k", None) is not None and args.screen_k < 1)):
        p.error("-k, --screen-k and --batch-size must be >= 1, --workers >= 0")
    if not 0 <= getattr(args, "port", 0) <= 65535:
        p.error("--port must be from 0 (any free port) to 65535")
    return args


def _open_for_queries(args) -> SearchIndex:
    index = SearchIndex.open(args.index, args.run)
    if args.screen_k is not None and not index.run.tokens:
        raise SearchError(f"--screen-k: {index.run.path} is not a token-level run (it has no screen to set)")
    return index


def run_serve(args) -> None:
    """The search page (pipeline/inference/serve.py) over the index, opened and checked as `query` opens it."""
    try:
        from pipeline.inference.serve import serve
    except ImportError as e:
        raise SearchError(f"serve needs Flask ({e.name} is not installed): pip install -e '.[serve]'") from None
    index = _open_for_queries(args)
    try:
        serve(index, args.host, args.port, args.screen_k)
    except OSError as e:  # the address is taken, or not this machine's
        raise SearchError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}): give another --port "
                          f"(0: any free one) or --host") from None


def run_query(args) -> None:
    index = _open_for_queries(args)
    if args.image is not None:
        queries, results = [str(args.image)], index.query_images([args.image], args.k, args.screen_k)
    else:
        queries = [args.text] if args.text is not None else [t for t in _read_lines(args.queries, "--queries")
                                                            if t.strip()]
        results = index.query_texts(queries, args.k, screen_k=args.screen_k)
    for query, found in zip(queries, results):
        print(index.line(query, found))


def main(argv=None) -> int:
    """Exit status: 0 done, 2 an input that cannot be used (one line on stderr)."""
    args = parse_args(argv)
    try:
        if args.command in ("query", "serve"):
            (run_query if args.command == "query" else run_serve)(args)
            return 0
        if args.images is not None:
            meta = build_image_index(args.run, args.images, args.out, args.batch_size, args.workers,
                                     not args.no_progress)
        else:
            meta = build_text_index(args.run, args.texts, args.out, args.batch_size, not args.no_progress)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(meta["skipped"].items())) or "nothing"
    print(f"{args.out}: {meta['count']} {meta['gallery']} indexed with {meta['run']['name']} in "
          f"{meta['seconds']:.1f} s ({meta['bytes_per_item']:,} bytes per item); skipped: {skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
