"""`evaluate(..., all_metrics=True)`: every published convention against slow references written here
from the definitions in docs/protocol.md, and UCCH's and DADH's formulas re-implemented from their code.

Cases have ties (hash codes of few bits, rounded float scores), queries without any relevant item
(an image without labels), and 1 to 7 captions per image or exactly 5.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.metrics import evaluate


def make_case(seed, n=12, bits=4, max_caps=4, five=False, n_labels=4):
    rng = np.random.default_rng(seed)
    per = np.full(n, 5) if five else rng.integers(1, max_caps + 1, n)
    cap = np.repeat(np.arange(n), per)
    rng.shuffle(cap)
    img = np.where(rng.random((n, bits)) < 0.5, -1.0, 1.0)
    txt = np.where(rng.random((len(cap), bits)) < 0.25, -img[cap], img[cap])
    labels = (rng.random((n, n_labels)) < 0.3).astype(np.int64)
    labels[0] = 0  # an image without labels: its queries have no relevant item
    return img.astype(np.float32), txt.astype(np.float32), cap, labels


def directions(img, txt, cap, labels, measure):
    """(name, scores, positives(q), relevance rows) for both directions, from the definitions."""
    if measure == "hamming":
        s = -(img[:, None, :] != txt[None, :, :]).sum(-1).astype(np.float64)
    else:  # inner product of small integers: exact, with ties
        s = img.astype(np.float64) @ txt.astype(np.float64).T
    rel = (labels @ labels.T) > 0
    return [("i2t", s, lambda q: np.flatnonzero(cap == q), rel[:, cap]),
            ("t2i", s.T.copy(), lambda q: np.array([cap[q]]), rel[cap])]


def tie_order(row):
    return np.argsort(-row, kind="stable")  # the tie rule: score descending, then index


def ap_today(hit, k):
    h = hit[:k]
    prec = np.cumsum(h) / np.arange(1, h.size + 1)
    return prec[h].mean() if h.any() else 0.0


# --- UCCH: fx_calc_map_multilabel_k, UCCH.py in github.com/penghu-cs/UCCH (re-implemented; their
# argsort is numpy's default, ours the tie rule's stable order): the top k of the ranking; queries
# with a relevant item there contribute sum(prec at hits) / hits; the others are left out of the mean.
def ucch_map(scores, rel, k):
    res = []
    for q in range(scores.shape[0]):
        tmp = rel[q][tie_order(scores[q])[:k]]
        if tmp.sum() > 0:
            prec = np.cumsum(tmp) / np.arange(1.0, 1 + tmp.shape[0])
            res.append(np.dot(tmp, prec) / float(tmp.sum()))
    return float(np.mean(res)) if res else 0.0


# --- DADH: calc_map_k, utils.py in github.com/Zjut-MultimediaPlus/DADH (re-implemented): queries
# without any relevant item add 0; else total = min(k, relevant), and the mean over j <= total of
# j / (1-based rank of the j-th relevant item in the whole ranking); divided by all queries.
def dadh_map(scores, rel, k):
    total_map = 0.0
    for q in range(scores.shape[0]):
        gnd = rel[q].astype(float)
        tsum = gnd.sum()
        if tsum == 0:
            continue
        gnd = gnd[tie_order(scores[q])]
        total = min(k, int(tsum))
        count = np.arange(1, total + 1, dtype=float)
        tindex = np.flatnonzero(gnd)[:total] + 1.0
        total_map += np.mean(count / tindex)
    return total_map / scores.shape[0]


def tie_arrangements(row, flags):
    """``flags`` in ranked order for every order of ``row``'s tie groups (scores descending), as the
    distinct arrangements inside each group: all orders are the same arrangements, each repeated
    equally often, so their mean is the mean over all orders."""
    groups = [flags[row == v] for v in sorted(set(row.tolist()), reverse=True)]
    choices = []
    for g in groups:
        n, r = g.size, int(g.sum())
        choices.append([np.isin(np.arange(n), c) for c in itertools.combinations(range(n), r)])
    for parts in itertools.product(*choices):
        yield np.concatenate(parts)


def mean_over_ties(row, flags, fn):
    return np.mean([fn(arr) for arr in tie_arrangements(row, flags)])


def reference(img, txt, cap, labels, measure, ks, map_ks, p_ks):
    out = {}
    for name, s, positives, rel in directions(img, txt, cap, labels, measure):
        n = s.shape[1]
        kept = [k for k in dict.fromkeys((*map_ks, 50)) if k is None or k <= n]
        for k in kept:
            out[f"{name}_mAP@{'N' if k is None else k}[ucch]"] = ucch_map(s, rel, k or n)
        for k in kept:
            out[f"{name}_mAP@{'N' if k is None else k}[dadh]"] = dadh_map(s, rel, k or n)
        if measure == "hamming":
            for k in kept:  # the mean over every order of ties of today's AP@k
                out[f"{name}_mAP@{'N' if k is None else k}[ties]"] = np.mean(
                    [mean_over_ties(s[q], rel[q], lambda h: ap_today(h, k or n)) for q in range(s.shape[0])])
            for k in [k for k in ks if k <= n]:
                out[f"{name}_R@{k}[ties]"] = 100 * np.mean(
                    [mean_over_ties(s[q], np.isin(np.arange(n), positives(q)), lambda h: h[:k].any())
                     for q in range(s.shape[0])])
        for k in [k for k in p_ks if k <= n]:
            out[f"{name}_P@{k}"] = np.mean([rel[q][tie_order(s[q])[:k]].sum() / k for q in range(s.shape[0])])
        if measure == "hamming":
            within = -s <= 2
            relw = (within & rel).sum(1)
            out[f"{name}_P@H2"] = np.mean(np.where(within.sum(1) > 0, relw / np.maximum(within.sum(1), 1), 0))
            out[f"{name}_R@H2"] = np.mean(np.where(rel.sum(1) > 0, relw / np.maximum(rel.sum(1), 1), 0))
    return out


def check(got, ref):
    missing = set(ref) - set(got)
    extra = {k for k in got if "[" in k or "_P@" in k or "H2" in k} - set(ref)
    assert not missing and not extra, (missing, extra)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("seed,five", [(0, False), (1, True), (2, False)])
def test_hamming_conventions_match_references(seed, five):
    n = 3 if five else 6
    img, txt, cap, labels = make_case(seed, n=n, bits=3, max_caps=3, five=five)
    ks, map_ks, p_ks = (1, 2, 5, 100), (3, 100, None), (1, 4, 10, 1000)
    got = evaluate(img, txt, cap, labels, measure="hamming", ks=ks, map_ks=map_ks, all_metrics=True, p_ks=p_ks)
    check(got, reference(img, txt, cap, labels, "hamming", ks, map_ks, p_ks))


@pytest.mark.parametrize("seed", [3, 4])
def test_float_conventions_match_references(seed):
    img, txt, cap, labels = make_case(seed, n=40, bits=16, max_caps=7)
    txt = np.round(txt + 0.5 * np.random.default_rng(seed).standard_normal(txt.shape), 0)  # exact score ties
    ks, map_ks, p_ks = (1, 5, 10), (10, 100, None), (1, 10, 100, 1000)
    got = evaluate(img, txt, cap, labels, measure="inner_product", ks=ks, map_ks=map_ks, all_metrics=True,
                   p_ks=p_ks)
    check(got, reference(img, txt, cap, labels, "inner_product", ks, map_ks, p_ks))


def test_without_all_the_names_are_todays():
    img, txt, cap, labels = make_case(5, n=8, bits=8)
    plain = evaluate(img, txt, cap, labels, measure="hamming")
    full = evaluate(img, txt, cap, labels, measure="hamming", all_metrics=True)
    assert list(full)[: len(plain)] == list(plain)
    assert all(full[k] == plain[k] for k in plain)
    assert "i2t_mAP@50[ucch]" not in full  # 8 images: a k beyond the gallery is dropped, never renamed
    assert "t2i_mAP@N[dadh]" in full and "i2t_P@H2" in full and "t2i_R@5[ties]" in full


def test_category_names_need_labels():
    img, txt, cap, _ = make_case(6, n=8, bits=8)
    got = evaluate(img, txt, cap, None, measure="hamming", ks=(1, 5), all_metrics=True)
    assert {k for k in got if "[" in k or "@H" in k or "_P@" in k} == {"i2t_R@1[ties]", "i2t_R@5[ties]",
                                                                      "t2i_R@1[ties]", "t2i_R@5[ties]"}


def test_ties_differ_from_the_tie_rule_where_ties_decide():
    """One query, two gallery items at the same distance, the positive second by index: the tie rule
    gives R@1 = 0, the expectation over both orders 50."""
    img = np.array([[1, 1, 1, 1]], dtype=np.float32)
    txt = np.array([[1, 1, 1, -1], [1, 1, -1, 1]], dtype=np.float32)
    got = evaluate(np.vstack([img, -img]), txt, np.array([1, 0]), None, measure="hamming", ks=(1,),
                   all_metrics=True)
    assert got["i2t_R@1"] == 50.0 and got["i2t_R@1[ties]"] == pytest.approx(50.0)
    t2i = got["t2i_R@1[ties]"]
    assert t2i == pytest.approx(50.0)  # no ties in t2i: caption 1 finds its image first, caption 0 does not


def test_torch_path_gives_the_same_names(monkeypatch):
    """The GPU path (torch kernels, run here on CPU) hands the same blocks to the `--all` names."""
    from pipeline.evaluation import protocol as protocol_mod

    img, txt, cap, labels = make_case(7, n=10, bits=6, max_caps=4)
    cpu = evaluate(img, txt, cap, labels, measure="hamming", all_metrics=True)
    monkeypatch.setattr(protocol_mod, "_FORCE_TORCH", True)
    forced = evaluate(img, txt, cap, labels, measure="hamming", all_metrics=True)
    assert list(forced) == list(cpu)
    for key, value in cpu.items():
        assert forced[key] == pytest.approx(value, abs=1e-12), key


def test_without_the_compiled_loop_the_names_are_the_same(monkeypatch):
    """The numpy fallback of the counting order (no C compiler) feeds the same names."""
    from pipeline.evaluation import hamming

    img, txt, cap, labels = make_case(8, n=10, bits=6, max_caps=4)
    compiled = evaluate(img, txt, cap, labels, measure="hamming", all_metrics=True)
    monkeypatch.setattr(hamming, "_kernel", lambda: None)
    assert evaluate(img, txt, cap, labels, measure="hamming", all_metrics=True) == pytest.approx(compiled, abs=1e-12)
