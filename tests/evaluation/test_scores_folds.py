"""Score matrices from any model (`evaluate_scores`, `--scores`), COCO-style folds (`--folds`) and the
curves (`test_curves.json`)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.evaluation import cli
from pipeline.evaluation.folds import fold_prefix
from pipeline.metrics import evaluate, evaluate_scores

MAP_KS = (10, 100, None)


def case(seed=0, n=30, dim=8, max_caps=6, n_labels=5):
    rng = np.random.default_rng(seed)
    cap = np.repeat(np.arange(n), rng.integers(1, max_caps + 1, n))
    rng.shuffle(cap)
    img = rng.integers(-3, 4, (n, dim)).astype(np.float32)  # small integers: exact scores, with ties
    txt = (img[cap] + rng.integers(-2, 3, (len(cap), dim))).astype(np.float32)
    labels = (rng.random((n, n_labels)) < 0.3).astype(np.int64)
    labels[0] = 0
    return img, txt, cap, labels


def test_scores_equal_fico_itr_with_an_asymmetric_t2i_matrix():
    fico = pytest.importorskip("fico_itr")
    rng = np.random.default_rng(1)
    n, cap = 25, None
    cap = np.repeat(np.arange(n), rng.integers(1, 7, n))
    rng.shuffle(cap)
    s = rng.standard_normal((n, cap.size))  # float64, tie-free: fico_itr's unstable sort cannot differ
    t = s.T + 0.7 * rng.standard_normal((cap.size, n))  # a re-ranker: t2i scored separately
    labels = (rng.random((n, 4)) < 0.35).astype(np.int64)
    got = evaluate_scores(s, cap, labels, scores_t2i=t)
    mapping = [int(c) for c in cap]
    i2t, t2i = fico.instance_retrieval(s, t2i_sim=t.T, captions_per_image=mapping)  # images x captions here
    ref = {f"i2t_{k}": float(v) for k, v in i2t.items()} | {f"t2i_{k}": float(v) for k, v in t2i.items()}
    for k in MAP_KS:
        a, b = fico.category_retrieval(s, labels, k=k, sim2=t, captions_per_image=mapping)  # captions x images here
        ref[f"i2t_mAP@{'N' if k is None else k}"], ref[f"t2i_mAP@{'N' if k is None else k}"] = float(a), float(b)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    symmetric = evaluate_scores(s, cap, labels)
    assert symmetric["t2i_R@1"] != got["t2i_R@1"] or symmetric["t2i_mAP@N"] != got["t2i_mAP@N"]


def test_memory_mapped_scores_equal_features(tmp_path):
    img, txt, cap, labels = case(2)
    np.save(tmp_path / "s.npy", img @ txt.T)
    s = np.load(tmp_path / "s.npy", mmap_mode="r")
    from_features = evaluate(img, txt, cap, labels, measure="inner_product", all_metrics=True)
    from_scores = evaluate_scores(s, cap, labels, all_metrics=True, chunk_size=200)  # many small row blocks
    assert from_scores == from_features


def test_bad_score_shapes_name_the_problem():
    img, txt, cap, labels = case(3)
    with pytest.raises(ValueError, match="images x captions"):
        evaluate_scores((img @ txt.T).T, cap, labels)
    with pytest.raises(ValueError, match="scores_t2i must be captions x images"):
        evaluate_scores(img @ txt.T, cap, labels, scores_t2i=img @ txt.T)


def fold_reference(img, txt, cap, labels, folds, **kw):
    """The mean of `folds` evaluate calls, each on one fold's images and their captions in order."""
    size = len(img) // folds
    runs = []
    for f in range(folds):
        keep = np.flatnonzero((cap >= f * size) & (cap < (f + 1) * size))
        runs.append(evaluate(img[f * size:(f + 1) * size], txt[keep], cap[keep] - f * size,
                             labels[f * size:(f + 1) * size], **kw))
    return {k: np.mean([r[k] for r in runs]) for k in runs[0]}


