"""The training room: a config becomes a LightningModule (models + objective + the protocol on val/test),
trained by a Lightning Trainer in a stable run directory, on one CPU, GPUs, or nodes under SLURM.

    cli.py         train.py / fico-train: the whole run, start-up checks first
    module.py      RetrievalModule: the training step, validation / test by the protocol, the optimiser
    aligner.py     FineGrainedAligner (continuous embeddings)
    hasher.py      Hasher: the hashing family's heads, packed codes, nested prefixes
    hasher_ucch.py        CrossModalHasher (UCCH, unsupervised)
    hasher_supervised.py  SupervisedHasher (DCMH, from labels)
    hasher_instance.py    InstanceHasher (contrastive on the codes, optionally distilled from a teacher)
    token_aligner.py  TokenAligner (token-level fine-grained: late interaction or cross-attention, with the
                   global embedding that screens)
    build.py       a config's LightningModule with its encoders and heads
    prerequisites.py  what a run needs before it trains: training labels, a distillation teacher
    restore.py     a trained module back from its run folder (plain-data checkpoints only)
    backbone.py    the shapes backbone: pretrained once, cached (python -m pipeline.backbone)
    run_dir.py     the run directory: resume rules, W&B id, the checkpoint monitor
    trainer.py     the Trainer: logger, checkpoints, callbacks
    callbacks.py   throughput, skipped records, the data epoch, bounded collectives, atomic checkpoints
    requeue.py     SLURM pre-emption: checkpoint on every rank, requeue
    peers.py       a stopped rank: bounded collective waits, one line and a non-zero exit on the others
    heartbeat.py   which rank stopped, among many: counters in the rendezvous store

A new model family is a RetrievalModule subclass here (its objective in pipeline.objectives, its heads
in pipeline.models) and a branch in build.py. May import config, data, models, objectives and
evaluation; nothing imports it but inference, comparison and the entry points.
"""
