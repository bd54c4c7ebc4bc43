"""The guided filter that refines the pixel anomaly map (``networks/blocks/anomaly_map.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ura_monai.metrics import functional as M
from ura_monai.networks.blocks.anomaly_map import AnomalyMapGenerator, box_filter, guided_filter
from ura_monai.networks.nets import URANet


def _grey_guided_filter(guide: torch.Tensor, source: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """He et al.'s grey-guide algorithm written out (their Algorithm 1), with plain average pooling."""

    def mean(x):
        return F.avg_pool2d(F.pad(x, (radius,) * 4, mode="reflect"), 2 * radius + 1, stride=1)

    mean_i, mean_p = mean(guide), mean(source)
    a = (mean(guide * source) - mean_i * mean_p) / (mean(guide * guide) - mean_i * mean_i + eps)
    b = mean_p - a * mean_i
    return mean(a) * guide + mean(b)


def test_box_filter_is_the_window_mean():
    x = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    expected = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), 5, stride=1)
    torch.testing.assert_close(box_filter(x, 2), expected)


def test_a_grey_guide_is_the_grey_algorithm_with_a_third_of_eps():
    generator = torch.Generator().manual_seed(1)
    guide, source = torch.rand(2, 1, 40, 40, generator=generator), torch.rand(2, 1, 40, 40, generator=generator)
    expected = _grey_guided_filter(guide, source, 4, 1e-3 / 3)
    torch.testing.assert_close(guided_filter(guide, source, 4, 1e-3), expected, atol=2e-4, rtol=1e-3)
    # the same image as three equal channels: the same result
    torch.testing.assert_close(
        guided_filter(guide.expand(-1, 3, -1, -1), source, 4, 1e-3), expected, atol=2e-4, rtol=1e-3
    )


def test_colour_guide_matches_a_per_pixel_linear_solve():
    generator = torch.Generator().manual_seed(2)
    guide, source = torch.rand(1, 3, 24, 24, generator=generator), torch.rand(1, 1, 24, 24, generator=generator)
    r, eps = 3, 1e-2
    mean_i, mean_p = box_filter(guide, r), box_filter(source, r)
    cov_ip = box_filter(guide * source, r) - mean_i * mean_p
    outer = torch.stack([guide[:, i] * guide[:, j] for i in range(3) for j in range(3)], 1)
    sigma = box_filter(outer, r) - torch.stack([mean_i[:, i] * mean_i[:, j] for i in range(3) for j in range(3)], 1)
    sigma = sigma.permute(0, 2, 3, 1).reshape(1, 24, 24, 3, 3) + eps * torch.eye(3)
    a = torch.linalg.solve(sigma, cov_ip.permute(0, 2, 3, 1).unsqueeze(-1)).squeeze(-1).permute(0, 3, 1, 2)
    b = mean_p - (a * mean_i).sum(1, keepdim=True)
    expected = (box_filter(a, r) * guide).sum(1, keepdim=True) + box_filter(b, r)
    torch.testing.assert_close(guided_filter(guide, source, r, eps), expected, atol=1e-4, rtol=1e-3)


def test_a_flat_guide_gives_a_double_box_smoothing_and_errors_are_named():
    source = torch.rand(1, 1, 30, 30, generator=torch.Generator().manual_seed(3))
    flat = torch.full((1, 3, 30, 30), 0.4)
    torch.testing.assert_close(guided_filter(flat, source, 3, 1e-3), box_filter(box_filter(source, 3), 3))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        guided_filter(torch.rand(1, 2, 30, 30), source, 3, 1e-3)
    with pytest.raises(ValueError, match="does not match"):
        AnomalyMapGenerator(0.0, 8)(torch.rand(1, 1, 4, 4), (32, 32), guide=torch.rand(1, 3, 30, 30))


def test_the_refined_map_follows_the_defect_edge_in_the_image():
    """A dark square defect on a textured grey image, and a coarse map (one value per 8 x 8 cell) that marks the
    cells it touches: the guided map puts its edge on the defect's, the Gaussian blurs it over the cell grid."""
    generator = torch.Generator().manual_seed(4)
    image = 0.6 + 0.02 * torch.randn(1, 1, 64, 64, generator=generator)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 21:37, 19:35] = 1.0  # not aligned with the 8-pixel cells
    image = torch.where(mask > 0, torch.full_like(image, 0.2), image).clamp(0, 1)
    grid = F.adaptive_avg_pool2d(mask, 8)  # the fraction of each cell the defect covers
    guided = AnomalyMapGenerator(sigma=0.0, guided_radius=8)(grid, (64, 64), guide=image)
    gaussian = AnomalyMapGenerator(sigma=4.0)(grid, (64, 64))
    # the guided map separates the defect's pixels from the others by a margin; the Gaussian's do not separate
    assert float(guided[mask > 0].min()) > float(guided[mask == 0].max()) + 0.2
    assert float(gaussian[mask > 0].min()) < float(gaussian[mask == 0].max())
    assert M.pixel_ap(guided, mask) == pytest.approx(1.0) and M.pixel_ap(gaussian, mask) < 0.99


def test_the_fast_filter_is_close_to_the_exact_one_on_a_map_upsampled_from_the_grid():
    """The map has no detail finer than its stride-8 grid, so fitting the coefficients on 4 x 4 blocks (the
    default) changes it little; sizes that the blocks do not divide are averaged by area."""
    generator = torch.Generator().manual_seed(5)
    image = F.interpolate(torch.rand(2, 3, 16, 16, generator=generator), size=(64, 64), mode="bilinear")
    grid = torch.rand(2, 1, 8, 8, generator=generator)
    source = F.interpolate(grid, size=(64, 64), mode="bilinear", align_corners=False)
    exact, fast = guided_filter(image, source, 8, 1e-3), guided_filter(image, source, 8, 1e-3, subsample=4)
    difference = (fast - exact).abs()
    assert float(difference.mean()) < 0.03 * float(source.max() - source.min())
    # closer to the exact filter than the filter of a flat guide (a double box smoothing) is
    assert float(difference.mean()) < 0.6 * float((box_filter(box_filter(source, 8), 8) - exact).abs().mean())
    assert not torch.allclose(fast, exact)  # it is an approximation, computed another way
    odd = AnomalyMapGenerator(0.0, 8)(grid, (62, 66), guide=torch.rand(2, 1, 62, 66, generator=generator))
    assert odd.shape == (2, 1, 62, 66) and torch.isfinite(odd).all()


def test_the_gaussian_is_the_default_only_without_the_guided_filter():
    assert AnomalyMapGenerator(None, guided_radius=8).sigma == 0.0
    assert AnomalyMapGenerator(None, guided_radius=0).sigma == 4.0  # the map of versions before the guided filter
    assert AnomalyMapGenerator(2.0, guided_radius=8).sigma == 2.0  # an explicit sigma is kept
    assert URANet(image_size=32, pretrained=False).config["sigma"] == 0.0  # the config stores the number used
    assert URANet(image_size=32, pretrained=False, guided_radius=0).config["sigma"] == 4.0
