"""The seeded benchmarks' arithmetic (mean, sample spread, tie, per-seed ratios) and how they find finished
run folders: numbers chosen so that a population std, a spread added in quadrature, or ratios of
unpaired seeds give other answers."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import seeds  # noqa: E402


def test_mean_and_sample_std():
    s = seeds.spread([1, 2, 6])
    assert s.mean == pytest.approx(3.0)
    assert s.std == pytest.approx(math.sqrt(7))  # (4 + 1 + 9) / (3 - 1); the population std is sqrt(14 / 3)
    assert seeds.spread([5.0]).std == 0.0
    assert str(seeds.spread([80.0, 82.0, 84.0])) == "82.0 ± 2.0"
    assert str(seeds.spread([0.5, 0.6, 0.7])) == "0.600 ± 0.100"
    with pytest.raises(ValueError):
        seeds.spread([])


def test_a_gap_inside_the_summed_spreads_is_a_tie():
    a = seeds.spread([10, 12, 14])  # 12 ± 2
    near = seeds.spread([8.2, 9.2, 10.2])  # 9.2 ± 1: gap 2.8 < 2 + 1, but > sqrt(2² + 1²) and > the population stds
    far = seeds.spread([7.8, 8.8, 9.8])  # 8.8 ± 1: gap 3.2 > 3
    assert seeds.is_tie(a, near) and seeds.is_tie(near, a)
    assert not seeds.is_tie(a, far)
    assert seeds.gap(a, near) == "+2.8 (tie)"
    assert seeds.gap(far, a) == "-3.2"
    # one seed: no spread, so no tie however small the gap, unless there is no gap
    assert not seeds.is_tie(seeds.spread([1.0]), seeds.spread([1.01]))
    assert seeds.is_tie(seeds.spread([1.0, 1.0]), seeds.spread([1.0]))


def test_ratio_pairs_the_same_seeds():
    a = {0: 50.0, 1: 30.0}
    b = {2: 60.0, 0: 100.0, 1: 50.0}  # seed 2 has no partner; seed order differs
    r = seeds.ratio(a, b)
    assert r.values == (0.5, 0.6)
    assert r.mean == pytest.approx(0.55)
    with pytest.raises(ValueError):
        seeds.ratio({0: 1.0}, {1: 1.0})


def test_aggregate_keeps_the_numeric_metrics_every_seed_has():
    agg = seeds.aggregate({0: {"rsum": 400.0, "x": 1.0, "mode": "a"}, 1: {"rsum": 410.0, "mode": "b"},
                           2: {"rsum": 420.0}})
    assert set(agg) == {"rsum"}
    assert agg["rsum"].mean == pytest.approx(410.0) and agg["rsum"].std == pytest.approx(10.0)


def test_seed_list_parsing():
    assert seeds.parse_seeds("0,1,2") == [0, 1, 2]
    assert seeds.parse_seeds("7") == [7]
    for bad in ("0,0", "a,1", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            seeds.parse_seeds(bad)


def fake_run(folder: Path, config: str, seed: int, metrics: dict, extra=()) -> Path:
    """A finished run folder as train.py leaves it: the resolved config it trained and its test metrics."""
    folder.mkdir(parents=True)
    cfg = seeds.expected_config(config, [*extra, f"run.seed={seed}"])
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "test_metrics.json").write_text(json.dumps(metrics))
    return folder


def test_find_run_takes_the_name_or_its_newest_numbered_sibling(tmp_path):
    assert seeds.find_run(tmp_path, "a_seed1") is None
    (tmp_path / "a_seed1").mkdir()  # unfinished: no test metrics
    (tmp_path / "a_seed10").mkdir()
    (tmp_path / "a_seed10" / "test_metrics.json").write_text("{}")
    assert seeds.find_run(tmp_path, "a_seed1") is None
    for n in (2, 3):
        (tmp_path / f"a_seed1-{n}").mkdir()
        (tmp_path / f"a_seed1-{n}" / "test_metrics.json").write_text("{}")
    assert seeds.find_run(tmp_path, "a_seed1").name in ("a_seed1-2", "a_seed1-3")
    (tmp_path / "a_seed1" / "test_metrics.json").write_text("{}")
    assert seeds.find_run(tmp_path, "a_seed1") == tmp_path / "a_seed1"


def test_runs_from_reuses_only_the_same_recipe(tmp_path, capsys):
    found = tmp_path / "others"
    fake_run(found / "hash_64bit_seed1", "hash_64bit.yaml", 1, {"rsum": 10.0})
    fake_run(found / "hash_64bit_seed2", "hash_64bit.yaml", 0, {"rsum": 20.0})  # says seed 0 inside
    args = argparse.Namespace(runs_from=[found], no_train=True, fresh=False)
    runs = seeds.Runs(tmp_path / "own", args, [])
    assert runs.get("hash_64bit", "hash_64bit.yaml", 1)["metrics"] == {"rsum": 10.0}
    assert runs.get("hash_64bit", "hash_64bit.yaml", 3) is None  # --no-train: missing, said so
    assert "hash_64bit_seed3: not found" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="run.seed: 0 .run. vs 2"):
        runs.get("hash_64bit", "hash_64bit.yaml", 2)
    with pytest.raises(SystemExit, match="hash.bits"):  # other overrides than the run was trained with
        seeds.Runs(tmp_path / "own", args, ["hash.bits=32"]).get("hash_64bit", "hash_64bit.yaml", 1)


def test_token_quality_tables_from_found_runs(tmp_path, capsys):
    """The benchmark end to end on finished run folders (nothing trained): mean ± std per row and a tie
    where the gap to the global model is inside the spread."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_token_quality

    base = {"i2t_R@1": 80.0, "i2t_R@10": 98.0, "t2i_R@1": 78.0, "t2i_R@10": 99.0}
    rsums = {"fine_grained": [500.0, 510.0, 520.0], "fine_grained_tokens": [505.0, 515.0, 525.0],
             "fine_grained_scan": [540.0, 541.0, 542.0]}
    for stem, values in rsums.items():
        for seed, rsum in enumerate(values):
            fake_run(tmp_path / f"{stem}_seed{seed}", f"{stem}.yaml", seed, {**base, "rsum": rsum},
                     ["trainer.max_epochs=5"])
    assert bench_token_quality.main(["--runs-from", str(tmp_path), "--no-train", "--no-untrained",
                                     "--out", str(tmp_path / "out"), "trainer.max_epochs=5"]) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():  # the summary rows (the per-seed rows come after)
        if line.startswith("| fine_grained"):
            rows.setdefault(line.split(" | ")[0].strip("| "), line)
    assert "510.00 ± 10.00" in rows["fine_grained.yaml trained"]
    assert "| +5.0 (tie) |" in rows["fine_grained_tokens.yaml trained"]  # 5 < 10 + 10
    assert "| +31.0 |" in rows["fine_grained_scan.yaml trained"]  # 31 > 10 + 1
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["seeds"] == [0, 1, 2] and len(saved["runs"]) == 9


def test_hash_family_percent_of_fine_grained_pairs_seeds_and_marks_ties():
    import bench_hash_family

    fg = {0: {"r": 80.0}, 1: {"r": 40.0}, 2: {"r": 60.0}}  # 60 ± 20
    # per seed 50, 100, 50 %: 67 ± 29 (the ratio of the means is 61 %, sorted values paired give 64 %);
    # 36.7 ± 5.8 against 60 ± 20: a gap of 23 inside 26, a tie
    paired = {0: {"r": 40.0}, 1: {"r": 40.0}, 2: {"r": 30.0}}
    far = {0: {"r": 8.0}, 1: {"r": 4.0}, 2: {"r": 6.0}}  # 10 % at every seed; gap 54 > 22: no tie
    runs = {"fine_grained": fg, "paired": paired, "far": far}
    assert bench_hash_family.percent_of(runs, "paired", "r") == "67 ± 29 (tie)"
    assert bench_hash_family.percent_of(runs, "far", "r") == "10 ± 0"
    assert bench_hash_family.percent_of(runs, "fine_grained", "r") == "100"
