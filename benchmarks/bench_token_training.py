"""Training step time and peak memory of each fine-grained objective: the global embedding
(fine_grained.yaml), late interaction (fine_grained_tokens.yaml) and SCAN-style cross-attention
(fine_grained_scan.yaml), at several batch sizes, on real shapes batches.

One step = forward, loss, backward and the AdamW update of the module `train.py` builds (the pipeline's
build_module; Lightning's loop left out). Each (config, batch) runs in a fresh process: the shapes
training stream gives the batches, `--warmup` steps run untimed, then `--steps` steps are timed (median
per step); the peak memory is the process' resident peak during the steps above its level before the
first (what training adds to the model and the batches: activations, gradients, optimiser state, the
token score tensors).

    python benchmarks/bench_token_training.py [--batches 32,128] [--steps 10] [--threads 2] [key=value ...]

CPU time per step is printed beside the wall time: on a shared machine it moves less with the load.

Prints a table and writes benchmarks/out/token_training.json. Token memory grows as
B x B x R x W (B rows, B columns, R image tokens, W word tokens): x16 from batch 32 to 128.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIGS = ("fine_grained.yaml", "fine_grained_tokens.yaml", "fine_grained_scan.yaml")


def one(config: str, batch: int, steps: int, warmup: int, threads: int, overrides: list[str]) -> dict:
    """Time the steps of one config in this process."""
    import torch

    from pipeline.comparison.measure import PeakRSS
    from pipeline.config import load_config
    from pipeline.data import RetrievalDataModule
    from pipeline.training.build import build_module, complete_config

    torch.set_num_threads(threads)
    cfg = complete_config(load_config(config, [f"data.batch_size={batch}", "data.num_workers=0", "logger.wandb=false",
                                           *overrides]))
    dm = RetrievalDataModule(cfg.data, seed=0)
    torch.manual_seed(0)
    module = build_module(cfg, dm.card.num_images("train"), len(dm.tokenizer), dm.tokenizer.pad_token_id or 0)
    module.log = module.log_dict = lambda *a, **k: None  # no trainer here: logging is Lightning's business
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    loader = iter(dm.train_dataloader())
    batches = [next(loader) for _ in range(warmup + steps)]
    module.train()

    def step(b):
        opt.zero_grad(set_to_none=True)
        loss = module.training_step(b, 0)
        loss.backward()
        opt.step()

    times, cpu = [], []
    with PeakRSS() as mem:  # from the first step: later steps reuse what the allocator kept
        for i, b in enumerate(batches):
            t, c = time.perf_counter(), time.process_time()
            step(b)
            if i >= warmup:
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
    words = [int(b["text"]["attention_mask"].shape[1]) for b in batches[warmup:]]
    return {"config": config, "batch": batch, "threads": threads, "ms_per_step": 1000 * statistics.median(times),
            "cpu_ms_per_step": 1000 * statistics.median(cpu),
            "peak_extra_MiB": mem.mib, "word_tokens": statistics.median(words),
            "image_tokens": 16, "token_dim": int(cfg.tokens.dim) if cfg.model.kind == "fine_grained_tokens" else None}


def _row(r: dict) -> str:
    return (f"| {r['config']} | {r['batch']} | {r['ms_per_step']:.0f} | {r['cpu_ms_per_step']:.0f} | "
            f"{r['peak_extra_MiB']:.0f} | {r['word_tokens']:.0f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--batches", default="32,128")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", nargs=2, metavar=("CONFIG", "BATCH"), help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value for every config")
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.steps, args.warmup, args.threads, args.overrides)))
        return 0
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for config in args.configs.split(","):
            cmd = [sys.executable, __file__, "--one", config, str(batch), "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--threads", str(args.threads), *args.overrides]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                 env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                return 1
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(_row(rows[-1]), flush=True)
    print("\n| config | batch | ms / step (median) | CPU ms / step | peak extra MiB | word tokens (median) |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        print(_row(r))
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "token_training.json").write_text(json.dumps({"load": os.getloadavg(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
