"""Post-processing transforms (array and dictionary forms) for anomaly maps and scores."""

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

__all__ = [
    "NormalizeAnomalyScore",
    "NormalizeAnomalyScored",
    "RenderHeatmapOverlay",
    "RenderHeatmapOverlayd",
    "SmoothAnomalyMap",
    "SmoothAnomalyMapd",
    "ThresholdAnomalyMap",
    "ThresholdAnomalyMapd",
]
