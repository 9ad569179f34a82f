"""The hashing family through train.py: a short run of each new config (supervised, instance-level distilled
from a fine-grained run, nested) writes every name it promises and keeps best.ckpt by its family's metric; a
nested run's prefixes are the leading bytes of its codes and score what `evaluate` gives on them; start-up
refuses, in one line, a supervised run without training labels and a teacher that is not a fine-grained run."""
import json
import shutil

import pytest
import torch

from pipeline.config import load_config
from pipeline.evaluation.scores import pack_codes
from pipeline.metrics import evaluate, metric_names
from pipeline.models.heads import binarize
from pipeline.training.build import logged_metric_names
from tests.helpers.runs import run_train

HASH_KS = (1, 5, 10, 50, 100, 200)
MONITORS = {"hash_supervised_64bit": "val/i2t_mAP@N", "hash_instance_64bit": "val/rsum",
            "hash_nested": "val/i2t_mAP@N"}


def _metrics(run_dir) -> dict:
    return json.loads((run_dir / "test_metrics.json").read_text())


@pytest.mark.parametrize("config", sorted(MONITORS))
def test_each_config_writes_every_name_and_keeps_best_by_its_family_metric(tiny_hash_runs, config):
    run_dir = tiny_hash_runs[config]
    names = metric_names(HASH_KS)
    expected = names + ([f"{b}bit/{n}" for b in (16, 32, 64) for n in names] if config == "hash_nested" else [])
    assert list(_metrics(run_dir)) == expected == logged_metric_names(load_config(str(run_dir / "config.yaml")))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    callbacks = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)["callbacks"]
    assert any(f"'monitor': '{MONITORS[config]}'" in key for key in callbacks), list(callbacks)


def test_nested_run_logs_every_prefix_to_wandb(tiny_hash_runs):
    runs = list((tiny_hash_runs["hash_nested"] / "wandb").glob("offline-run-*"))
    log = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in ("test/i2t_mAP@N", "test/16bit/i2t_mAP@N", "test/32bit/t2i_R@1", "test/64bit/rsum",
                "val/16bit/i2t_mAP@N", "train/16bit/loss", "train/128bit/contrast"):
        assert key.encode() in log, key


def test_instance_run_distils_from_its_teacher_and_does_not_keep_it(tiny_hash_runs):
    run_dir = tiny_hash_runs["hash_instance_64bit"]
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/contrast", "train/quantisation", "train/distillation"} <= set(header)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and not any(k.startswith("teacher") for k in state)  # the teacher is not part of the model


def test_nested_prefixes_are_leading_bytes_and_score_as_evaluate_on_them(tiny_hash_runs):
    from pipeline.inference.encoding import encode_split
    from pipeline.inference.runs import load_run

    run = load_run(tiny_hash_runs["hash_nested"])
    enc = encode_split(run, progress=False)
    own = _metrics(run.path)
    assert run.module.prefixes == (16, 32, 64) and enc.image_gallery.shape[1] == 16
    for bits in run.module.prefixes:
        codes = run.module.gallery_features(torch.from_numpy(enc.image), bits)
        assert torch.equal(codes, pack_codes(binarize(torch.from_numpy(enc.image[:, :bits]))))
        view = enc.prefix(bits)
        assert (view.image_gallery == enc.image_gallery[:, :bits // 8]).all()
        assert (view.text_gallery == enc.text_gallery[:, :bits // 8]).all()
        res = evaluate(view.image_gallery, view.text_gallery, enc.caption_image, enc.labels, measure="hamming",
                       ks=HASH_KS)
        assert res == pytest.approx({k.split("/", 1)[1]: v for k, v in own.items() if k.startswith(f"{bits}bit/")})


def _one_line_refusal(args, tmp_path, fragment):
    proc = run_train(args, cwd=tmp_path, timeout=180)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and fragment in lines[0], proc.stderr[-2000:]


def test_supervised_hashing_without_training_labels_is_refused_at_start_up(shapes_tiny, tmp_path):
    data = tmp_path / "no_train_labels"  # as Flickr30K: labels on the test split only
    shutil.copytree(shapes_tiny, data)
    card = json.loads((data / "dataset.json").read_text())
    for split in ("train", "val"):
        card["splits"][split]["num_without_labels"] = card["splits"][split]["num_images"]
    (data / "dataset.json").write_text(json.dumps(card))
    _one_line_refusal(["--config", "hash_supervised_64bit.yaml", f"data.root={data}", f"run.root={tmp_path}"],
                      tmp_path, "hash.objective=supervised learns from labels")


def test_a_teacher_that_is_not_a_fine_grained_run_is_refused_at_start_up(tiny_runs, shapes_tiny, tmp_path):
    base = ["--config", "hash_instance_64bit.yaml", f"data.root={shapes_tiny}", f"run.root={tmp_path}"]
    _one_line_refusal([*base, f"hash.instance.teacher={tiny_runs['hash_64bit']}"], tmp_path,
                      "a hash run; a teacher is a trained fine-grained run")
    _one_line_refusal([*base, f"hash.instance.teacher={tmp_path / 'nowhere'}"], tmp_path, "hash.instance.teacher")
