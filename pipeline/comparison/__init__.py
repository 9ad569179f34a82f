"""The comparison room: the FiCo-ITR comparison of trained runs, quality beside cost.

    report.py       python -m pipeline.report: quality, encoding time, storage, query time, hybrid, plots
    report_wandb.py the report as one W&B run
    hybrid.py       python -m pipeline.hybrid: hash screening + fine-grained re-ranking, over K
    hybrid_table.py the hybrid table's rows and their format
    screeners.py    screeners: hashing runs (and a nested run's prefixes), and those made from fine-grained
                    embeddings (distilled hash head, SimHash)
    cascade.py      nested codes screening in two levels (a short prefix, then a longer one)
    token_costs.py  token-level runs: token storage, exhaustive vs screened token scoring cost
    token_hybrid.py token-level runs: any screen's top K re-ranked by token scores
    galleries.py    galleries beyond the test split (repeated, or distractors with the models' statistics)
    query_time.py   query time against gallery size: exhaustive search streamed in blocks, faiss
    measure.py      peak memory, the machine
    plots.py        the report's figures (matplotlib, optional)
    writers.py      CSV and markdown tables

May import config, inference (trained runs, encoded splits), models, objectives and evaluation.
"""
