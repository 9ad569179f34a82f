"""Search and export given bad input as a new user meets it: each gets one line naming the problem and the
way out (exit status 2), never a traceback or a hang."""
import json
import os
import shutil
import stat
import threading

import pytest

from pipeline.inference.export import main as export_cli
from pipeline.inference.search import main as search_cli
from tests.helpers.search import search

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _refused(capsys, cli, *args) -> str:
    """The command's exit status is 2 and it says why in one line; returns that line."""
    capsys.readouterr()
    assert cli(list(map(str, args))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def text_index(tiny_runs, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle\na blue square on the left\n")
    assert search_cli(["index", "--run", str(tiny_runs["fine_grained"]), "--texts", str(texts), "--out",
                       str(tmp_path / "index"), "--no-progress"]) == 0
    return tmp_path / "index"


def test_a_fifo_in_the_image_folder_is_skipped_not_waited_on(tiny_runs, test_split, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("000000.png", "000001.png"):
        shutil.copyfile(test_split[0] / name, folder / name)
    os.mkfifo(folder / "pipe.png")
    status = []
    args = ["index", "--run", str(tiny_runs["fine_grained"]), "--images", str(folder), "--out",
            str(tmp_path / "index"), "--workers", "0", "--no-progress"]
    worker = threading.Thread(target=lambda: status.append(search_cli(args)), daemon=True)
    worker.start()
    worker.join(120)
    if worker.is_alive():  # waiting for a writer on the FIFO: be one, so that the thread ends
        with open(folder / "pipe.png", "wb"):
            pass
        worker.join(30)
        pytest.fail("search index waited on a FIFO in the image folder")
    assert status == [0]
    meta = json.loads((tmp_path / "index" / "index.json").read_text())
    assert meta["count"] == 2 and meta["skipped"] == {"not_a_file": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "photos"]  # no staged folder left


def test_a_truncated_checkpoint_is_refused_in_one_line(tiny_runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["fine_grained"], run)
    best = run / "checkpoints" / "best.ckpt"
    best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    (tmp_path / "texts.txt").write_text("a red circle\n")
    err = _refused(capsys, search_cli, "index", "--run", run, "--texts", tmp_path / "texts.txt", "--out",
                   tmp_path / "index", "--no-progress")
    assert "best.ckpt" in err and "truncated or damaged" in err


@pytest.mark.parametrize("damage, fragment", [
    ("no_block", "000000.gallery.npy"), ("cut_items", "items.jsonl"), ("short_items", "items.jsonl"),
    ("empty_meta", "index.json"), ("bad_block", "000000.gallery.npy")])
def test_a_damaged_index_is_refused_in_one_line(text_index, capsys, damage, fragment):
    items, block = text_index / "items.jsonl", text_index / "blocks" / "000000.gallery.npy"
    if damage == "no_block":
        block.unlink()
    elif damage == "bad_block":
        block.write_bytes(block.read_bytes()[:100])
    elif damage == "cut_items":
        items.write_bytes(items.read_bytes()[:20])  # the second line cut in half
    elif damage == "short_items":
        items.write_text(items.read_text().splitlines()[0] + "\n")  # a line missing
    else:
        (text_index / "index.json").write_text("{}")
    err = _refused(capsys, search_cli, "query", "--index", text_index, "--text", "a red circle", "-k", 2)
    assert fragment in err and "build the index again" in err, err


def test_a_query_whose_run_moved_points_at_run(tiny_runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["fine_grained"], run)
    (tmp_path / "texts.txt").write_text("a red circle\na blue square on the left\n")
    assert search_cli(["index", "--run", str(run), "--texts", str(tmp_path / "texts.txt"), "--out",
                       str(tmp_path / "index"), "--no-progress"]) == 0
    run.rename(tmp_path / "moved")
    err = _refused(capsys, search_cli, "query", "--index", tmp_path / "index", "--text", "a red circle")
    assert str(run) in err and "--run" in err
    assert search(capsys, "query", "--index", tmp_path / "index", "--text", "a red circle", "--run",
                  tmp_path / "moved")[0]["results"][0]["text"] == "a red circle"


def test_scores_print_rounded_to_four_decimals(text_index, capsys):
    (line,) = search(capsys, "query", "--index", text_index, "--text", "a blue circle", "-k", 2)
    scores = [r["score"] for r in line["results"]]
    assert all(round(s, 4) == s for s in scores) and scores == sorted(scores, reverse=True), scores


def test_export_refuses_a_missing_run_and_an_unknown_checkpoint(tiny_runs, tmp_path, capsys):
    err = _refused(capsys, export_cli, tmp_path / "no_such_run", "--out", tmp_path / "e1")
    assert "no_such_run" in err and "no such" in err
    err = _refused(capsys, export_cli, tiny_runs["fine_grained"], "--out", tmp_path / "e2", "--checkpoint", "bogus")
    assert "bogus" in err and "last" in err
    assert not (tmp_path / "e1").exists() and not (tmp_path / "e2").exists()


def test_an_export_is_shareable_as_a_whole(tiny_runs, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert export_cli([str(tiny_runs["hash_64bit"]), "--out", str(tmp_path / "export")]) == 0
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path / "export").as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in (tmp_path / "export").rglob("*")}
    assert "model.safetensors" in modes and "README.md" in modes
    assert {n: m for n, m in modes.items() if m != (0o755 if (tmp_path / "export" / n).is_dir() else 0o644)} == {}
