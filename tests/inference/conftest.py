"""Fixtures of the inference tests: a split of the tiny shapes set written out as image files."""
import json

import pytest
import webdataset as wds

from data_prep import read_card


@pytest.fixture(scope="session")
def test_split(shapes_tiny, tmp_path_factory):
    """(folder of the test images as files, [(image index, caption)] in evaluation's caption order)."""
    folder = tmp_path_factory.mktemp("photos")
    card = read_card(shapes_tiny)
    captions = []
    for sample in wds.WebDataset([str(shapes_tiny / s) for s in card["splits"]["test"]["shards"]], shardshuffle=False):
        meta = json.loads(sample["json"])
        (folder / f"{meta['index']:06d}.png").write_bytes(sample["png"])
        captions += [(meta["index"], c) for c in meta["captions"]]
    return folder, sorted(captions, key=lambda ic: ic[0])  # by image, each image's captions in order


@pytest.fixture(scope="session")
def serve_gallery(test_split, tmp_path_factory):
    """(the test images copied to a folder of their own, a secret file beside that folder): what the search
    page's tests index, and what it must never serve."""
    import shutil

    base = tmp_path_factory.mktemp("serve")
    folder = base / "photos"
    shutil.copytree(test_split[0], folder)
    secret = base / "secret.txt"
    secret.write_text("SECRET-outside-the-gallery\n")
    return folder, secret


@pytest.fixture(scope="session")
def serve_index(tiny_runs, serve_gallery, tmp_path_factory):
    """The fine-grained tiny run's index of `serve_gallery`'s images."""
    from pipeline.inference.search import build_image_index

    out = tmp_path_factory.mktemp("serve_index") / "photos.index"
    build_image_index(tiny_runs["fine_grained"], serve_gallery[0], out, workers=0, progress=False)
    return out


@pytest.fixture(scope="session")
def served(serve_index, tmp_path_factory):
    """`python -m pipeline.search serve` over `serve_index`, a real server on 127.0.0.1 at a free port."""
    from tests.helpers.serve import start_server

    server = start_server(serve_index, tmp_path_factory.mktemp("serve_log") / "stderr.txt")
    yield server
    server.stop()
