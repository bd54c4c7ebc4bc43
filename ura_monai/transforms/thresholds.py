"""Thresholds and normalization statistics chosen from normal validation data (anomalib's post-processor role)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["DEFAULT_FALSE_ALARM_RATE", "normal_postprocessing_stats", "normalize_score", "stored_normal_scores"]

# the fraction of normal images above the default image threshold (docs/design.md, "Thresholds")
DEFAULT_FALSE_ALARM_RATE = 0.01


def normal_postprocessing_stats(
    image_scores: Sequence[float] | torch.Tensor,
    anomaly_maps: torch.Tensor | None = None,
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
    pixel_quantile: float = 0.999,
) -> dict[str, float]:
    """Image and pixel thresholds as high quantiles of scores on held-out *normal* images.

    No anomalous data is needed, which matches the training setting. Normalization maps the normal minimum
    to 0, the threshold to 0.5 and ``2 * threshold - min`` to 1 (clipped), the form anomalib uses.

    Args:
        image_scores: scores of normal validation images.
        anomaly_maps: their anomaly maps (N, 1, H, W); pixel statistics are skipped when None.
        false_alarm_rate: the fraction of normal images expected at or above the image threshold, which is the
            ``1 - false_alarm_rate`` quantile of the normal image scores; in (0, 1).
        pixel_quantile: quantile of normal pixel values used as the pixel threshold.

    Returns:
        dict with ``image_threshold``, ``image_min``, ``image_max``, ``image_false_alarm_rate`` and, with maps,
        ``pixel_threshold``, ``pixel_min``, ``pixel_max`` (floats).
    """
    scores = torch.as_tensor(image_scores, dtype=torch.float64).flatten().numpy()
    if scores.size == 0 or not np.isfinite(scores).all():
        raise ValueError("normal validation scores are empty or not finite")
    if not 0.0 < false_alarm_rate < 1.0:
        raise ValueError(f"false_alarm_rate must be in (0, 1), got {false_alarm_rate}")
    stats = {"image_threshold": float(np.quantile(scores, 1.0 - false_alarm_rate)), "image_min": float(scores.min())}
    stats["image_max"] = 2 * stats["image_threshold"] - stats["image_min"]
    stats["image_false_alarm_rate"] = float(false_alarm_rate)
    if anomaly_maps is not None:
        pixels = anomaly_maps.detach().float().flatten()
        if pixels.numel() > 4_000_000:  # a random subset estimates a quantile well and bounds memory
            pixels = pixels[torch.randperm(pixels.numel(), generator=torch.Generator().manual_seed(0))[:4_000_000]]
        stats["pixel_threshold"] = float(torch.quantile(pixels, pixel_quantile))
        stats["pixel_min"] = float(pixels.min())
        stats["pixel_max"] = 2 * stats["pixel_threshold"] - stats["pixel_min"]
    return stats


def stored_normal_scores(image_scores: Sequence[float] | torch.Tensor) -> list[float]:
    """The normal image scores a checkpoint keeps (``extra["normal_image_scores"]``: sorted, 6 decimals), so that
    another operating point can be taken from them at inference (``URANetPredictor(false_alarm_rate=...)``)."""
    scores = torch.as_tensor(image_scores, dtype=torch.float64).flatten().tolist()
    return [round(float(v), 6) for v in sorted(scores)]


def normalize_score(value: torch.Tensor, threshold: float, min_value: float, max_value: float) -> torch.Tensor:
    """``((value - threshold) / (max - min)) + 0.5`` clipped to [0, 1]: the threshold maps to 0.5.

    The functional form of ``NormalizeAnomalyScore``; a degenerate range (all normal scores equal) is widened
    to a tiny positive span instead of failing.
    """
    from ura_monai.transforms.postprocess import NormalizeAnomalyScore

    # a tensor in gives a tensor out (the transform also takes arrays and numbers)
    return NormalizeAnomalyScore(threshold, min_value, max(max_value, min_value + 1e-12))(value)  # type: ignore[return-value]
