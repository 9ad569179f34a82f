"""optim.accum_steps (GradCache): one step over N chunks gives the loss and every parameter's gradient of one
step at the whole batch, for every family's objective, with dropout active and BatchNorm being trained, on
one process and on 2 gloo ranks under real DDP (gradients all-reduced once, after the last chunk)."""
import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import ConfigError, load_config
from pipeline.training.build import build_module, complete_config
from pipeline.training.grad_cache import cached_backward, chunk_inputs
from tests.helpers.runs import checkpoint_step, free_port, run_train

CHUNKS, ROWS, VOCAB, LENGTH, WORLD = 3, 4, 50, 12, 2  # ROWS per chunk
TINY = ["model.image_encoder.init=null", "model.image_encoder.freeze=false", "model.image_encoder.width=16",
        "model.text_encoder.width=16", "model.head_hidden=32", "model.embed_dim=16", "tokens.dim=8",
        "hash.num_negatives=16", "data.image_size=32", f"optim.accum_steps={CHUNKS}"]
FAMILIES = {  # name -> (config, overrides): every objective the training step can run
    "infonce": ("fine_grained.yaml", []),
    "vse": ("fine_grained.yaml", ["align.loss=vse_max_violation"]),
    "late_interaction": ("fine_grained_tokens.yaml", []),
    "cross_attention": ("fine_grained_scan.yaml", ["tokens.block_elements=500"]),  # several scoring blocks
    "ucch_warmup": ("hash_64bit.yaml", []),  # epoch 0 < hash.warmup_epochs: in-batch keys
    "ucch_bank": ("hash_64bit.yaml", ["hash.warmup_epochs=0"]),
    "supervised": ("hash_supervised_64bit.yaml", []),
    "instance": ("hash_instance_64bit.yaml", ["hash.binary_weight=0.5"]),
    "instance_joint": ("hash_instance_64bit.yaml", ["hash.binary_weight=0.5", "hash.instance.joint_weight=0.5"]),
    "nested": ("hash_nested.yaml", []),
}


def make_module(name: str):
    config, overrides = FAMILIES[name]
    cfg = load_config(config, [*TINY, *overrides])
    torch.manual_seed(0)
    module = build_module(cfg, num_train_items=64, vocab_size=VOCAB, pad_token_id=0, load_init=False)
    return module.double().train()


def make_batch(rows: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, LENGTH + 1, (rows,), generator=g)
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    ids = torch.randperm(64, generator=g)[:rows]
    ids[1] = ids[-1]  # one image twice (a false negative the objectives mask)
    return {"images": torch.randn(rows, 3, 32, 32, generator=g, dtype=torch.float64),
            "text": {"input_ids": torch.randint(1, VOCAB, (rows, LENGTH), generator=g) * mask, "attention_mask": mask},
            "image_ids": ids, "labels": (torch.rand(rows, 5, generator=g) < 0.4).double()}


def reference_step(module, batch: dict, chunks: int):
    """The whole batch in one graph: every chunk forward with gradients (BatchNorm per chunk), one loss."""
    outs = [module.represent(c) for c in chunk_inputs(batch, chunks)]
    loss, _ = module.training_loss([torch.cat(parts) for parts in zip(*outs)], batch)
    loss.backward()
    return loss.detach()


def grads_and_stats(module) -> dict:
    """Every trained parameter's gradient (zero where the objective does not read it: VSE++'s logit scale)."""
    out = {f"grad/{n}": p.grad.clone() if p.grad is not None else torch.zeros_like(p)
           for n, p in module.named_parameters() if p.requires_grad}
    out.update({f"buffer/{n}": b.clone() for n, b in module.named_buffers()})  # BN statistics, UCCH's bank
    return out


def assert_same(a: dict, b: dict, atol: float = 1e-9) -> None:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), atol=atol), (k, (a[k] - b[k]).abs().max())


