"""Evaluation: teacher-forced scoring and edit-quality metrics."""

from kedit.evaluation.metrics import (
    METRICS,
    LocalityReference,
    MetricInfo,
    aggregate,
    evaluate_cases,
    harmonic_mean,
    mean_nll,
    metric_order,
    prob,
    token_accuracy,
)
from kedit.evaluation.scoring import TargetScore, score_targets

__all__ = [
    "METRICS",
    "LocalityReference",
    "MetricInfo",
    "TargetScore",
    "aggregate",
    "evaluate_cases",
    "harmonic_mean",
    "mean_nll",
    "metric_order",
    "prob",
    "score_targets",
    "token_accuracy",
]
