"""Where a training run's wall time goes: `python train.py` itself, with a timing callback added and the
token metric's scoring timed, so that the figures are of the real command.

    python benchmarks/time_token_run.py --config fine_grained_tokens.yaml [train.py overrides...]

Prints, after train.py's own output, one table: start-up (process start to the first training step:
imports, data and model built, the sanity check's validation), each training epoch (its steps),
each validation (encoding the split, then scoring: screened or exhaustive, `tokens.val_scoring`), the
test (encoding, then scoring by `tokens.test_scoring`) and the rest (checkpoints, writing the run). Also
written to <run_dir>/timings.json. Any config runs (a global model has no token scoring: its metric's
compute is timed instead).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402

import pipeline.training.trainer as trainer_module  # noqa: E402
from pipeline.evaluation.metric import RetrievalMetrics  # noqa: E402
from pipeline.evaluation.token_metric import TokenRetrievalMetrics  # noqa: E402

EVENTS: list[tuple[str, float, float]] = []  # (what, wall seconds since start, this process's CPU seconds)


def mark(what: str) -> None:
    EVENTS.append((what, time.perf_counter() - T0, time.process_time()))


class PhaseClock(L.Callback):
    """Marks the start and end of every phase Lightning runs."""

    def on_train_epoch_start(self, trainer, pl_module):
        mark(f"train{trainer.current_epoch}:start")

    def on_train_epoch_end(self, trainer, pl_module):
        mark(f"train{trainer.current_epoch}:end")

    def on_validation_epoch_start(self, trainer, pl_module):
        mark("val:start")

    def on_validation_end(self, trainer, pl_module):
        mark("val:end")

    def on_test_epoch_start(self, trainer, pl_module):
        mark("test:start")

    def on_test_end(self, trainer, pl_module):
        mark("test:end")


def timed_compute(compute):
    def wrapper(self):
        mark("score:start")
        out = compute(self)
        mark("score:end")
        return out
    return wrapper


def phases(events: list[tuple[str, float]], total: float) -> list[tuple[str, float]]:
    """(phase, seconds) from events `(what, seconds)`: start-up (the sanity check's validation inside it),
    every training epoch's steps, the validation at its end (Lightning runs it inside the epoch) and its
    scoring, the test and its scoring, then the rest."""
    rows, opened, inner = [], {}, {}
    starts = (t for what, t in events if what.startswith("train") and what.endswith(":start"))
    first_step = next(starts, total)
    rows.append(("start-up (imports, data, model, sanity validation)", first_step))
    counted = first_step
    for what, t in events:
        name, edge = what.rsplit(":", 1)
        if edge == "start":
            opened[name] = t
            continue
        began = opened.pop(name, None)
        if began is None:
            continue
        inner[name] = t - began
        if name.startswith("train"):
            validation = inner.pop("val", 0.0)
            rows.append((f"training epoch {int(name[5:])}: steps", t - began - validation))
            rows.append((f"training epoch {int(name[5:])}: validation (encode + score)", validation))
            rows.append(("  of which scoring", inner.pop("score", 0.0)))
            counted += t - began
        elif name == "test":
            rows.append(("test (encode + score)", t - began))
            rows.append(("  of which scoring", inner.pop("score", 0.0)))
            counted += t - began
    rows.append(("the rest (checkpoints, run files, exit)", total - counted))
    return rows


def main() -> int:
    argv = sys.argv[1:]
    build = trainer_module.build_trainer

    def build_trainer(cfg, run_dir, monitor, callbacks=()):
        main.run_dir = run_dir
        return build(cfg, run_dir, monitor, [*callbacks, PhaseClock()])

    trainer_module.build_trainer = build_trainer
    TokenRetrievalMetrics.compute = timed_compute(TokenRetrievalMetrics.compute)
    RetrievalMetrics.compute = timed_compute(RetrievalMetrics.compute)
    from pipeline.training.cli import main as train_main

    rc = train_main(argv)
    total = time.perf_counter() - T0
    rows = phases([(what, wall) for what, wall, _ in EVENTS], total)
    cpu = phases([(what, c) for what, _, c in EVENTS], time.process_time())
    print(f"\nwall time {total:.1f} s, CPU {time.process_time():.1f} s (this process; data workers not counted), "
          f"{os.environ.get('OMP_NUM_THREADS', 'all')} threads, load {os.getloadavg()[0]:.1f} at the end\n"
          "| phase | wall s | CPU s |\n|---|---|---|")
    for (name, seconds), (_, cpu_seconds) in zip(rows, cpu):
        print(f"| {name} | {seconds:.1f} | {cpu_seconds:.1f} |")
    run_dir = getattr(main, "run_dir", None)
    if run_dir is not None and Path(run_dir).exists():
        (Path(run_dir) / "timings.json").write_text(json.dumps({"total_s": total, "phases": rows, "cpu_phases": cpu,
                                                                "events": EVENTS}, indent=1) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
