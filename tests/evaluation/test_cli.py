"""`python -m pipeline.evaluate` on saved .npy features gives evaluate()'s numbers."""
import json

import numpy as np
import pytest
import torch

from pipeline.evaluation import cli
from pipeline.evaluation.scores import pack_codes
from pipeline.metrics import evaluate


@pytest.mark.parametrize("measure", ["cosine", "hamming"])
def test_evaluate_cli_equals_functional_evaluate(tmp_path, capsys, measure):
    rng = np.random.default_rng(0)
    img = rng.standard_normal((40, 16)).astype(np.float32)
    cap = rng.permutation(np.arange(130) % 40)  # 3-4 captions per image, shuffled
    txt = img[cap] + rng.standard_normal((130, 16)).astype(np.float32)
    labels = (rng.random((40, 5)) < 0.3).astype(np.uint8)
    if measure == "hamming":
        img, txt = pack_codes(torch.from_numpy(img)).numpy(), pack_codes(torch.from_numpy(txt)).numpy()
    for name, arr in (("img", img), ("txt", txt), ("cap", cap), ("lab", labels)):
        np.save(tmp_path / f"{name}.npy", arr)
    out = tmp_path / "res.json"
    rc = cli.main(["--image", str(tmp_path / "img.npy"), "--text", str(tmp_path / "txt.npy"), "--caption-image",
                   str(tmp_path / "cap.npy"), "--labels", str(tmp_path / "lab.npy"), "--measure", measure,
                   "--out", str(out)])
    assert rc == 0
    got = json.loads(out.read_text())["results"]
    ks = (1, 5, 10, 50, 100, 200) if measure == "hamming" else (1, 5, 10)
    assert got == evaluate(img, txt, cap, labels, measure=measure, ks=ks)
    assert "| i2t |" in capsys.readouterr().out
    assert cli.main(["--image", str(tmp_path / "nope.npy"), "--text", "x", "--caption-image", "y"]) == 2
