"""From feature residuals to a pixel anomaly map and an image score (kept apart from the model, as anomalib does)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d
from torch import nn

__all__ = ["AnomalyMapGenerator", "ImageScorer", "box_filter", "feature_residual", "guided_filter", "image_score"]

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


def box_filter(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean of each channel of ``x`` (B, C, H, W) over a (2r+1) x (2r+1) window, reflected at the borders
    (MONAI's ``separable_filtering``: two 1D passes, so the cost does not grow with the window's area)."""
    kernel = torch.full((2 * radius + 1,), 1.0 / (2 * radius + 1), dtype=x.dtype, device=x.device)
    return separable_filtering(x, [kernel, kernel], mode="reflect")


def guided_filter(
    guide: torch.Tensor, source: torch.Tensor, radius: int, eps: float, subsample: int = 1
) -> torch.Tensor:
    """The guided filter (He, Sun and Tang, "Guided Image Filtering", ECCV 2010 / TPAMI 2013) of ``source``
    (B, 1, H, W) by ``guide`` (B, 1 or 3, H, W): in every window the output is a linear function of the guide
    fitted to the source by ridge regression (``eps``), averaged over the windows that cover a pixel. Where the
    guide is flat it is a box smoothing of the source; where the guide has an edge the source's step is kept at
    that edge. The colour form: a 3 x 3 covariance per window, inverted in closed form so that TorchScript and ONNX
    export it; a grey guide is used as three equal channels, as the backbone sees it (the same as the grey form
    with ``eps / 3``), so that one traced graph serves grey and colour images.

    Args:
        guide: the image, intensities in [0, 1].
        source: the map to filter, at the guide's size.
        radius: window radius in pixels of the full resolution (reduced to fit images smaller than the window).
        eps: ridge term in squared intensity units: edges whose contrast is well above ``sqrt(eps)`` are kept.
        subsample: the fast guided filter (He and Sun, arXiv 1505.00996, 2015): the linear coefficients are fitted
            on guide and source averaged over ``subsample`` x ``subsample`` blocks (radius ``radius / subsample``)
            and upsampled bilinearly; the output is still made with the full-resolution guide. 1: exact.
    """
    guide = guide.to(source.dtype)
    if guide.shape[1] == 1:
        guide = guide.expand(-1, 3, -1, -1)
    elif guide.shape[1] != 3:
        raise ValueError(f"the guide must have 1 or 3 channels, got {guide.shape[1]}")
    size = source.shape[-2:]
    small_guide, small_source = guide, source
    if subsample > 1:
        radius = max(1, round(radius / subsample))
        if size[0] % subsample == 0 and size[1] % subsample == 0:
            small_guide, small_source = F.avg_pool2d(guide, subsample), F.avg_pool2d(source, subsample)
        else:
            small = (max(1, size[0] // subsample), max(1, size[1] // subsample))
            small_guide = F.interpolate(guide, size=small, mode="area")
            small_source = F.interpolate(source, size=small, mode="area")
    a, b = _guided_coefficients(small_guide, small_source, radius, eps)
    if subsample > 1:
        a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
        b = F.interpolate(b, size=size, mode="bilinear", align_corners=False)
    return (a * guide).sum(1, keepdim=True) + b


def _guided_coefficients(
    guide: torch.Tensor, source: torch.Tensor, radius: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The guided filter's window-averaged linear coefficients ``(a (B, 3, H, W), b (B, 1, H, W))`` of a colour
    guide: the output is ``sum(a * guide) + b``."""
    radius = max(1, min(radius, min(source.shape[-2:]) - 1))
    mean_i, mean_p = box_filter(guide, radius), box_filter(source, radius)
    cov_ip = box_filter(guide * source, radius) - mean_i * mean_p
    r, g, bl = guide[:, 0:1], guide[:, 1:2], guide[:, 2:3]
    products = torch.cat([r * r, r * g, r * bl, g * g, g * bl, bl * bl], dim=1)
    m = box_filter(products, radius)
    mr, mg, mb = mean_i[:, 0:1], mean_i[:, 1:2], mean_i[:, 2:3]
    s_rr, s_rg, s_rb = m[:, 0:1] - mr * mr + eps, m[:, 1:2] - mr * mg, m[:, 2:3] - mr * mb
    s_gg, s_gb, s_bb = m[:, 3:4] - mg * mg + eps, m[:, 4:5] - mg * mb, m[:, 5:6] - mb * mb + eps
    # inverse of the symmetric covariance by its cofactors (positive definite: eps > 0 on the diagonal)
    c_rr, c_rg, c_rb = s_gg * s_bb - s_gb * s_gb, s_rb * s_gb - s_rg * s_bb, s_rg * s_gb - s_rb * s_gg
    c_gg, c_gb, c_bb = s_rr * s_bb - s_rb * s_rb, s_rg * s_rb - s_rr * s_gb, s_rr * s_gg - s_rg * s_rg
    det = s_rr * c_rr + s_rg * c_rg + s_rb * c_rb
    p_r, p_g, p_b = cov_ip[:, 0:1], cov_ip[:, 1:2], cov_ip[:, 2:3]
    a = (
        torch.cat(
            [
                c_rr * p_r + c_rg * p_g + c_rb * p_b,
                c_rg * p_r + c_gg * p_g + c_gb * p_b,
                c_rb * p_r + c_gb * p_g + c_bb * p_b,
            ],
            dim=1,
        )
        / det
    )
    b = mean_p - (a * mean_i).sum(1, keepdim=True)
    return box_filter(a, radius), box_filter(b, radius)


class AnomalyMapGenerator(nn.Module):
    """Upsample a feature-grid map to the image size (bilinear), then refine it: the guided filter with the image as
    guide (``guided_radius > 0``), so that the map's edges follow the image's, and/or a Gaussian (``sigma > 0``).
    Both run on the device; borders are reflected, not zero-padded, so anomalies at the image edge keep their strength.

    Args:
        sigma: Gaussian standard deviation in output pixels (4 as in the MVTec literature); 0 disables smoothing;
            None: 4 without the guided filter, 0 with it (the filter smooths where the image is flat).
        guided_radius: window radius of the guided filter in pixels (one feature cell, 8, in URA-Net); 0 disables it.
        guided_eps: the guided filter's ridge term, for intensities in [0, 1] (see :func:`guided_filter`).
        guided_subsample: the fast guided filter's block size (4: coefficients fitted at a quarter of the resolution,
            where the map, upsampled from a stride-8 grid, has all its detail; 1: the exact filter).
    """

    kernel: torch.Tensor  # buffer

    def __init__(
        self,
        sigma: float | None = 4.0,
        guided_radius: int = 0,
        guided_eps: float = 1e-3,
        guided_subsample: int = 4,
    ) -> None:
        super().__init__()
        self.sigma = float((4.0 if guided_radius <= 0 else 0.0) if sigma is None else sigma)
        self.guided_radius = int(guided_radius)
        self.guided_eps = float(guided_eps)
        self.guided_subsample = int(guided_subsample)
        kernel = (
            gaussian_1d(torch.tensor(self.sigma), truncated=4.0, normalize=True) if self.sigma > 0 else torch.ones(1)
        )
        self.register_buffer("kernel", kernel.float(), persistent=False)

    @property
    def needs_guide(self) -> bool:
        """Whether the map depends on the image (``forward`` then needs ``guide``)."""
        return self.guided_radius > 0

    def forward(
        self, grid_map: torch.Tensor, image_size: tuple[int, int], guide: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, 1, H, W) map from the grid map (B, 1, h, w); ``guide``: the images (B, 1 or 3, H, W) in [0, 1]."""
        up = F.interpolate(grid_map, size=tuple(image_size), mode="bilinear", align_corners=False)
        if self.needs_guide:
            if guide is None:
                raise ValueError(
                    "this anomaly map is guided by the image (guided_radius > 0): pass the images as guide"
                )
            if guide.shape[-2:] != up.shape[-2:] or guide.shape[0] != up.shape[0]:
                raise ValueError(f"guide of shape {tuple(guide.shape)} does not match the map {tuple(up.shape)}")
            up = guided_filter(guide, up.float(), self.guided_radius, self.guided_eps, self.guided_subsample).to(
                up.dtype
            )
        if self.sigma <= 0:
            return up
        kernel = self.kernel.to(up.dtype)
        return separable_filtering(up, [kernel, kernel], mode="reflect")


class ImageScorer(nn.Module):
    """Image scores (B,) from a model's maps, as ``score_map`` says:

    - ``"grid"``: ``image_score`` of the anomaly map on the feature grid, before upsampling and smoothing (as
      PatchCore scores its patches);
    - ``"pixel"``: of the smoothed pixel map;
    - ``"grid_and_position"``: the mean of two peaks, each standardized by its mean and standard deviation over
      normal images no normal model saw (``calibrate``): the grid map's and the position model's. A small defect that
      the position model alone flags (one grid cell where an aligned part looks different) keeps its evidence at the
      image level, where the map's learned correction may have smoothed it; docs/design.md has the measurements.

    Args:
        score_map: one of the three above.
        mode, top_k: how a map becomes a peak (:func:`image_score`).
    """

    calibration: torch.Tensor  # buffer: mean and std of the normal map peaks, then of the normal position peaks

    def __init__(self, score_map: str = "grid", mode: str = "max", top_k: float = 0.01) -> None:
        super().__init__()
        self.score_map, self.mode, self.top_k = score_map, mode, top_k
        image_score(torch.zeros(1, 1, 2, 2), mode, top_k)  # fail early on a bad mode
        self.register_buffer("calibration", torch.tensor([0.0, 1.0, 0.0, 1.0]))

    @property
    def needs_position(self) -> bool:
        """Whether ``forward`` needs the position model's distances."""
        return self.score_map == "grid_and_position"

    def peaks(self, grid_map: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two peaks (each (B,)) that ``"grid_and_position"`` standardizes."""
        return image_score(grid_map, self.mode, self.top_k), image_score(position, self.mode, self.top_k)

    @torch.no_grad()
    def calibrate(self, grid_maps: torch.Tensor, positions: torch.Tensor) -> None:
        """Set the peaks' statistics from normal images' grid maps and position distances (each (N, 1, h, w))."""
        map_peaks, position_peaks = (p.double() for p in self.peaks(grid_maps, positions))
        if map_peaks.numel() < 2 or not (map_peaks.isfinite().all() and position_peaks.isfinite().all()):
            raise ValueError("the image score's calibration needs finite maps of at least two normal images")
        stats = torch.stack([map_peaks.mean(), map_peaks.std(), position_peaks.mean(), position_peaks.std()])
        stats[1::2] = stats[1::2].clamp_min(1e-6)
        self.calibration.copy_(stats.to(self.calibration))

    def forward(
        self, grid_map: torch.Tensor, anomaly_map: torch.Tensor, position: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scores of the grid map (B, 1, h, w), its pixel map (B, 1, H, W) and, for ``"grid_and_position"``, the
        position model's distances (B, 1, h, w)."""
        if self.score_map == "pixel":
            return image_score(anomaly_map, self.mode, self.top_k)
        if not self.needs_position:
            return image_score(grid_map, self.mode, self.top_k)
        if position is None:
            raise ValueError("score_map='grid_and_position' needs the position model's distances")
        map_peak, position_peak = self.peaks(grid_map, position)
        map_mean, map_std, position_mean, position_std = self.calibration.to(map_peak.dtype)
        return 0.5 * ((map_peak - map_mean) / map_std + (position_peak - position_mean) / position_std)