@pytest.mark.parametrize("name", FAMILIES)
def test_chunks_equal_the_whole_batch(name):
    module = make_module(name)
    reference, batch = copy.deepcopy(module), make_batch(CHUNKS * ROWS)
    torch.manual_seed(7)
    loss_ref = reference_step(reference, batch, CHUNKS)
    torch.manual_seed(7)
    loss, _ = cached_backward(module, module.represent, module.training_loss, batch, CHUNKS)
    assert torch.allclose(loss, loss_ref, atol=1e-12), (loss, loss_ref)
    got, expected = grads_and_stats(module), grads_and_stats(reference)
    assert_same(got, expected)


def test_dropout_is_active_and_replayed():
    """The equality above is with dropout on: two forwards of one chunk differ, the same RNG state repeats one."""
    module, batch = make_module("infonce"), make_batch(ROWS)
    torch.manual_seed(3)
    first = module.represent(batch)[1]
    second = module.represent(batch)[1]
    torch.manual_seed(3)
    again = module.represent(batch)[1]
    assert not torch.allclose(first, second) and torch.equal(first, again)


def test_logit_scale_gets_the_whole_batch_gradient_once():
    """Not N times (a per-chunk loss would give each chunk's share again): equal to the reference's."""
    module = make_module("infonce")
    reference, batch = copy.deepcopy(module), make_batch(CHUNKS * ROWS)
    torch.manual_seed(7)
    reference_step(reference, batch, CHUNKS)
    torch.manual_seed(7)
    cached_backward(module, module.represent, module.training_loss, batch, CHUNKS)
    assert reference.logit_scale.grad.abs() > 1e-6
    assert torch.allclose(module.logit_scale.grad, reference.logit_scale.grad, atol=1e-12)


class Represent(torch.nn.Module):
    """The module's `represent` as a forward, so that DDP wraps it (Lightning's wrapper does the same with
    the training step)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, inputs):
        return self.module.represent(inputs)


def _ddp_worker(rank, port, names, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {}
    for name in names:
        batch = make_batch(WORLD * CHUNKS * ROWS)
        mine = {k: (v[rank::WORLD] if torch.is_tensor(v) else {kk: vv[rank::WORLD] for kk, vv in v.items()})
                for k, v in batch.items()}
        module = make_module(name)
        reference = copy.deepcopy(module)
        torch.manual_seed(11 + rank)
        loss_ref = reference_step(reference, mine, CHUNKS)
        for p in reference.parameters():  # what DDP does to the reference's gradients
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= WORLD
        ddp = DistributedDataParallel(Represent(module), broadcast_buffers=False)  # as pipeline/training/trainer.py builds it
        torch.manual_seed(11 + rank)
        loss, _ = cached_backward(module, ddp, module.training_loss, mine, CHUNKS, no_sync=ddp.no_sync)
        results[name] = (loss, loss_ref, grads_and_stats(module), grads_and_stats(reference))
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results():
    names = ["infonce", "late_interaction", "ucch_bank", "nested"]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "ddp")
        mp.spawn(_ddp_worker, args=(free_port(), names, out), nprocs=WORLD, join=True)
        return [torch.load(f"{out}.{r}", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("name", ["infonce", "late_interaction", "ucch_bank", "nested"])
def test_two_gloo_ranks_under_ddp_equal_the_whole_batch(name, ddp_results):
    for rank in range(WORLD):
        loss, loss_ref, got, expected = ddp_results[rank][name]
        assert torch.allclose(loss, loss_ref, atol=1e-12)
        assert_same(got, expected)
    grads = [{k: v for k, v in ddp_results[r][name][2].items() if k.startswith("grad/")} for r in range(WORLD)]
    assert_same(*grads)  # every rank holds the same gradients (BatchNorm statistics are each rank's own)


def test_lightning_accumulation_is_refused_for_contrastive_objectives():
    with pytest.raises(ConfigError, match="optim.accum_steps"):
        load_config("fine_grained.yaml", ["trainer.accumulate_grad_batches=4"])


@pytest.mark.parametrize("name", ["late_interaction", "cross_attention"])
def test_checkpointed_token_scoring_keeps_scores_and_gradients(name):
    """A large batch's token loss in blocks whose intermediates are recomputed: the same loss and gradients."""
    module, batch = make_module(name), make_batch(2 * ROWS)
    results = []
    for checkpointed in (False, True):
        module.token_scorer.checkpointed = checkpointed
        module.zero_grad()
        torch.manual_seed(5)
        loss = reference_step(module, batch, 1)
        results.append((loss, grads_and_stats(module)))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-12)
    assert_same({k: v for k, v in results[0][1].items() if k.startswith("grad/")},
                {k: v for k, v in results[1][1].items() if k.startswith("grad/")})


