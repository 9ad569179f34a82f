"""The comparison room: the FiCo-ITR comparison of trained runs, quality beside cost.

    report.py       python -m pipeline.report: quality, encoding time, storage, query time, hybrid, plots
    hybrid.py       python -m pipeline.hybrid: hash screening + fine-grained re-ranking, over K
    screeners.py    screeners made from fine-grained embeddings (distilled hash head, SimHash)
    galleries.py    galleries beyond the test split (repeated, or distractors with the models' statistics)
    query_time.py   query time against gallery size: exhaustive search streamed in blocks, faiss
    measure.py      peak memory, the machine
    plots.py        the report's figures (matplotlib, optional)
    writers.py      CSV and markdown tables

May import config, inference (trained runs, encoded splits), models, objectives and evaluation.
"""
