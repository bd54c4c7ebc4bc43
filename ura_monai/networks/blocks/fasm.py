"""FASM: feature-level artificial anomaly synthesis (URA-Net, Luo et al. 2026).

Anomalies are made in feature space, not in pixels: a region mask is drawn at the feature grid and the
features inside it are replaced. The mask is the perception module's target and the clean features are
the restoration target. Synthesis is redrawn at every training step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeatureAnomalySynthesis", "sample_region_masks"]

MASK_TYPES = ("blob", "box", "line")
CORRUPTIONS = ("noise", "shuffle", "mix")


def _blob_mask(h: int, w: int, area: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Perlin-like blobs: low-frequency noise upsampled and thresholded at the quantile giving ``area``."""
    cells = int(torch.randint(2, 6, (1,), generator=generator).item())
    noise = torch.rand(1, 1, cells, cells, generator=generator).to(device)
    smooth = F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)[0, 0]
    threshold = torch.quantile(smooth.flatten(), 1.0 - area)
    return (smooth > threshold).float()


def _box_mask(h: int, w: int, area: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    aspect = math.exp((torch.rand(1, generator=generator).item() - 0.5) * 1.4)
    bh = max(1, min(h, round(math.sqrt(area * h * w * aspect))))
    bw = max(1, min(w, round(area * h * w / bh)))
    top = int(torch.randint(0, h - bh + 1, (1,), generator=generator).item())
    left = int(torch.randint(0, w - bw + 1, (1,), generator=generator).item())
    mask = torch.zeros(h, w, device=device)
    mask[top : top + bh, left : left + bw] = 1.0
    return mask


def _line_mask(h: int, w: int, area: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A thin scratch: a segment one or two cells wide, long enough to cover about ``area`` of the grid."""
    width = 1 + int(torch.rand(1, generator=generator).item() < 0.5)
    length = min(max(3.0, area * h * w / width), math.hypot(h, w))
    angle = torch.rand(1, generator=generator).item() * math.pi
    direction = torch.tensor([math.sin(angle), math.cos(angle)])
    center = torch.rand(2, generator=generator) * torch.tensor([h - 1, w - 1])
    t = torch.linspace(-0.5, 0.5, int(length * 2) + 2).unsqueeze(1) * length
    pts = (center + t * direction).round().long()
    inside = (pts[:, 0] >= 0) & (pts[:, 0] < h) & (pts[:, 1] >= 0) & (pts[:, 1] < w)
    pts = pts[inside]
    mask = torch.zeros(h, w)
    for dy in range(width):
        for dx in range(width):
            mask[(pts[:, 0] + dy).clamp(0, h - 1), (pts[:, 1] + dx).clamp(0, w - 1)] = 1.0
    return mask.to(device)


_MASK_FUNCTIONS = {"blob": _blob_mask, "box": _box_mask, "line": _line_mask}


def sample_region_masks(
    batch: int,
    size: tuple[int, int],
    mask_types: Sequence[str] = MASK_TYPES,
    area_range: Sequence[float] = (0.01, 0.2),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw one binary region mask per sample, of a random type, covering a random fraction of the grid.

    Returns:
        (batch, 1, h, w) float tensor of 0/1; every mask has at least one cell set.
    """
    h, w = size
    masks = []
    for _ in range(batch):
        kind = mask_types[int(torch.randint(0, len(mask_types), (1,), generator=generator).item())]
        area = area_range[0] + (area_range[1] - area_range[0]) * torch.rand(1, generator=generator).item()
        mask = _MASK_FUNCTIONS[kind](h, w, area, generator, torch.device(device))
        if mask.sum() == 0:  # degenerate draw (tiny area): keep at least one cell
            mask[h // 2, w // 2] = 1.0
        masks.append(mask)
    return torch.stack(masks).unsqueeze(1)


class FeatureAnomalySynthesis(nn.Module):
    """Corrupt regions of clean feature maps to make anomalous training samples.

    Inside each region the features are replaced by one of:
    ``noise``: the feature plus Gaussian noise whose norm is ``noise_scale`` times the feature's own norm
    (so every level and position is disturbed in proportion to its magnitude);
    ``shuffle``: features of random positions of random images of the batch (locally plausible features in
    the wrong place, which only context can reveal);
    ``mix``: a random blend of the two.

    Args:
        mask_types: region shapes to draw from (``blob``, ``box``, ``line``).
        corruptions: replacement kinds to draw from (``noise``, ``shuffle``, ``mix``).
        area_range: fraction of the feature grid a region covers, drawn uniformly.
        noise_scale: range of the noise-to-feature norm ratio, drawn uniformly per sample.
        probability: chance that a sample is corrupted; the others stay clean with an empty mask, so the
            perception module also sees wholly normal maps.
    """

    def __init__(
        self,
        mask_types: Sequence[str] = MASK_TYPES,
        corruptions: Sequence[str] = CORRUPTIONS,
        area_range: Sequence[float] = (0.01, 0.2),
        noise_scale: Sequence[float] = (0.3, 1.5),
        probability: float = 0.8,
    ) -> None:
        super().__init__()
        bad = [m for m in mask_types if m not in MASK_TYPES] + [c for c in corruptions if c not in CORRUPTIONS]
        if bad or not mask_types or not corruptions:
            raise ValueError(
                f"unknown or empty FASM options {bad}; masks from {MASK_TYPES}, corruptions from {CORRUPTIONS}"
            )
        self.mask_types = tuple(mask_types)
        self.corruptions = tuple(corruptions)
        self.area_range = tuple(area_range)
        self.noise_scale = tuple(noise_scale)
        self.probability = probability

    def forward(
        self, features: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            features: clean features (B, C, h, w).
            generator: optional CPU generator for repeatable draws.

        Returns:
            ``(corrupted, mask)``: corrupted features (B, C, h, w) and the region mask (B, 1, h, w).
        """
        b, c, h, w = features.shape
        device = features.device
        masks = sample_region_masks(b, (h, w), self.mask_types, self.area_range, generator, device)
        keep = (torch.rand(b, generator=generator) < self.probability).float().to(device).view(b, 1, 1, 1)
        masks = masks * keep

        # noise with a norm proportional to each position's feature norm
        noise = torch.randn(features.shape, generator=generator).to(device, features.dtype)
        noise = noise / noise.norm(dim=1, keepdim=True).clamp_min(1e-6)
        lo, hi = self.noise_scale
        ratio = (lo + (hi - lo) * torch.rand(b, 1, 1, 1, generator=generator)).to(device, features.dtype)
        noisy = features + noise * features.norm(dim=1, keepdim=True) * ratio

        # features taken from random positions of random images of the batch
        flat = features.permute(0, 2, 3, 1).reshape(-1, c)
        idx = torch.randint(0, flat.shape[0], (b * h * w,), generator=generator).to(device)
        shuffled = flat[idx].view(b, h, w, c).permute(0, 3, 1, 2)

        kinds = torch.randint(0, len(self.corruptions), (b,), generator=generator).tolist()
        lam = torch.rand(b, generator=generator).tolist()
        replacement = torch.empty_like(features)
        for i, k in enumerate(kinds):
            kind = self.corruptions[k]
            if kind == "noise":
                replacement[i] = noisy[i]
            elif kind == "shuffle":
                replacement[i] = shuffled[i]
            else:
                replacement[i] = lam[i] * noisy[i] + (1.0 - lam[i]) * shuffled[i]
        corrupted = features * (1.0 - masks) + replacement * masks
        return corrupted, masks
