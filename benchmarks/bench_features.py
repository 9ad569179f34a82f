"""Training a hash head on feature shards vs on pixels, with the same backbone.

For each backbone: make the feature shards once (`python -m data_prep features`, timed: the
one-time cost), then time training steps of the UCCH 64-bit module (the pipeline's own
RetrievalDataModule, build_module and a Lightning Trainer, validation off) in three settings:
  pixels, end to end   what `train.py --config <pixel config>` does (backbone forward + backward);
  pixels, frozen       backbone forward only, heads train (bench-only: the configs have no freeze switch);
  feature shards       the `features` encoders read img.npy / txt.npy (configs/*_features.yaml).
Steps/s is wall time per step including the wait for data, after --warmup steps; each setting runs
--reps times, interleaved, and the median is printed. CPU only here, so the backbones are small:
  cnn + tiny_bert   the defaults of hash_64bit.yaml (SmallCNN width 64, 2-layer BERT width 128), 64 px;
  vit + bert        a ViTModel (width 192, 6 layers, patch 8, 64 px) and a BertModel (width 256,
                    4 layers), randomly initialised and saved with save_pretrained, loaded by path
                    as the real configs load theirs.

    python benchmarks/bench_features.py [--train 1024] [--batch 64] [--steps 20] [--reps 3]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from data_prep import build_shapes  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import RetrievalDataModule  # noqa: E402
from pipeline.inference.features import main as features_main  # noqa: E402
from pipeline.training.build import build_module, complete_config  # noqa: E402


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.steps += 1
            self.end = time.perf_counter()


def save_vit_bert(folder: Path, vocab_size: int) -> dict[str, str]:
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    if not (folder / "bert" / "config.json").is_file():
        torch.manual_seed(0)
        ViTModel(ViTConfig(image_size=64, patch_size=8, hidden_size=192, num_hidden_layers=6, num_attention_heads=3,
                           intermediate_size=768)).save_pretrained(folder / "vit")
        BertModel(BertConfig(vocab_size=vocab_size, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                             intermediate_size=1024, max_position_embeddings=64)).save_pretrained(folder / "bert")
    return {"image": str(folder / "vit"), "text": str(folder / "bert")}


def steps_per_s(data_root: Path, encoders: list[str], batch: int, warmup: int, steps: int, frozen: bool,
                workers: int) -> float:
    cfg = complete_config(load_config("hash_64bit.yaml", [f"data.root={data_root}", f"data.batch_size={batch}",
                                                          f"data.num_workers={workers}",
                                                          f"data.steps_per_epoch={warmup + steps}",
                                                          "logger.wandb=false", *encoders]))
    dm = RetrievalDataModule(cfg.data, seed=0)
    model = build_module(cfg, dm.card.num_images("train"), len(dm.tokenizer), dm.tokenizer.pad_token_id or 0)
    if frozen:
        model.image_encoder.requires_grad_(False)
        model.text_encoder.requires_grad_(False)
    timer = StepTimer(warmup)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=warmup + steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[timer])
    with contextlib.redirect_stderr(io.StringIO()):
        trainer.fit(model, datamodule=dm)
    return timer.steps / (timer.end - timer.start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=1024, help="training images of the shapes dataset")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workers", type=int, default=1, help="data workers during training")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "features")
    args = p.parse_args()
    import logging
    logging.disable(logging.WARNING)
    # one intra-op thread (data workers have one each anyway): on this shared 2-core machine two
    # threads spin-waiting for each other made a hash step up to 60x slower, which would measure the
    # neighbours, not the pipeline
    torch.set_num_threads(args.threads)

    shapes = build_shapes(args.work / "shapes", train=args.train, val=64, test=64, shard_size=128)
    vocab = json.loads((shapes / "dataset.json").read_text())["tokenizer_vocab_size"]
    hf = save_vit_bert(args.work / "models", vocab)
    # random-init encoders, trainable unless a setting freezes them: what is timed is the data path
    scratch = ["model.image_encoder.init=null", "model.image_encoder.freeze=false"]
    backbones = {
        "cnn + tiny_bert": scratch,
        "vit + bert": [*scratch, f"model.image_encoder.name={hf['image']}", f"model.text_encoder.name={hf['text']}"],
    }
    dims = {}
    print(f"{os.cpu_count()} CPUs, {args.threads} torch thread(s), load average {os.getloadavg()[0]:.1f}; "
          f"shapes {args.train} train images, "
          f"batch {args.batch}, {args.steps} timed steps after {args.warmup}, medians of {args.reps}")
    for name, overrides in backbones.items():
        out = args.work / f"features_{name.split()[0]}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert features_main(["--shards", str(shapes), "--config", "hash_64bit.yaml", *overrides,
                                  "--out", str(out), "--workers", "2", "--batch-size", "128", "--no-progress"]) == 0
        seconds = time.perf_counter() - t0
        card = json.loads((out / "dataset.json").read_text())
        images = sum(s["num_images"] for s in card["splits"].values())
        dims[name] = (out, card["features"]["image_dim"], card["features"]["text_dim"], images / seconds)
        print(f"  {name}: feature shards for {images} images in {seconds:.1f} s ({images / seconds:.0f} images/s, "
              f"start-up included), {sum(p.stat().st_size for p in out.glob('*.tar')) / images / 1e3:.1f} kB/image")

    settings = []
    for name, overrides in backbones.items():
        out, image_dim, text_dim, _ = dims[name]
        features = [*scratch, "model.image_encoder.name=features", f"model.image_encoder.width={image_dim}",
                    "model.text_encoder.name=features", f"model.text_encoder.width={text_dim}"]
        settings += [(name, "pixels, end to end", shapes, overrides, False),
                     (name, "pixels, frozen backbone", shapes, overrides, True),
                     (name, "feature shards", out, features, False)]
    results: dict[tuple, list[float]] = {}
    for rep in range(args.reps):
        for name, how, root, overrides, frozen in settings:
            r = steps_per_s(root, overrides, args.batch, args.warmup, args.steps, frozen, args.workers)
            results.setdefault((name, how), []).append(r)
            print(f"  rep {rep} {name:>15} | {how:<24}: {r:6.2f} steps/s", flush=True)

    print(f"\n### Hash head (UCCH, 64 bits) training steps/s, batch {args.batch} (median of {args.reps})\n")
    print("| backbone | pixels, end to end | pixels, frozen backbone | feature shards | features vs end to end |")
    print("|---|---|---|---|---|")
    for name in backbones:
        m = {how: statistics.median(runs) for (backbone, how), runs in results.items() if backbone == name}
        e2e, frozen, feats = m["pixels, end to end"], m["pixels, frozen backbone"], m["feature shards"]
        print(f"| {name} | {e2e:.2f} | {frozen:.2f} | {feats:.1f} | {feats / e2e:.0f}x |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
