"""`trainer.compile: true`: the encoders compiled with torch.compile (inductor, C++ on this CPU) train the
same model as eager: a tiny fine-grained run, both ways, from the same seed."""
import csv

import pytest
import torch

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.slow]  # compiling both towers costs 1-3 minutes of CPU here

TOLERANCE = 1e-4  # relative, on each step's loss: fused kernels sum in another order than eager ones


def train_losses(run_dir) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


def test_compiled_encoders_train_as_eager_ones(shapes_tiny, tmp_path, monkeypatch):
    import torch._dynamo
    import torch._inductor.config

    from pipeline.training.cli import main as train
    from pipeline.training.run_dir import RUN_DIR_ENV

    monkeypatch.chdir(tmp_path)
    # inductor draws dropout masks from its own generator unless told to use eager's: the same masks, so
    # the two runs can be compared step by step
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    args = ["--config", "fine_grained.yaml", f"data.root={shapes_tiny}", "data.batch_size=8", "data.num_workers=0",
            "data.eval_batch_size=16", "trainer.max_steps=4", "trainer.log_every_n_steps=1",
            "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "model.image_encoder.init=null",
            "model.image_encoder.width=16", "model.text_encoder.width=16", "model.head_hidden=16",
            "model.embed_dim=8", "optim.warmup_steps=0", "logger.wandb=false", f"run.root={tmp_path}"]
    monkeypatch.setenv(RUN_DIR_ENV, "")  # set by a run for the ranks it launches: each run here picks its own
    assert train([*args, "run.name=eager"]) == 0
    monkeypatch.setenv(RUN_DIR_ENV, "")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert train([*args, "run.name=compiled", "trainer.compile=true"]) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # both towers compiled, not run eagerly
    eager, compiled = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 4
    # steps 2-4 are taken with the weights each run's optimizer made: equal losses mean equal training
    assert compiled == pytest.approx(eager, rel=TOLERANCE)  # measured here: 6e-6 at most


def test_compiled_checkpointed_cnn_as_eager():
    """Compiled, the cnn's stage checkpoints are traced by dynamo (which takes no context_fn: the compiled
    recomputation replays no BatchNorm update by itself): the same gradients and statistics as eager."""
    import copy
    from types import SimpleNamespace

    from pipeline.models.encoders import SmallCNN, prepare

    torch.manual_seed(0)
    base, images = SmallCNN(16), torch.randn(4, 3, 64, 64)
    section = SimpleNamespace(name="cnn", unlocked_layers=None, grad_checkpointing=True, freeze=False)
    eager, compiled = (prepare(copy.deepcopy(base), section, "k") for _ in range(2))
    compiled.compile()
    for encoder in (eager, compiled):
        encoder(images).vector.square().sum().backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-4 * a.grad.abs().max().item()), name
    for key, value in eager.state_dict().items():  # running statistics updated once, as eager
        assert torch.allclose(value.float(), compiled.state_dict()[key].float(), atol=1e-6), key
