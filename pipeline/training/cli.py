"""Train and test one experiment: `python train.py --config hash_64bit.yaml [key=value ...]` (or
`fico-train`, the same command once the package is installed).

Builds the shapes default dataset on first use when no dataset is configured, trains with
validation every epoch, tests the best checkpoint, prints the FiCo-ITR table and writes
<run_dir>/test_metrics.json, <run_dir>/test_curves.json (with labels; not for token-level runs) and <run_dir>/config.yaml.

Every config key, its type, default and meaning: the dataclasses of pipeline/config.py, explained in
docs/configuration.md; `--print-config` shows a config with its bases and overrides applied.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from pipeline.config import ConfigError, load_config, to_yaml

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # fork-safe tokenizers in data workers


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a YAML file, or a name in the shipped configs (hash_64bit.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.bits=32 optim.lr=3e-4")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit (builds and writes nothing)")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.training.build import complete_config, model_tokenizer

    try:  # every start-up problem is one line naming it and the fix, before any training
        cfg = complete_config(load_config(args.config, args.overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:  # nothing built, nothing written
        print(to_yaml(cfg), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from pipeline.data import DataError, RetrievalDataModule, check_model_inputs

    try:
        datamodule = RetrievalDataModule(cfg.data, seed=cfg.run.seed, tokenizer=model_tokenizer(cfg),
                                         accum_steps=cfg.optim.accum_steps)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import lightning as L
    import torch.distributed as dist

    from data_prep import atomic_write_bytes
    from pipeline.evaluation.table import format_tables
    from pipeline.training.build import build_module, logged_metric_names
    from pipeline.training.peers import exit_when_a_peer_stops
    from pipeline.training.prerequisites import check_prerequisites
    from pipeline.training.provenance import RecordProvenance
    from pipeline.training.run_dir import (FINISHED, RUN_DIR_ENV, check_resume, choose_monitor, record_resume,
                                           resolve_run_dir, resume_checkpoint, slurm_job_tag)
    from pipeline.training.run_files import save_inputs
    from pipeline.training.test_curves import log_curves_wandb, write_curves
    from pipeline.training.trainer import build_trainer, upload_best_checkpoint

    run_dir = resolve_run_dir(cfg)
    tok = datamodule.tokenizer
    try:  # decided before any work: never continue a different experiment, monitor a metric that exists
        monitor, note = choose_monitor(cfg, datamodule.card, logged_metric_names(cfg))
        resume = resume_checkpoint(run_dir) if cfg.run.train else None
        changes = check_resume(run_dir, cfg, datamodule.card) if resume else {}
        # weights that do not fit; feature shards need `features` encoders and pixels need real ones
        teacher = check_prerequisites(cfg, datamodule)  # training labels, a distillation teacher
        L.seed_everything(cfg.run.seed, workers=True, verbose=False)
        model = build_module(cfg, datamodule.card.num_images("train"), len(tok), tok.pad_token_id or 0)
        check_model_inputs(datamodule.card, model)
        if teacher is not None:
            model.teacher = teacher
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    trainer = build_trainer(cfg, run_dir, monitor, [RecordProvenance(run_dir, cfg, datamodule.card)])
    if trainer.is_global_zero:
        if note:
            logging.getLogger("train").warning(note)
        if resume:
            record_resume(run_dir, resume, changes)
        atomic_write_bytes(run_dir / "config.yaml", to_yaml(cfg).encode())  # other ranks may be reading it
        save_inputs(run_dir, cfg, datamodule.card, tok)  # tokenizer and categories: inference needs no dataset

    ckpt = None
    # a peer that stops ends this rank too, in one line, within trainer.collective_timeout
    with exit_when_a_peer_stops(trainer, cfg, run_dir, slurm_job_tag()):
        if cfg.run.train:
            if resume and trainer.is_global_zero:
                print(f"resuming from {resume}" + (f" (allowed changes: {', '.join(changes)})" if changes else ""))
            trainer.fit(model, datamodule=datamodule, ckpt_path=resume, weights_only=True)
            ckpt = "best" if trainer.checkpoint_callback.best_model_path else "last"
        trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)

    if trainer.is_global_zero:
        results = model.test_results
        if model.test_scoring:  # how the scores were made (test_metrics.json holds numbers only)
            (run_dir / "test_scoring.json").write_text(json.dumps(model.test_scoring, indent=2) + "\n")
        (run_dir / FINISHED).write_text(json.dumps(results, indent=2) + "\n")
        curves = getattr(model, "test_curves", {}) or {}
        write_curves(run_dir, curves)
        print("\n" + format_tables(results, f"{cfg.run.name}: test ({'trained' if cfg.run.train else 'untrained'})"))
        if model.test_scoring:
            print(f"test scoring: {model.test_scoring['description']}")
        print(f"\nrun directory: {run_dir}")
        upload_best_checkpoint(cfg, run_dir, results)
        if cfg.logger.wandb:
            import wandb

            log_curves_wandb(curves)
            wandb.finish()  # flush the summary now; Lightning leaves the run open until exit
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # without it CPU DDP runs here sometimes abort at exit
    return 0