@pytest.mark.parametrize("use_scores", [False, True])
def test_folds_are_the_mean_of_evaluate_on_each_fold(tmp_path, use_scores):
    img, txt, cap, labels = case(4, n=30)
    paths = {}
    for name, arr in (("img", img), ("txt", txt), ("cap", cap), ("lab", labels), ("s", img @ txt.T)):
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], arr)
    inputs = (["--scores", str(paths["s"])] if use_scores else
              ["--image", str(paths["img"]), "--text", str(paths["txt"]), "--measure", "inner_product"])
    out = tmp_path / "res.json"
    assert cli.main([*inputs, "--caption-image", str(paths["cap"]), "--labels", str(paths["lab"]), "--folds", "3",
                     "--out", str(out)]) == 0
    got = json.loads(out.read_text())["results"]
    ref = fold_reference(img, txt, cap, labels, 3, measure="inner_product")
    for k, v in ref.items():
        assert got[f"fold10/{k}"] == pytest.approx(v, abs=1e-9), k
    assert got["fold10/rsum"] == pytest.approx(sum(ref[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))
    assert got["i2t_R@1"] == evaluate(img, txt, cap, labels, measure="inner_product")["i2t_R@1"]
    assert fold_prefix(1000) == "1k" and fold_prefix(200) == "fold200"
    assert cli.main([*inputs, "--caption-image", str(paths["cap"]), "--folds", "4"]) == 2  # 30 images, 4 folds


def test_cli_scores_all_writes_curves_and_refuses_two_inputs(tmp_path, capsys):
    img, txt, cap, labels = case(5, n=20)
    for name, arr in (("img", img), ("txt", txt), ("cap", cap), ("lab", labels), ("s", img @ txt.T),
                      ("t", (img @ txt.T).T + 1.0 * (np.arange(len(cap))[:, None] % 3))):
        np.save(tmp_path / f"{name}.npy", arr)
    out = tmp_path / "out" / "res.json"
    common = ["--caption-image", str(tmp_path / "cap.npy"), "--labels", str(tmp_path / "lab.npy")]
    assert cli.main(["--scores", str(tmp_path / "s.npy"), "--scores-t2i", str(tmp_path / "t.npy"), *common,
                     "--all", "--p-ks", "1,5,20,500", "--out", str(out)]) == 0
    got = json.loads(out.read_text())["results"]
    ref = evaluate_scores(np.load(tmp_path / "s.npy"), cap, labels, scores_t2i=np.load(tmp_path / "t.npy"),
                          all_metrics=True, p_ks=(1, 5, 20, 500))
    assert got == ref
    assert "i2t_P@20" in got and "t2i_P@20" in got and "i2t_P@500" not in got  # 500 > both galleries
    assert not any("[ties]" in k or "H2" in k for k in got)  # hamming-only names never come from scores
    curves = json.loads((tmp_path / "out" / "test_curves.json").read_text())
    assert set(curves) == {"i2t", "t2i"} and set(curves["i2t"]) == {"p_at_k", "pr11"}
    capsys.readouterr()
    assert cli.main(["--scores", str(tmp_path / "s.npy"), "--image", str(tmp_path / "img.npy"), *common]) == 2
    assert "not both" in capsys.readouterr().err


def brute_curves(scores, rel):
    """P@K at every K and the 11-point interpolated PR from the definitions (tie rule order)."""
    pk, pr = [], []
    for q in range(scores.shape[0]):
        hit = rel[q][np.argsort(-scores[q], kind="stable")]
        pk.append(np.cumsum(hit) / np.arange(1, hit.size + 1))
        if hit.any():
            prec = np.cumsum(hit) / np.arange(1, hit.size + 1)
            recall = np.cumsum(hit) / hit.sum()
            pr.append([prec[recall >= t / 10 - 1e-12].max() for t in range(11)])
    return np.mean(pk, axis=0), np.mean(pr, axis=0)


@pytest.mark.parametrize("measure", ["inner_product", "hamming"])
def test_curves_match_definitions_and_end_at_the_scalars(measure):
    img, txt, cap, labels = case(6, n=40)
    n_cap = len(cap)
    results, curves = evaluate(img, txt, cap, labels, measure=measure, all_metrics=True,
                               p_ks=(1, 10, 40, n_cap), curves=True)
    if measure == "hamming":
        bits_i, bits_t = img >= 0, txt >= 0
        s = -(bits_i[:, None, :] != bits_t[None, :, :]).sum(-1).astype(np.float64)
    else:
        s = img.astype(np.float64) @ txt.astype(np.float64).T
    rel = (labels @ labels.T) > 0
    for name, sc, r in (("i2t", s, rel[:, cap]), ("t2i", s.T, rel[cap])):
        pk, pr = brute_curves(sc, r)
        c = curves[name]
        grid = np.array(c["p_at_k"]["k"])
        assert np.allclose(c["p_at_k"]["precision"], pk[grid - 1])
        assert np.allclose(c["pr11"]["precision"], pr)
        assert grid[-1] == sc.shape[1]  # the curve ends at the whole gallery: P@K there is the scalar
        assert c["p_at_k"]["precision"][-1] == pytest.approx(results[f"{name}_P@{sc.shape[1]}"])
        assert c["p_at_k"]["precision"][0] == pytest.approx(results[f"{name}_P@1"])
        if measure == "hamming":
            radius = c["radius_pr"]
            assert radius["recall"][-1] == pytest.approx(1.0)  # every item lies within the code length
            within2 = (-sc <= 2)
            assert radius["precision"][2] == pytest.approx((within2 & r).sum() / max(within2.sum(), 1))
