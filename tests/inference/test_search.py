"""Search and export on the tiny trained runs: the shapes test split written out as image files (the shard's
own bytes, named by split index) and queried with its captions through the command line."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from pipeline.inference.export import main as export_cli
from pipeline.inference.runs import load_run
from pipeline.inference.search import main as search_cli
from tests.helpers.search import search

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def recall(lines: list[dict], captions, k: int) -> float:
    """t2i R@k in percent, from the search output: the caption's image among the first k paths."""
    assert [line["query"] for line in lines] == [c for _, c in captions]
    hits = [any(int(Path(r["path"]).stem) == image for r in line["results"][:k])
            for (image, _), line in zip(captions, lines)]
    return 100.0 * sum(hits) / len(hits)


@pytest.mark.parametrize("config", ["fine_grained", "hash_64bit"])
def test_search_ranks_as_evaluation_does(tiny_runs, test_split, tmp_path, capsys, config):
    folder, captions = test_split
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(c for _, c in captions) + "\n")
    assert search_cli(["index", "--run", str(tiny_runs[config]), "--images", str(folder), "--out",
                       str(tmp_path / "index"), "--workers", "0", "--no-progress"]) == 0
    lines = search(capsys, "query", "--index", tmp_path / "index", "--queries", queries, "-k", 10)
    metrics = json.loads((tiny_runs[config] / "test_metrics.json").read_text())
    assert recall(lines, captions, 1) == pytest.approx(metrics["t2i_R@1"], abs=1e-9)
    assert recall(lines, captions, 10) == pytest.approx(metrics["t2i_R@10"], abs=1e-9)
    scores = [r["score"] for r in lines[0]["results"]]
    if config.startswith("hash"):  # Hamming distances, smallest first, equal ones in file order
        assert all(isinstance(s, int) for s in scores) and scores == sorted(scores)
        paths = [r["path"] for r in lines[0]["results"]]
        assert all(a < b for a, b, sa, sb in zip(paths, paths[1:], scores, scores[1:]) if sa == sb)
    else:
        assert scores == sorted(scores, reverse=True) and -1.0 <= scores[-1] <= scores[0] <= 1.0


