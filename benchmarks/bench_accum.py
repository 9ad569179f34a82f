"""Large contrastive batches in small memory: peak memory and step time of an effective batch of 1024 as
8 chunks of 128 (optim.accum_steps=8, GradCache) against one plain batch of 1024 and one plain batch of 128.

One step = forward, loss, backward and the AdamW update of the module `train.py` builds (Lightning's loop
left out), on real shapes batches. Each (config, mode) runs in a fresh process; `--warmup` steps run
untimed, then `--steps` steps are timed (median); the peak memory is the process' resident peak during the
steps above its level before the first (activations, gradients, optimiser state, score tensors).
Targets: accumulated memory <= 1.5x that of the plain batch of 128; accumulated time <= 1.5x the plain 1024.

    python benchmarks/bench_accum.py [--configs fine_grained.yaml,fine_grained_tokens.yaml] [--steps 3]

Prints a table and writes benchmarks/out/accum.json.
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

MODES = {"plain 128": (128, 1), "plain 1024": (1024, 1), "8 x 128": (128, 8)}  # name -> (batch_size, accum)


def one(config: str, mode: str, steps: int, warmup: int, threads: int) -> dict:
    import torch

    from pipeline.comparison.measure import PeakRSS
    from pipeline.config import load_config
    from pipeline.data import RetrievalDataModule
    from pipeline.training.build import build_module, complete_config
    from pipeline.training.grad_cache import cached_backward

    torch.set_num_threads(threads)
    batch, accum = MODES[mode]
    cfg = complete_config(load_config(config, [f"data.batch_size={batch}", f"optim.accum_steps={accum}",
                                               "data.num_workers=0", "logger.wandb=false",
                                               "model.image_encoder.init=null"]))  # weights change no cost
    dm = RetrievalDataModule(cfg.data, seed=0, accum_steps=accum)
    torch.manual_seed(0)
    module = build_module(cfg, dm.card.num_images("train"), len(dm.tokenizer), dm.tokenizer.pad_token_id or 0)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    loader = iter(dm.train_dataloader())
    batches = [next(loader) for _ in range(warmup + steps)]
    module.train()

    def step(b):
        opt.zero_grad(set_to_none=True)
        if accum == 1:
            loss, _ = module.training_loss(module.represent(b), b)
            loss.backward()
        else:
            cached_backward(module, module.represent, module.training_loss, b, accum)
        opt.step()

    times = []
    with PeakRSS() as mem:
        for i, b in enumerate(batches):
            t = time.perf_counter()
            step(b)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    return {"config": config, "mode": mode, "rows_per_step": batch * accum, "s_per_step": statistics.median(times),
            "peak_extra_MiB": mem.mib, "threads": threads}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="fine_grained.yaml,fine_grained_tokens.yaml")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", nargs=2, metavar=("CONFIG", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], args.steps, args.warmup, args.threads)))
        return 0
    rows = []
    for config in args.configs.split(","):
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--one", config, mode, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                 env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if out.returncode:  # e.g. the plain 1024 token step killed for memory: say so, go on
                rows.append({"config": config, "mode": mode, "failed": out.stderr.strip().splitlines()[-1:]})
            else:
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    print("\n| config | step | rows / step | s / step (median) | peak extra MiB |\n|---|---|---|---|---|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['config']} | {r['mode']} | | failed: {r['failed']} | |")
        else:
            print(f"| {r['config']} | {r['mode']} | {r['rows_per_step']} | {r['s_per_step']:.2f} | "
                  f"{r['peak_extra_MiB']:.0f} |")
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "accum.json").write_text(json.dumps({"load": os.getloadavg(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
