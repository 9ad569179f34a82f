"""Image-text retrieval training on the FiCo-ITR protocol: fine-grained models and cross-modal hashing.

The rooms follow the data flow (docs/architecture.md):

    room          what it holds                                                   may import
    data/         shards (data_prep's card and schema) -> batches                 data_prep, config
    models/       encoders and heads: plain nn.Modules                            config
    objectives/   losses on tensors, gathered across ranks                        -
    evaluation/   the protocol, exhaustive search, the Hamming kernel, the table   -
    training/     LightningModules, the Trainer, run directories, pre-emption      the five above
    inference/    trained runs loaded back, splits encoded, feature shards         the five above, training
    comparison/   the FiCo-ITR report and hybrid retrieval                        all but cluster
    cluster/      SLURM submission and sweeps                                      data_prep, config

Beside them: `config.py` (the typed schema) and `cli.py` (helpers of the command lines), which any
room may use, and the entry points, thin modules that keep the public names: `python -m
pipeline.evaluate | report | hybrid | features | submit | sweep | backbone` and `from pipeline.metrics
import evaluate`. `data_prep` is imported only through its package (its published contract).
tests/test_structure.py checks these rules.
"""
