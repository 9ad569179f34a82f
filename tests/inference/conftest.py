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
