"""The evaluation room: the FiCo-ITR protocol (docs/protocol.md) on tensors. Knows nothing of models or
data: it takes embeddings or codes, ids and labels (and scorers as functions of tensors), on whatever
device they are.

    protocol.py    evaluate(): instance-level R@K / MedianR / MeanR / rsum, category-level mAP@k;
                   evaluate_blocks(): the same on scores handed over block by block (any scorer)
    ranking.py     the ranking work behind it (ranks and APs per block, the tie rule as sort keys)
    metric.py      RetrievalMetrics: the protocol as a torchmetrics Metric synced across ranks
    screened.py    the two-stage ranking as score blocks: a screen's top K re-ranked, the rest in its order
    token_level.py evaluate_tokens(): token-level models, exhaustive or screened
    token_metric.py  TokenRetrievalMetrics: the same as a Metric, token sets gathered across ranks
    scores.py      scoring blocks, bit packing, order keys
    exhaustive.py  chunked exhaustive top-k search
    hamming.py     the compiled Hamming top-k kernel for packed codes
    table.py       the printed result table
    cli.py         python -m pipeline.evaluate on saved features or score matrices
    extended.py    `all_metrics=True` / `--all`: the other published conventions, named, and the curves
    conventions.py [ucch], [dadh], P@K from ranked relevance
    ties.py        [ties] expectations and Hamming-radius lookup from per-distance histograms
    counting.py    the Hamming ranking as a stable counting order (no sort)
    curves.py      P@K over K and the 11-point interpolated PR
    folds.py       --folds N: COCO 1K-style fold means
    score_input.py evaluate_scores(): the protocol on (memory-mapped) score matrices

A new metric goes in protocol.py (and its name in metric_names). Imports nothing from pipeline but
`pipeline.cli` (the command line's helpers).
"""
