"""Metrics and the scoring protocol (docs/metrics.md): features, per-sample scores, Fréchet/KID, teacher diagnostics.

    from dopsd_bench.metrics import evaluate, features_for_task
"""

from dopsd_bench.metrics.evaluate import METRIC_INFO, MetricInfo, evaluate, prepare_untuned
from dopsd_bench.metrics.features import FeatureExtractor, features_for_task

__all__ = ["METRIC_INFO", "FeatureExtractor", "MetricInfo", "evaluate", "features_for_task", "prepare_untuned"]
