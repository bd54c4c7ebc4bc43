"""Slice scores to one volume score: the aggregations shared by DICOM inference and the MONAI Label app.

Only numpy (and the torch-free option names) here, so the MONAI Label environment (an older pydicom, no DICOM writers) imports it without the DICOM
modules.
"""

from __future__ import annotations

import numpy as np

from ura_monai.utils.enums import VolumeAggregation

__all__ = ["VOLUME_AGGREGATIONS", "aggregate_slice_scores", "check_volume_aggregation"]

VOLUME_AGGREGATIONS = VolumeAggregation.choices()


def check_volume_aggregation(aggregation: str) -> str:
    """``aggregation`` when it is one of :data:`VOLUME_AGGREGATIONS`, else ValueError naming them."""
    if aggregation not in VOLUME_AGGREGATIONS:
        raise ValueError(f"volume_aggregation must be one of {VOLUME_AGGREGATIONS}, got {aggregation!r}")
    return aggregation


def aggregate_slice_scores(slice_scores: np.ndarray, aggregation: str = "max", top_k: int = 5) -> float:
    """Aggregate per-slice anomaly scores into one volume score.

    Args:
        slice_scores: ``(slices,)`` scores.
        aggregation: ``"max"``, ``"mean"``, or ``"topk_mean"`` (mean of the ``top_k`` highest:
            less sensitive than max to one noisy slice, more than mean to a small lesion).
        top_k: slices averaged by ``"topk_mean"``.

    Returns:
        the volume score.
    """
    check_volume_aggregation(aggregation)
    scores = np.asarray(slice_scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("no slice scores to aggregate")
    if aggregation == "max":
        return float(scores.max())
    if aggregation == "mean":
        return float(scores.mean())
    k = max(1, min(int(top_k), scores.size))
    return float(np.sort(scores)[-k:].mean())
