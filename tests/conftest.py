"""Fixtures shared across the rooms' tests; what they run lives in tests/helpers."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub look-up otherwise takes ~50 s to fail here
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")

from tests.helpers.runs import tiny_run_args, train_together  # noqa: E402  (after the environment above)
from tests.helpers.slurm import LOCAL_CLUSTER, SlurmCluster, report_line  # noqa: E402


@pytest.fixture(scope="session")
def shapes_tiny(tmp_path_factory) -> Path:
    """A small real shapes dataset (shards, card, tokenizer), built once per session."""
    from data_prep import build_shapes

    return build_shapes(tmp_path_factory.mktemp("data") / "shapes", train=256, val=64, test=64, shard_size=32)


# ---------------------------------------------------------------- a local SLURM cluster (tests marked slurm)

@pytest.fixture(scope="session")
def slurm_cluster(request):
    """Starts a one-node SLURM on localhost (installing its Debian packages if needed) and stops, by pid,
    exactly the daemons it started. Skips, with the reason printed, where that is impossible; with
    FICO_REQUIRE_SLURM=1 (set by .ci/run) that is an error instead."""
    def cannot(reason: str):
        report_line(request, f"\n[slurm tests] cannot start a local SLURM cluster: {reason}")
        if os.environ.get("FICO_REQUIRE_SLURM") == "1":
            pytest.fail(f"FICO_REQUIRE_SLURM=1 but no SLURM cluster: {reason}")
        pytest.skip(f"no local SLURM cluster: {reason}")

    if sys.platform != "linux" or os.geteuid() != 0:
        cannot("needs root on Linux (slurmd starts jobs as their users)")
    proc = subprocess.run(["bash", str(LOCAL_CLUSTER), "start", "--install"], capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        why = [line for line in proc.stderr.strip().splitlines() if "] stopped " not in line][-3:]
        cannot(" | ".join(why) or f"exit code {proc.returncode}")
    started = proc.stdout.strip().splitlines()[-1].removeprefix("started:").split()
    conf = subprocess.run(["bash", str(LOCAL_CLUSTER), "env"], capture_output=True, text=True,
                          check=True).stdout.strip().split("=", 1)[1]
    report_line(request, f"\n[slurm tests] local cluster up ({'started ' + ' '.join(started) if started else 'already running'})")
    yield SlurmCluster(conf)
    if started:
        subprocess.run(["bash", str(LOCAL_CLUSTER), "stop", *started], capture_output=True, timeout=120)


# ---------------------------------------------------------------- trained tiny runs (learning, report, hybrid)
@pytest.fixture(scope="session")
def shapes_backbone(tmp_path_factory) -> Path:
    """The shapes backbone at test size (SmallCNN width 32, 150 steps: ~7 s, ~80 % of held-out shapes
    named), made once per session: what the tiny runs start from, as the real configs do."""
    from pipeline.training.backbone import shapes_backbone as make

    return make(32, 64, [0.5] * 3, [0.25] * 3, 150, tmp_path_factory.mktemp("backbones"))


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, shapes_tiny, shapes_backbone) -> dict:
    """One trained run of each family on `shapes_tiny` (config name -> run directory), trained once."""
    args = tiny_run_args(shapes_backbone)
    return train_together({c: ["--config", f"{c}.yaml", f"data.root={shapes_tiny}", *args]
                           for c in ("hash_64bit", "fine_grained")}, tmp_path_factory.mktemp("tiny_runs"))


@pytest.fixture(scope="session")
def tiny_hash_runs(tmp_path_factory, shapes_tiny, shapes_backbone, tiny_runs) -> dict:
    """One short run of each new hashing config on `shapes_tiny` (config name -> run directory): supervised,
    instance-level distilled from the tiny fine-grained run, nested 128-bit (logged to W&B offline)."""
    args = [*tiny_run_args(shapes_backbone), "trainer.max_epochs=2", "data.steps_per_epoch=4"]
    teacher = f"hash.instance.teacher={tiny_runs['fine_grained']}"
    configs = {"hash_supervised_64bit": [], "hash_instance_64bit": [teacher, "trainer.log_every_n_steps=2"],
               "hash_nested": ["logger.wandb=true", "trainer.log_every_n_steps=2"]}
    runs = {c: ["--config", f"{c}.yaml", f"data.root={shapes_tiny}", *args, *extra] for c, extra in configs.items()}
    # the instance config as shipped (no teacher), judged against the tiny UCCH run on R@1; codes that must
    # tell every item apart learn more slowly than category codes: twice UCCH's 24 epochs of 8 steps
    runs["hash_instance_64bit_alone"] = ["--config", "hash_instance_64bit.yaml", f"data.root={shapes_tiny}",
                                         *tiny_run_args(shapes_backbone), "trainer.max_epochs=48"]
    return train_together(runs, tmp_path_factory.mktemp("tiny_hash_runs"))


@pytest.fixture(scope="session")
def tiny_baselines(tmp_path_factory, shapes_tiny, shapes_backbone, tiny_runs) -> dict:
    """What the tiny runs are judged against: each family untrained (same initialisation, run.train=false),
    and the hashing run trained a second time with the same seed."""
    args = tiny_run_args(shapes_backbone)
    runs = {f"{c}_untrained": ["--config", f"{c}.yaml", f"data.root={shapes_tiny}", *args, "run.train=false"]
            for c in ("hash_64bit", "fine_grained")}
    runs["hash_64bit_again"] = ["--config", "hash_64bit.yaml", f"data.root={shapes_tiny}", *args]
    return train_together(runs, tmp_path_factory.mktemp("tiny_baselines"))


@pytest.fixture(scope="session")
def tiny_token_runs(tmp_path_factory, shapes_tiny, shapes_backbone) -> dict:
    """Both token-level configs trained tiny (12 epochs of 8 steps; config name -> run directory): what the
    token tests of training, the report and the hybrid tool use."""
    args = [*tiny_run_args(shapes_backbone), "trainer.max_epochs=12", "tokens.dim=32", "tokens.screen_k=16"]
    return train_together({c: ["--config", f"{c}.yaml", f"data.root={shapes_tiny}", *args]
                           for c in ("fine_grained_tokens", "fine_grained_scan")},
                          tmp_path_factory.mktemp("tiny_token_runs"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread in a module's tests and the runs they start: on a shared 2-core machine,
    2 threads that spin-wait for each other made tiny models 3x (train.py) to 60x (a hash step) slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