def test_index_and_query_without_the_dataset(tiny_runs, shapes_tiny, test_split, tmp_path, capsys):
    """A copy of the run whose config points at a copy of the data, which is then deleted."""
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(shapes_tiny, data)
    shutil.copytree(tiny_runs["hash_64bit"], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["root"] = str(data)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.rmtree(data)
    folder, captions = test_split
    assert search_cli(["index", "--run", str(run), "--images", str(folder), "--out", str(tmp_path / "index"),
                       "--workers", "0", "--no-progress"]) == 0
    moved = search(capsys, "query", "--index", tmp_path / "index", "--text", captions[0][1], "-k", 5)
    assert search_cli(["index", "--run", str(tiny_runs["hash_64bit"]), "--images", str(folder), "--out",
                       str(tmp_path / "index0"), "--workers", "0", "--no-progress"]) == 0
    assert moved == search(capsys, "query", "--index", tmp_path / "index0", "--text", captions[0][1], "-k", 5)


def test_export_gives_the_runs_vectors_and_opens_its_index(tiny_runs, test_split, tmp_path, capsys):
    folder, captions = test_split
    for config in ("fine_grained", "hash_64bit"):
        out = tmp_path / f"{config}_export"
        assert export_cli([str(tiny_runs[config]), "--out", str(out)]) == 0
        capsys.readouterr()
        run, exported = load_run(tiny_runs[config]), load_run(out)
        images = torch.stack([run.inputs.transform(Image.open(folder / "000003.png").convert("RGB"))])
        text = run.inputs.tokenize([c for _, c in captions[:7]])
        with torch.inference_mode():
            assert torch.equal(run.module.encode_images(images), exported.module.encode_images(images))
            assert torch.equal(run.module.encode_texts(text), exported.module.encode_texts(text))
        card = (out / "README.md").read_text()
        metrics = json.loads((tiny_runs[config] / "test_metrics.json").read_text())
        assert f"{metrics['t2i_R@1']:.2f}" in card and "commit" in card
        assert not (out / "checkpoints").exists() and (out / "model.safetensors").is_file()
    from safetensors.torch import load_file
    assert not [k for k in load_file(str(tmp_path / "hash_64bit_export" / "model.safetensors")) if "bank" in k]
    # an index built with the run opens with its export (the same weights), and answers the same
    assert search_cli(["index", "--run", str(tiny_runs["hash_64bit"]), "--images", str(folder), "--out",
                       str(tmp_path / "index"), "--workers", "0", "--no-progress"]) == 0
    args = ["query", "--index", tmp_path / "index", "--text", captions[5][1], "-k", 4]
    assert search(capsys, *args) == search(capsys, *args, "--run", tmp_path / "hash_64bit_export")


def test_bad_files_and_outside_links_are_skipped_counted_and_listed(tiny_runs, test_split, tmp_path, capsys):
    source, _ = test_split
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name in ("000000.png", "000001.png"):
        shutil.copyfile(source / name, folder / name)
    shutil.copyfile(source / "000002.png", folder / "sub" / "000002.png")
    (folder / "broken.png").write_bytes((source / "000003.png").read_bytes()[:120])  # truncated
    (folder / "notes.txt").write_text("not an image\n")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copyfile(source / "000004.png", outside / "x.png")
    (folder / "link.png").symlink_to(outside / "x.png")
    (folder / "linked_dir").symlink_to(outside)
    assert search_cli(["index", "--run", str(tiny_runs["fine_grained"]), "--images", str(folder), "--out",
                       str(tmp_path / "index"), "--workers", "0", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "index" / "index.json").read_text())
    assert meta["count"] == 3
    assert meta["skipped"] == {"corrupt": 1, "not_an_image": 1, "outside_folder": 2}
    assert {f["path"] for f in meta["skipped_files"]} == {"broken.png", "notes.txt", "link.png", "linked_dir"}
    items = [json.loads(line) for line in (tmp_path / "index" / "items.jsonl").read_text().splitlines()]
    assert items == ["000000.png", "000001.png", "sub/000002.png"]  # sorted path order


def test_an_index_refuses_a_run_whose_weights_changed(tiny_runs, test_split, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["fine_grained"], run)
    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle\n\na blue square on the left\n")
    assert search_cli(["index", "--run", str(run), "--texts", str(texts), "--out", str(tmp_path / "index"),
                       "--no-progress"]) == 0
    meta = json.loads((tmp_path / "index" / "index.json").read_text())
    assert (meta["count"], meta["skipped"]) == (2, {"empty_line": 1})
    assert search(capsys, "query", "--index", tmp_path / "index", "--text", "a red circle", "-k", 1)[0][
        "results"][0] == {"text": "a red circle", "score": pytest.approx(1.0, abs=1e-5)}
    assert search_cli(["query", "--index", str(tmp_path / "index"), "--text", "a red circle", "--screen-k", "5"]) == 2
    assert "not a token-level run" in capsys.readouterr().err  # a depth only token-level runs have
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    name = next(k for k in ckpt["state_dict"] if k.startswith("text_head"))
    ckpt["state_dict"][name] = ckpt["state_dict"][name] + 0.01
    torch.save(ckpt, run / "checkpoints" / "best.ckpt")
    assert search_cli(["query", "--index", str(tmp_path / "index"), "--text", "a red circle"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "weights differ" in err and "build the index again" in err


@pytest.mark.parametrize("config", ["hash_supervised_64bit", "hash_instance_64bit", "hash_nested"])
def test_every_hashing_family_exports_and_searches(tiny_hash_runs, test_split, tmp_path, capsys, config):
    folder, captions = test_split
    out = tmp_path / "export"
    assert export_cli([str(tiny_hash_runs[config]), "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    run = load_run(tiny_hash_runs[config])
    assert f"| family | hash ({run.cfg.hash.objective}) |" in card and run.representation in card
    metrics = json.loads((run.path / "test_metrics.json").read_text())
    for bits in run.module.prefixes:  # a nested run's card has each prefix's table
        assert f"first {bits}bit" in card and f"{metrics[f'{bits}bit/t2i_mAP@N']:.4f}" in card
    assert search_cli(["index", "--run", str(out), "--images", str(folder), "--out", str(tmp_path / "index"),
                       "--workers", "0", "--no-progress"]) == 0
    args = ["query", "--index", tmp_path / "index", "--text", captions[2][1], "-k", 5]
    found = search(capsys, *args)
    assert len(found[0]["results"]) == 5 and found == search(capsys, *args, "--run", run.path)
