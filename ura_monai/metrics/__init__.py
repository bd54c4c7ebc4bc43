"""Anomaly-detection metrics: plain functions and an Ignite metric for MONAI workflows."""

from ura_monai.metrics.anomaly_metrics import ANOMALY_METRIC_NAMES, AnomalyDetectionMetric, from_anomaly_output
from ura_monai.metrics.functional import aupro, auroc, f1_max, f1_max_threshold, image_auroc, pixel_auroc, roc_curve
from ura_monai.metrics.validation import ScalarAnomalyMetrics, ValidationScore, scores_and_labels

__all__ = [
    "ANOMALY_METRIC_NAMES",
    "AnomalyDetectionMetric",
    "ScalarAnomalyMetrics",
    "ValidationScore",
    "from_anomaly_output",
    "aupro",
    "auroc",
    "f1_max",
    "f1_max_threshold",
    "image_auroc",
    "pixel_auroc",
    "roc_curve",
    "scores_and_labels",
]
