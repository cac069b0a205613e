"""Metrics and the scoring protocol (docs/metrics.md): features, per-sample scores, Fréchet/KID, teacher diagnostics.

    from dopsd_bench.metrics import evaluate, features_for_task, register_metric

The names below load their modules on first use, so that `dopsd_bench.metrics.info` (what each metric is) imports
without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {"METRIC_INFO": "info", "MetricSpec": "info", "register_metric": "info", "evaluate": "evaluate",
          "prepare_untuned": "evaluate", "Sampled": "evaluate", "FeatureExtractor": "features",
          "features_for_task": "features"}
__all__ = ["METRIC_INFO", "FeatureExtractor", "MetricSpec", "Sampled", "evaluate", "features_for_task",
           "prepare_untuned", "register_metric"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
