"""Per-fold metrics and result aggregation."""

from mmdiag.evaluation.aggregate import aggregate_fold_metrics
from mmdiag.evaluation.metrics import CLASSIFICATION_METRICS, classification_metrics

__all__ = ["CLASSIFICATION_METRICS", "aggregate_fold_metrics", "classification_metrics"]
