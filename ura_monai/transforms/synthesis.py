"""Image-level synthetic defects (FASM's image branch): Perlin-noise regions and scratches filled with another
image's texture, a flat colour, structured noise or a brightness change, blended in (DRAEM-style, Zavrtanik et
al., ICCV 2021). The result is passed once through the frozen backbone, so the defects have real feature-space
boundaries; the mask says where they are.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.transforms import MapTransform, RandomizableTransform

__all__ = ["perlin_noise", "RandSyntheticDefect", "RandSyntheticDefectd"]


def perlin_noise(shape: tuple[int, int], cells: tuple[int, int], rng: np.random.RandomState) -> np.ndarray:
    """2D gradient (Perlin) noise of ``shape`` with ``cells`` lattice cells per axis, values about in [-1, 1]."""
    (h, w), (cy, cx) = shape, cells
    angles = 2 * math.pi * rng.rand(cy + 1, cx + 1)
    grad = np.stack([np.cos(angles), np.sin(angles)], -1)
    yy, xx = np.meshgrid(np.linspace(0, cy, h, endpoint=False), np.linspace(0, cx, w, endpoint=False), indexing="ij")
    y0, x0 = np.minimum(yy.astype(int), cy - 1), np.minimum(xx.astype(int), cx - 1)
    fy, fx = yy - y0, xx - x0

    def corner(dy: int, dx: int) -> np.ndarray:
        g = grad[y0 + dy, x0 + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    u, v = fade(fy), fade(fx)
    top = (1 - v) * corner(0, 0) + v * corner(0, 1)
    bottom = (1 - v) * corner(1, 0) + v * corner(1, 1)
    return (1 - u) * top + u * bottom


class RandSyntheticDefect(RandomizableTransform):
    """Paint one synthetic defect into a (C, H, W) image in [0, 1]; returns ``(image, mask)`` with a (1, H, W) mask.

    Args:
        area_range: fraction of the image a Perlin region covers, drawn uniformly.
        scratch_probability: chance of thin random-walk scratches instead of a Perlin region.
        max_blend: the defect is blended as ``(1 - b) * source + b * image`` with ``b`` up to this (faint defects).
        prob: chance of painting a defect at all (otherwise the image is returned with an empty mask).
    """

    def __init__(
        self,
        area_range: tuple[float, float] = (0.005, 0.15),
        scratch_probability: float = 0.2,
        max_blend: float = 0.5,
        prob: float = 1.0,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        self.area_range, self.scratch_probability, self.max_blend = area_range, scratch_probability, max_blend

    def _perlin_mask(self, h: int, w: int) -> np.ndarray:
        for _ in range(20):
            cells = (2 ** self.R.randint(1, 5), 2 ** self.R.randint(1, 5))
            noise = perlin_noise((h, w), cells, self.R)
            area = self.R.uniform(*self.area_range)
            mask = noise > np.quantile(noise, 1.0 - area)
            if mask.sum() > 16:
                break
        return mask

    def _scratch_mask(self, h: int, w: int) -> np.ndarray:
        mask = np.zeros((h, w), dtype=bool)
        for _ in range(self.R.randint(1, 4)):
            y, x, angle = self.R.rand() * h, self.R.rand() * w, self.R.rand() * 2 * math.pi
            half = self.R.randint(1, 3)
            for _ in range(int(h * self.R.uniform(0.1, 0.5))):
                angle += 0.1 * self.R.randn()
                y, x = y + math.sin(angle), x + math.cos(angle)
                yi, xi = int(y), int(x)
                mask[max(0, yi - half) : yi + half + 1, max(0, xi - half) : xi + half + 1] = True
        return mask

    def _source(self, image: np.ndarray, others: np.ndarray | None) -> np.ndarray:
        c, h, w = image.shape
        kind = self.R.rand()
        if kind < 0.4 and others is not None and len(others):
            source = np.roll(others[self.R.randint(len(others))], (self.R.randint(h), self.R.randint(w)), axis=(1, 2))
            return np.clip(source[:, :, ::-1] if self.R.rand() < 0.5 else source, 0, 1) * self.R.uniform(0.5, 1.5)
        if kind < 0.7:  # a flat colour or grey level with a little noise
            return self.R.rand(c, 1, 1) + 0.05 * self.R.randn(c, h, w)
        if kind < 0.85:  # structured noise texture
            return 0.5 + np.stack([perlin_noise((h, w), (16, 16), self.R) for _ in range(c)]) * self.R.uniform(0.5, 1.5)
        return image * self.R.uniform(0.2, 1.8)  # the image itself darkened or brightened

    def __call__(
        self, image: torch.Tensor | np.ndarray, others: torch.Tensor | np.ndarray | None = None, randomize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            image: (C, H, W) in [0, 1].
            others: optional (K, C, H, W) pool of normal images whose texture may be pasted.
        """
        if randomize:
            self.randomize(None)
        array = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float32)
        c, h, w = array.shape
        if not self._do_transform:
            return torch.as_tensor(array), torch.zeros(1, h, w)
        pool = (
            None
            if others is None
            else np.asarray(others.detach().cpu() if isinstance(others, torch.Tensor) else others, dtype=np.float32)
        )
        mask = self._scratch_mask(h, w) if self.R.rand() < self.scratch_probability else self._perlin_mask(h, w)
        blend = self.R.uniform(0.0, self.max_blend)
        source = np.clip(self._source(array, pool), 0.0, 1.0)
        painted = np.where(mask[None], (1 - blend) * source + blend * array, array)
        return torch.as_tensor(np.clip(painted, 0, 1), dtype=torch.float32), torch.as_tensor(
            mask[None], dtype=torch.float32
        )


class RandSyntheticDefectd(RandomizableTransform, MapTransform):
    """Dictionary wrapper of :class:`RandSyntheticDefect`: paints ``keys`` images and writes the mask to ``mask_key``
    and label 1 to ``label_key`` (0 when no defect was painted)."""

    def __init__(self, keys: str = "image", mask_key: str = "mask", label_key: str = "label", **kwargs) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, 1.0)
        self.synth = RandSyntheticDefect(**kwargs)
        self.mask_key, self.label_key = mask_key, label_key

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandSyntheticDefectd:
        super().set_random_state(seed, state)
        self.synth.set_random_state(seed, state)
        return self

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key], d[self.mask_key] = self.synth(d[key])
            d[self.label_key] = int(d[self.mask_key].sum() > 0)
        return d
