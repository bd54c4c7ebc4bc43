"""Post-processing transforms (array and dictionary forms) for anomaly maps and scores, and the thresholds and
normalization statistics they use."""

from .postprocess import (
    NormalizeAnomalyScore,
    NormalizeAnomalyScored,
    RenderHeatmapOverlay,
    RenderHeatmapOverlayd,
    SmoothAnomalyMap,
    SmoothAnomalyMapd,
    ThresholdAnomalyMap,
    ThresholdAnomalyMapd,
)
from .thresholds import normal_postprocessing_stats, normalize_score

__all__ = [
    "NormalizeAnomalyScore",
    "NormalizeAnomalyScored",
    "RenderHeatmapOverlay",
    "RenderHeatmapOverlayd",
    "SmoothAnomalyMap",
    "SmoothAnomalyMapd",
    "ThresholdAnomalyMap",
    "ThresholdAnomalyMapd",
    "normal_postprocessing_stats",
    "normalize_score",
]
