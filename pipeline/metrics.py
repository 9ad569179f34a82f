"""The evaluation protocol's public names: `from pipeline.metrics import evaluate`.

The code lives in `pipeline.evaluation` (protocol.py, metric.py, score_input.py); this module keeps the
import path that scripts and the documentation use.
"""
from pipeline.evaluation.metric import RetrievalMetrics
from pipeline.evaluation.protocol import evaluate, metric_names
from pipeline.evaluation.score_input import evaluate_scores

__all__ = ["RetrievalMetrics", "evaluate", "evaluate_scores", "metric_names"]
