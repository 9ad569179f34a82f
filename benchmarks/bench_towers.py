"""Memory and time of fine-tuning a tower: activation checkpointing (`model.*_encoder.grad_checkpointing`)
and compiled encoders (`trainer.compile`).

    python benchmarks/bench_towers.py checkpointing [--steps 3] [--threads 2]
    python benchmarks/bench_towers.py compile [--steps 10] [--threads 2]

`checkpointing`: one training step of a tower alone (forward, a loss on its vector and tokens, backward),
with and without checkpointing, each in a fresh process: the peak resident memory the steps add above the
level before them (activations, gradients), the bytes the forward keeps for the backward (what
checkpointing drops), and the median step time. Towers: the shapes cnn (width 128, 256 images of 64 px),
a BERT-style text tower (tiny_bert: 8 layers of width 256, 256 captions of 48 word pieces) and a ViT
(8 layers of width 256, 128 images of 64 px in 8-px patches), built the way the pipeline builds them
(`prepare`: random weights, train mode).

`compile`: the fine_grained.yaml encoders (the shapes cnn, width 64; tiny_bert, width 128, 2 layers) at
batch 128, eager and compiled (torch.compile, inductor): the first step (where compiling happens) and the
median wall and CPU time of the next `--steps` (CPU time moves less with the load of a shared machine). Fixed text length here; real batches vary in length and compile a second
time with a dynamic length, then no more.

Prints a table and writes benchmarks/out/towers_<what>.json.
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
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOWERS = ("cnn", "text", "vit")


def build(tower: str, checkpointing: bool):
    """(encoder, inputs) of one benchmark tower, built and prepared as the pipeline does."""
    import torch

    from pipeline.models.encoders import HFVisionEncoder, SmallCNN, build_text_encoder, prepare

    section = SimpleNamespace(name=tower, unlocked_layers=None, grad_checkpointing=checkpointing, freeze=False,
                              width=256, layers=8, heads=4, pooling="auto")
    torch.manual_seed(0)
    if tower == "cnn":
        return prepare(SmallCNN(128), section, "bench"), (torch.randn(256, 3, 64, 64),)
    if tower == "text":
        section.name = "tiny_bert"
        ids = torch.randint(5, 8000, (256, 48))
        return build_text_encoder(section, 8000, 48), (ids, torch.ones_like(ids))
    from transformers import ViTConfig, ViTModel

    vit = ViTModel(ViTConfig(image_size=64, patch_size=8, hidden_size=256, num_hidden_layers=8, num_attention_heads=4,
                             intermediate_size=1024))
    return prepare(HFVisionEncoder(vit), section, "bench"), (torch.randn(128, 3, 64, 64),)


def checkpointing_one(tower: str, checkpointing: bool, steps: int) -> dict:
    import torch

    from pipeline.comparison.measure import PeakRSS

    encoder, inputs = build(tower, checkpointing)
    kept = [0]

    def pack(t):
        kept[0] += t.numel() * t.element_size()
        return t

    times = []
    with PeakRSS() as mem:
        for i in range(steps + 1):  # the first untimed (allocator warm-up), but within the peak
            encoder.zero_grad(set_to_none=True)
            kept[0], start = 0, time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = encoder(*inputs)
            (out.vector.square().mean() + out.tokens.square().mean()).backward()
            if i:
                times.append(time.perf_counter() - start)
    return {"tower": tower, "checkpointing": checkpointing, "ms_per_step": 1000 * statistics.median(times),
            "peak_extra_MiB": mem.mib, "kept_for_backward_MiB": kept[0] / 2**20}


def compile_one(compiled: bool, steps: int) -> dict:
    import torch

    from pipeline.config import load_config
    from pipeline.models.encoders import build_image_encoder, build_text_encoder

    cfg = load_config("fine_grained.yaml", ["model.image_encoder.init=null"])
    torch.manual_seed(0)
    image = build_image_encoder(cfg.model.image_encoder)
    text = build_text_encoder(cfg.model.text_encoder, 8000, 48)
    if compiled:
        image.compile()
        text.compile()
    images, ids = torch.randn(128, 3, 64, 64), torch.randint(5, 8000, (128, 40))
    times, cpu = [], []
    for _ in range(steps + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        a, b = image(images), text(ids, torch.ones_like(ids))
        sum(x.square().mean() for x in (a.vector, a.tokens, b.vector, b.tokens)).backward()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"compiled": compiled, "first_step_s": times[0], "ms_per_step": 1000 * statistics.median(times[1:]),
            "cpu_ms_per_step": 1000 * statistics.median(cpu[1:])}


def in_fresh_process(args: list[str], threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, *args, "--threads", str(threads)], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("checkpointing", "compile"))
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 checkpointing, 10 compile)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--towers", default=",".join(TOWERS))
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    steps = args.steps or (3 if args.what == "checkpointing" else 10)
    if args.one:  # a child: one measurement
        flag = args.one[1] == "on"
        row = checkpointing_one(args.one[0], flag, steps) if args.what == "checkpointing" else compile_one(flag, steps)
        print(json.dumps(row))
        return 0
    rows = []
    if args.what == "checkpointing":
        print("| tower | checkpointing | ms / step | peak extra MiB | kept for backward MiB |\n|---|---|---|---|---|")
        for tower in args.towers.split(","):
            for flag in ("off", "on"):
                r = in_fresh_process(["checkpointing", "--one", tower, flag, "--steps", str(steps)], args.threads)
                rows.append(r)
                print(f"| {tower} | {flag} | {r['ms_per_step']:.0f} | {r['peak_extra_MiB']:.0f} | "
                      f"{r['kept_for_backward_MiB']:.1f} |", flush=True)
    else:
        print("| encoders | first step (s) | ms / step after | CPU ms / step after |\n|---|---|---|---|")
        for flag in ("off", "on"):
            r = in_fresh_process(["compile", "--one", "-", flag, "--steps", str(steps)], args.threads)
            rows.append(r)
            print(f"| {'compiled' if r['compiled'] else 'eager'} | {r['first_step_s']:.1f} | {r['ms_per_step']:.0f} | "
                  f"{r['cpu_ms_per_step']:.0f} |", flush=True)
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"towers_{args.what}.json").write_text(json.dumps({"load": os.getloadavg(), "threads": args.threads,
                                                              "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
