"""The evaluation protocol's public names: `from pipeline.metrics import evaluate`.

The code lives in `pipeline.evaluation` (protocol.py, metric.py); this module keeps the import path
that scripts and the documentation use.
"""
from pipeline.evaluation.metric import RetrievalMetrics
from pipeline.evaluation.protocol import evaluate, metric_names

__all__ = ["RetrievalMetrics", "evaluate", "metric_names"]