def test_train_py_with_accumulation_counts_optimizer_steps(tmp_path, shapes_tiny):
    """The real entry point on 2 gloo ranks (Lightning's DDP, manual backward, no_sync on the first chunk): a
    token-level run at accum_steps=2 trains (batches of 2 x 16 rows a rank, one optimizer step each), tests,
    and its checkpoint's global step counts optimizer steps, not chunks."""
    args = ["--config", "fine_grained_tokens.yaml", f"data.root={shapes_tiny}", f"run.root={tmp_path}",
            "data.batch_size=16", "optim.accum_steps=2", "data.steps_per_epoch=3", "trainer.max_epochs=1",
            "data.num_workers=0", "model.image_encoder.width=16", "model.image_encoder.init=null",
            "model.text_encoder.width=16", "model.head_hidden=32", "tokens.dim=16", "logger.wandb=false",
            "trainer.log_every_n_steps=1", "optim.warmup_steps=1", "trainer.devices=2", "trainer.strategy=ddp",
            "trainer.accelerator=cpu"]
    proc = run_train(args, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "fine_grained_tokens"
    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == 3
    metrics = (run / "csv" / "metrics.csv").read_text()
    assert "train/token_loss" in metrics.splitlines()[0]
    assert (run / "test_metrics.json").is_file()


def test_fp16_amp_with_accumulation_is_refused():
    """The cached representations' gradients are not loss-scaled: fp16 would flush them, so the pair is refused."""
    with pytest.raises(ConfigError, match="bf16-mixed"):
        load_config("fine_grained.yaml", ["optim.accum_steps=2", "trainer.precision=16-mixed"])
    load_config("fine_grained.yaml", ["optim.accum_steps=2", "trainer.precision=bf16-mixed"])


def test_gradients_are_clipped_once_per_optimizer_step(shapes_tiny, tmp_path):
    """Under accumulation Lightning does not clip (manual optimization): the module clips the final gradients
    before AdamW steps. Seen from the optimizer itself: every step's gradient norm is optim.grad_clip."""
    import lightning as L

    from pipeline.data import RetrievalDataModule

    clip = 1e-3
    cfg = complete_config(load_config("fine_grained.yaml", [*TINY[:-1], f"data.root={shapes_tiny}", "data.batch_size=8",
                                                            "optim.accum_steps=2", f"optim.grad_clip={clip}",
                                                            "data.num_workers=0", "data.image_size=64"]))
    data = RetrievalDataModule(cfg.data, seed=0, accum_steps=2)
    module = build_module(cfg, data.card.num_images("train"), len(data.tokenizer), 0, load_init=False)
    norms = []

    class SeeTheStep(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            def after_step(optimizer, args, kwargs):  # the gradients AdamW used (a pre-hook runs before the
                # closure in which Lightning calls on_before_optimizer_step)
                grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
                norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            trainer.optimizers[0].register_step_post_hook(after_step)

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[SeeTheStep()], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert len(norms) == 3 and all(abs(n - clip) < 1e-6 for n in norms), norms
