"""Qualitative result panels: what each run retrieves for a few test queries, side by side.

    panels = build_panels(runs, encoded, seed=0)          # the rankings and their marks (the data drawn)
    paths = draw_panels(panels, runs[0], out)             # panels_t2i.png, panels_i2t.png

A fixed, seeded sample of the test split's captions (text to image) and images (image to text) is
ranked by every run over the whole test gallery, as its evaluation ranks (its measure, the tie rule;
a token-level run by its token scorer over every item, exhaustively), and each run's top 5 are drawn in
a row beside the query: the correct item (the caption's own image; a caption of the query image) framed
green, an item sharing a category label with the query's image framed orange. Every run of the report
sees the same queries (the runs must share the test split). Images and captions are read from the
split's own shards.
"""
from __future__ import annotations

import io
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.data import MAX_CAPTIONS  # a caption's id: its image's index x MAX_CAPTIONS + its number
from pipeline.evaluation.exhaustive import topk_search

TOP = 5
CORRECT, CATEGORY, OTHER = "correct", "category", ""
COLOURS = {CORRECT: "#00b050", CATEGORY: "#ff8c00", OTHER: "#bbbbbb"}  # no shape is drawn in pure green (R = 0)


@dataclass
class Panel:
    direction: str  # "t2i": caption queries, image results; "i2t": image queries, caption results
    queries: list[int]  # rows of the split's captions (t2i) or images (i2t), in id order
    top: dict[str, list[list[int]]] = field(default_factory=dict)  # run -> per query, result rows best first
    marks: dict[str, list[list[str]]] = field(default_factory=dict)  # run -> per query, per result: a mark


def sample_queries(count: int, n: int, seed: int) -> list[int]:
    return sorted(np.random.default_rng(seed).choice(count, size=min(n, count), replace=False).tolist())


def ranked(run, enc, direction: str, queries: list[int], k: int = TOP) -> list[list[int]]:
    """Gallery rows of each query's top k, best first (equal scores in gallery order)."""
    if enc.has_tokens:
        images, texts = enc.token_sets()
        scorer = run.module.token_scorer
        with torch.inference_mode():
            rows = torch.tensor(queries)
            grid = scorer(images, texts[rows]).T if direction == "t2i" else scorer(images[rows], texts)
        order = torch.sort(grid.float(), dim=1, descending=True, stable=True).indices[:, :k]
        return order.tolist()
    q, g = ((enc.text_gallery, enc.image_gallery) if direction == "t2i" else (enc.image_gallery, enc.text_gallery))
    _, idx = topk_search(torch.from_numpy(np.ascontiguousarray(q[queries])), torch.from_numpy(g), k, run.measure)
    return idx.tolist()


def mark(enc, direction: str, query: int, result: int) -> str:
    """Correct (the pair), category (shares a label with the query's image) or neither."""
    query_image, result_image = ((enc.caption_image[query], result) if direction == "t2i"
                                 else (query, enc.caption_image[result]))
    if query_image == result_image:
        return CORRECT
    return CATEGORY if bool((enc.labels[query_image] & enc.labels[result_image]).any()) else OTHER


def build_panels(runs, encoded, seed: int = 0, text_queries: int = 4, image_queries: int = 4) -> list[Panel]:
    first = encoded[0]
    same = [(r, e) for r, e in zip(runs, encoded)
            if np.array_equal(e.image_ids, first.image_ids) and np.array_equal(e.text_ids, first.text_ids)]
    panels = [Panel("t2i", sample_queries(first.num_texts, text_queries, seed)),
              Panel("i2t", sample_queries(first.num_images, image_queries, seed + 1))]
    for panel in panels:
        for run, enc in same:
            panel.top[run.name] = ranked(run, enc, panel.direction, panel.queries)
            panel.marks[run.name] = [[mark(enc, panel.direction, q, r) for r in row]
                                     for q, row in zip(panel.queries, panel.top[run.name])]
    return panels


def read_media(run, enc, panels: list[Panel]) -> tuple[dict, dict]:
    """({image row: PIL image}, {caption row: text}) of every query and result drawn, from the test shards."""
    import webdataset as wds
    from PIL import Image

    image_rows, caption_rows = set(), set()
    for p in panels:
        queries, results = set(p.queries), {r for rows in p.top.values() for row in rows for r in row}
        image_rows |= queries if p.direction == "i2t" else results
        caption_rows |= results if p.direction == "i2t" else queries
        if p.direction == "t2i":
            image_rows |= {int(enc.caption_image[q]) for q in p.queries}
    want_images = {int(enc.image_ids[r]): r for r in image_rows}
    want_captions = {int(enc.text_ids[r]): r for r in caption_rows}
    card = run.datamodule.card
    images, captions, position = {}, {}, 0
    for sample in wds.WebDataset(card.shards("test"), shardshuffle=False):
        meta = json.loads(sample["json"]) if "json" in sample else {}
        index = int(meta.get("index", position))  # shards made by others carry no index: their order
        position += 1
        texts = meta.get("captions") or [meta.get("caption") or sample.get("txt", b"").decode("utf-8", "replace")]
        for j, text in enumerate(texts):
            if index * MAX_CAPTIONS + j in want_captions:
                captions[want_captions[index * MAX_CAPTIONS + j]] = text
        if index in want_images:
            data = next((sample[key] for key in (card.image_key, "png", "jpg", "jpeg", "webp") if key in sample), None)
            if data is not None:
                images[want_images[index]] = Image.open(io.BytesIO(data)).convert("RGB")
    return images, captions


