"""From feature residuals to a pixel anomaly map and an image score (kept apart from the model, as anomalib does)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d
from torch import nn

__all__ = ["AnomalyMapGenerator", "feature_residual", "image_score"]

SCORE_MODES = ("max", "topk_mean", "std", "mean")


def feature_residual(features: torch.Tensor, restored: torch.Tensor, level_channels: Sequence[int]) -> torch.Tensor:
    """Sum over levels of ``1 - cosine`` between input and restored features, per position.

    Cosine per level (not over the concatenation) so that a level with large activations does not drown
    the others. Returns (B, 1, h, w).
    """
    residual = torch.zeros_like(features[:, :1])
    for f, r in zip(features.split(list(level_channels), dim=1), restored.split(list(level_channels), dim=1)):
        residual = residual + (1.0 - F.cosine_similarity(f, r, dim=1, eps=1e-6)).unsqueeze(1)
    return residual


def image_score(anomaly_map: torch.Tensor, mode: str = "max", top_k: float = 0.01) -> torch.Tensor:
    """Image score from a (B, 1, H, W) map: ``max``, ``topk_mean`` (mean of the top ``top_k`` fraction of pixels),
    ``std`` or ``mean``. Returns (B,)."""
    flat = anomaly_map.flatten(1)
    if mode == "max":
        return flat.amax(dim=1)
    if mode == "topk_mean":
        k = max(1, int(round(top_k * flat.shape[1])))
        return flat.topk(k, dim=1).values.mean(dim=1)
    if mode == "std":
        return flat.std(dim=1)
    if mode == "mean":
        return flat.mean(dim=1)
    raise ValueError(f"unknown score mode '{mode}'; choose one of {SCORE_MODES}")


class AnomalyMapGenerator(nn.Module):
    """Upsample a feature-grid map to the image size and smooth it with a Gaussian (separable, on the device).

    Borders are reflected, not zero-padded, so anomalies at the image edge keep their strength.

    Args:
        sigma: Gaussian standard deviation in output pixels (4 as in the MVTec literature); 0 disables smoothing.
    """

    kernel: torch.Tensor  # buffer

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        self.sigma = sigma
        kernel = gaussian_1d(torch.tensor(float(sigma)), truncated=4.0, normalize=True) if sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", kernel.float(), persistent=False)

    def forward(self, grid_map: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        up = F.interpolate(grid_map, size=tuple(image_size), mode="bilinear", align_corners=False)
        if self.sigma <= 0:
            return up
        kernel = self.kernel.to(up.dtype)
        return separable_filtering(up, [kernel, kernel], mode="reflect")
