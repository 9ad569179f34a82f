"""Search and export with the tiny token-level runs: the index holds each item's global embedding and token
set, and a query ranks as screened evaluation does (the global embedding's top K by cosine, re-ranked by
the run's token scorer). The expected rankings are computed here from the definitions, with the module's
encoders and scorer and plain Python sorts."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.inference.export import main as export_cli
from pipeline.inference.runs import load_run
from pipeline.inference.search import SearchError, SearchIndex, build_image_index, main as search_cli
from tests.helpers.search import search

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SCREEN_K = 16  # tiny_token_runs' tokens.screen_k


@torch.inference_mode()
def _encoded(run, folder: Path, texts: list[str]):
    """(global image embeddings, image token set, global text embeddings, text token set) straight from the
    module, the images in file order."""
    pixels = torch.stack([run.inputs.transform(Image.open(f).convert("RGB")) for f in sorted(folder.iterdir())])
    img, img_set = run.module.encode_images_with_tokens(pixels)
    txt, txt_set = run.module.encode_texts_with_tokens(run.inputs.tokenize(texts))
    return img, img_set, txt, txt_set


def _two_stage(screen: torch.Tensor, fine: torch.Tensor, depth: int, k: int) -> list[list[int]]:
    """Per query row: the `depth` best gallery columns by screen score, re-ordered by fine score, first k;
    equal scores in gallery order at both stages."""
    out = []
    for s, f in zip(screen.tolist(), fine.tolist()):
        kept = sorted(range(len(s)), key=lambda g: (-s[g], g))[:depth]
        out.append(sorted(kept, key=lambda g: (-f[g], g))[:k])
    return out


def _cosine(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    return F.normalize(queries.float(), dim=1) @ F.normalize(gallery.float(), dim=1).T


def _ranks_and_scores(lines: list[dict]) -> tuple[list[list[int]], list[list[float]]]:
    return ([[int(Path(r["path"]).stem) for r in line["results"]] for line in lines],
            [[r["score"] for r in line["results"]] for line in lines])


@pytest.mark.parametrize("config", ["fine_grained_tokens", "fine_grained_scan"])
def test_image_search_ranks_as_screened_token_scoring(tiny_token_runs, test_split, tmp_path, capsys, config):
    folder, captions = test_split
    texts = [c for _, c in captions]
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(texts) + "\n")
    assert search_cli(["index", "--run", str(tiny_token_runs[config]), "--images", str(folder), "--out",
                       str(tmp_path / "index"), "--workers", "0", "--no-progress"]) == 0
    run = load_run(tiny_token_runs[config])
    img, img_set, txt, txt_set = _encoded(run, folder, texts)
    meta = json.loads((tmp_path / "index" / "index.json").read_text())
    regions, dim = img_set.tokens.shape[1:]
    assert meta["bytes_per_item"] == img.shape[1] * 4 + regions * dim * 4 + regions  # screen, tokens, mask
    token_scores = run.module.token_scorer(img_set, txt_set).T  # [captions, images]
    cosine = _cosine(txt, img)
    n = img.shape[0]

    ranks, scores = _ranks_and_scores(search(capsys, "query", "--index", tmp_path / "index", "--queries", queries,
                                             "-k", 10))
    assert ranks == _two_stage(cosine, token_scores, SCREEN_K, 10)
    expected = [[token_scores[q, g].item() for g in row] for q, row in enumerate(ranks)]
    assert scores == [pytest.approx(row, abs=6e-5) for row in expected]  # token scores (printed to 4 decimals)
    assert ranks != _two_stage(cosine, cosine, n, 10)  # the token scorer changed the global ranking

    # a screen as deep as the gallery: the token scorer's own (exhaustive) ranking
    ranks, scores = _ranks_and_scores(search(capsys, "query", "--index", tmp_path / "index", "--queries", queries,
                                             "-k", 10, "--screen-k", n))
    assert ranks == _two_stage(token_scores, token_scores, n, 10)
    assert ranks != _two_stage(cosine, token_scores, SCREEN_K, 10)  # the depth K is what it is told


def test_an_index_in_many_blocks_answers_the_same(tiny_token_runs, test_split, tmp_path):
    """Blocks of 10 rows: the screen merges them under the tie rule and candidates are read across them."""
    folder, captions = test_split
    run = load_run(tiny_token_runs["fine_grained_tokens"])
    one = build_image_index(run, folder, tmp_path / "one", workers=0, progress=False)
    many = build_image_index(run, folder, tmp_path / "many", batch_size=10, workers=0, progress=False,
                             block_rows=10)
    assert len(one["blocks"]) == 1 and len(many["blocks"]) == 7
    texts = [c for _, c in captions[::7]]
    for depth in (None, 40):
        assert (SearchIndex.open(tmp_path / "many", run).query_texts(texts, k=12, screen_k=depth)
                == SearchIndex.open(tmp_path / "one", run).query_texts(texts, k=12, screen_k=depth))


def test_text_gallery_queried_with_images(tiny_token_runs, test_split, tmp_path):
    """The other side: captions as the gallery (padded to the run's max_text_len), images as queries; with the
    one-directional cross-attention run, whose score changes when images and captions swap roles."""
    folder, captions = test_split
    texts = [c for _, c in captions]
    gallery = tmp_path / "captions.txt"
    gallery.write_text("\n".join(texts) + "\n")
    run = load_run(tiny_token_runs["fine_grained_scan"])
    assert search_cli(["index", "--run", str(run.path), "--texts", str(gallery), "--out", str(tmp_path / "index"),
                       "--no-progress"]) == 0
    meta = json.loads((tmp_path / "index" / "index.json").read_text())
    assert meta["arrays"]["tokens"]["shape"] == [run.inputs.max_text_len, run.cfg.tokens.dim]
    img, img_set, txt, txt_set = _encoded(run, folder, texts)
    images = sorted(folder.iterdir())[:6]
    found = SearchIndex.open(tmp_path / "index", run).query_images(images, k=8)
    expected = _two_stage(_cosine(img[:6], txt), run.module.token_scorer(img_set[:6], txt_set), SCREEN_K, 8)
    assert [[texts.index(t) for t, _ in row] for row in found] == expected  # shapes captions are distinct
    assert len(set(texts)) == len(texts)
    # an index of global embeddings only (as made before token-level search) is refused, not searched
    meta["arrays"] = {"gallery": meta["arrays"]["screen"]}
    (tmp_path / "index" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(SearchError, match="build it again"):
        SearchIndex.open(tmp_path / "index", run)


def test_export_of_a_token_run_searches_identically(tiny_token_runs, test_split, tmp_path, capsys):
    folder, captions = test_split
    run_dir = tiny_token_runs["fine_grained_scan"]
    out = tmp_path / "export"
    assert export_cli([str(run_dir), "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    run = load_run(run_dir)
    assert "CrossAttention (t2i)" in card and f"{run.cfg.tokens.dim}-d" in card and f"top {SCREEN_K}" in card
    assert search_cli(["index", "--run", str(run_dir), "--images", str(folder), "--out", str(tmp_path / "index"),
                       "--workers", "0", "--no-progress"]) == 0
    assert search_cli(["index", "--run", str(out), "--images", str(folder), "--out", str(tmp_path / "index_export"),
                       "--workers", "0", "--no-progress"]) == 0
    query = ["--text", captions[3][1], "-k", 5]
    from_run = search(capsys, "query", "--index", tmp_path / "index", *query)
    assert from_run == search(capsys, "query", "--index", tmp_path / "index_export", *query)
    assert from_run == search(capsys, "query", "--index", tmp_path / "index", *query, "--run", out)