def draw_panels(panels: list[Panel], images: dict, captions: dict, out: Path) -> dict[str, Path]:
    """One PNG per direction: a row per query, the query then each run's top 5 (framed by their marks)."""
    from pipeline.comparison.plots import _plt

    plt, paths = _plt(), {}
    for panel in panels:
        names = list(panel.top)
        if not names:
            continue
        t2i = panel.direction == "t2i"
        cell = 1.25 if t2i else 2.0  # a result: a thumbnail, or a caption
        group = TOP + 1  # a narrow empty column, then a run's top 5
        rows, cols = len(panel.queries), 1 + len(names) * group
        ratios = [1.8 / cell] + ([0.15] + [1] * TOP) * len(names)
        fig, axes = plt.subplots(rows, cols, figsize=(1.8 + cell * (sum(ratios) - 1.8 / cell), 0.35 + 1.35 * rows),
                                 squeeze=False, gridspec_kw={"width_ratios": ratios})
        for ax in axes[:, 1::group].ravel():
            ax.axis("off")
        for i, query in enumerate(panel.queries):
            if t2i:
                _text(axes[i][0], captions.get(query, "?"), OTHER, 26)
            else:
                _image(axes[i][0], images.get(query), OTHER)
            for j, name in enumerate(names):
                for rank, (row, m) in enumerate(zip(panel.top[name][i], panel.marks[name][i])):
                    ax = axes[i][2 + j * group + rank]
                    _image(ax, images.get(row), m) if t2i else _text(ax, captions.get(row, "?"), m, 30)
                    if i == 0 and rank == 0:
                        ax.set_title(name, loc="left", fontsize=9, fontweight="bold")
        axes[0][0].set_title("text query" if t2i else "image query", loc="left", fontsize=9)
        fig.suptitle(f"{'text to image' if t2i else 'image to text'}: top {TOP} per run "
                     f"(green: the correct item, orange: shares a category)", fontsize=10, y=0.995)
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        paths[f"panels_{panel.direction}"] = out / f"panels_{panel.direction}.png"
        fig.savefig(paths[f"panels_{panel.direction}"], dpi=80)
        plt.close(fig)
    return paths


def _frame(ax, mark_: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(COLOURS[mark_])
        spine.set_linewidth(4 if mark_ else 1)


def _image(ax, image, mark_: str) -> None:
    if image is not None:
        ax.imshow(image)
    _frame(ax, mark_)


def _text(ax, text: str, mark_: str, width: int) -> None:
    ax.text(0.04, 0.5, textwrap.fill(text, width, max_lines=5, placeholder=" ..."), fontsize=7, va="center",
            ha="left", transform=ax.transAxes)
    _frame(ax, mark_)


def panel_markdown(panels: list[Panel], paths: dict) -> list[str]:
    """The report's section: the figures and what their frames mean."""
    if not paths:
        return []
    lines = ["", "## Qualitative results", "",
             f"Each run's top {TOP} over the test gallery for the same seeded sample of test queries "
             f"({len(panels[0].queries)} captions, {len(panels[1].queries)} images; `--seed`), ranked as its "
             "evaluation ranks (token-level runs: every item token-scored). Green frame: the correct item (the "
             "caption's own image; a caption of the query image); orange: shares a category label with the "
             "query's image.", ""]
    return lines + [f"![{name}]({path.name})" for name, path in paths.items()] + [""]


def panels_record(panels: list[Panel], enc) -> dict:
    """What the figures show, by the split's ids (caption id = image index x MAX_CAPTIONS + caption number):
    {direction: {"queries": [id], "runs": {run: [[{"id", "mark"}] per query]}}} (panels.json)."""
    def ids(direction: str, side: str):
        return enc.text_ids if (direction == "t2i") == (side == "query") else enc.image_ids

    return {p.direction: {"queries": [int(ids(p.direction, "query")[q]) for q in p.queries],
                          "runs": {name: [[{"id": int(ids(p.direction, "result")[r]), "mark": m}
                                           for r, m in zip(row, marks)] for row, marks in zip(p.top[name], p.marks[name])]
                                   for name in p.top}} for p in panels}


def write_panels(runs, encoded, out: Path, seed: int = 0) -> tuple[list[Panel], dict[str, Path]]:
    """Builds, reads the media of and draws the panels into `out` (and panels.json); (panels, {name: png})."""
    panels = build_panels(runs, encoded, seed)
    (out / "panels.json").write_text(json.dumps(panels_record(panels, encoded[0]), indent=1) + "\n")
    images, captions = read_media(runs[0], encoded[0], panels)
    return panels, draw_panels(panels, images, captions, out)
