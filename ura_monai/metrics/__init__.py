"""Anomaly-detection metrics: plain functions and an Ignite metric for MONAI workflows."""

from ura_monai.metrics.anomaly_metrics import ANOMALY_METRIC_NAMES, AnomalyDetectionMetric, from_anomaly_output
from ura_monai.metrics.functional import (
    anomalous_tpr,
    aupro,
    auroc,
    average_precision,
    f1_max,
    f1_max_threshold,
    image_auroc,
    normal_fpr,
    pixel_ap,
    pixel_auroc,
    pixel_f1_max,
    pixel_f1_max_threshold,
    roc_curve,
    uncertainty_error_auroc,
)
from ura_monai.metrics.validation import ScalarAnomalyMetrics, ValidationScore, scores_and_labels

__all__ = [
    "ANOMALY_METRIC_NAMES",
    "AnomalyDetectionMetric",
    "ScalarAnomalyMetrics",
    "ValidationScore",
    "from_anomaly_output",
    "anomalous_tpr",
    "aupro",
    "auroc",
    "average_precision",
    "f1_max",
    "f1_max_threshold",
    "image_auroc",
    "normal_fpr",
    "pixel_ap",
    "pixel_auroc",
    "pixel_f1_max",
    "pixel_f1_max_threshold",
    "roc_curve",
    "scores_and_labels",
    "uncertainty_error_auroc",
]
