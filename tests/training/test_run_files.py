"""A run folder is self-contained and says what made it: its tokenizer, categories and provenance, a
checkpoint of plain data, and a module restored without the training-only state (UCCH's bank)."""
import hashlib
import json
import subprocess

import pytest
import torch

from pipeline.training.provenance import CODE_ROOT
from pipeline.training.restore import RunError, restore_module


def test_run_folder_holds_its_inputs_and_provenance(tiny_runs, shapes_tiny):
    run = tiny_runs["hash_64bit"]
    model = json.loads((run / "model.json").read_text())
    card = json.loads((shapes_tiny / "dataset.json").read_text())
    assert model["categories"] == card["categories"] and model["tokenizer"] == "wordpiece"
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == (shapes_tiny / "tokenizer.json").read_bytes()
    prov = json.loads((run / "provenance.json").read_text())
    head = subprocess.run(["git", "-C", str(CODE_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    status = subprocess.run(["git", "-C", str(CODE_ROOT), "status", "--porcelain"], capture_output=True, text=True)
    assert prov["code"] == {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    assert prov["dataset"]["card_sha256"] == hashlib.sha256((shapes_tiny / "dataset.json").read_bytes()).hexdigest()
    assert prov["versions"]["torch"] == torch.__version__
    assert {"lightning", "transformers", "webdataset"} <= set(prov["versions"])
    assert prov["seed"] == 0
    assert (prov["machine"]["world_size"], prov["machine"]["devices"], prov["machine"]["accelerator"]) == (1, 1, "cpu")
    assert "provenance" not in (run / "config.yaml").read_text()  # never part of what a resume compares


def test_checkpoint_is_plain_data(tiny_runs):
    ckpt = torch.load(tiny_runs["fine_grained"] / "checkpoints" / "best.ckpt", weights_only=True)

    def leaves(x):
        if isinstance(x, dict):
            for k, v in x.items():
                yield k
                yield from leaves(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from leaves(v)
        else:
            yield x

    kinds = {type(x) for x in leaves(ckpt)}
    assert kinds <= {torch.Tensor, torch.nn.Parameter, dict, list, tuple, str, int, float, bool, type(None)}, kinds


def test_restore_needs_no_bank_but_every_other_weight(tiny_runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_runs["hash_64bit"], run)
    ckpt_path = run / "checkpoints" / "best.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["state_dict"]["bank.bank"].shape[0] == 256  # sized by the training set
    cfg, module, inputs, weights = restore_module(run)
    assert weights == ckpt_path and inputs.categories and module.measure == "hamming"
    ckpt["state_dict"]["bank.bank"] = torch.zeros(7, 64)  # another training set's bank
    torch.save(ckpt, ckpt_path)
    restored = restore_module(run)
    head = next(k for k in ckpt["state_dict"] if k.startswith("image_head"))
    assert torch.equal(restored.module.state_dict()[head], ckpt["state_dict"][head])
    del ckpt["state_dict"]["bank.bank"], ckpt["state_dict"][head]
    torch.save(ckpt, ckpt_path)
    with pytest.raises(RunError, match="missing"):
        restore_module(run)


def test_best_checkpoint_is_uploaded_online_only(tmp_path, monkeypatch):
    from pipeline.config import load_config
    from pipeline.training import trainer

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "best.ckpt").write_bytes(b"weights")
    logged = []
    monkeypatch.setattr("wandb.log_artifact", lambda artifact, aliases: logged.append((artifact, aliases)))
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert load_config("hash_64bit.yaml").logger.log_model is False  # off by default
    cfg = load_config("hash_64bit.yaml", ["logger.log_model=true"])
    assert trainer.upload_best_checkpoint(cfg, tmp_path, {"rsum": 1.0}) is False and not logged
    monkeypatch.setenv("WANDB_MODE", "online")  # the artifact is made; the upload itself is stubbed out here
    assert trainer.upload_best_checkpoint(cfg, tmp_path, {"rsum": 1.0}) is True
    (artifact, aliases), = logged
    assert artifact.type == "model" and aliases == ["best", "latest"] and artifact.metadata["test"] == {"rsum": 1.0}
