"""A small synthetic MVTec-layout dataset built offline from scikit-image's bundled textures.

Normal images are random crops / flips of one tinted texture (``skimage.data.brick``) so that
they look alike; defect images add one synthetic defect each, with its exact binary mask:

- ``blob``: a saturated coloured ellipse;
- ``scratch``: a thin bright or dark line segment;
- ``patch``: an ellipse of another texture (``gravel`` or ``grass``) pasted in.

Only images that ship inside scikit-image are used (no pooch download).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["DEMO_DEFECT_TYPES", "make_demo_dataset"]

DEMO_DEFECT_TYPES: tuple[str, ...] = ("blob", "scratch", "patch")

# warm tint turning the grey brick texture into an RGB image (exercises the 3-channel path)
_BASE_TINT = np.array([1.0, 0.78, 0.62], dtype=np.float32)


def _textures() -> tuple[np.ndarray, list[np.ndarray]]:
    """The base texture and the foreign textures, as float32 grey arrays in [0, 1]."""
    from skimage import data as skdata

    base = skdata.brick().astype(np.float32) / 255.0
    foreign = [skdata.gravel().astype(np.float32) / 255.0, skdata.grass().astype(np.float32) / 255.0]
    return base, foreign


def _random_crop(texture: np.ndarray, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of ``2 * image_size`` pixels, flipped at random and 2x2-mean downsampled."""
    crop = min(2 * image_size, *texture.shape[:2])
    top = int(rng.integers(0, texture.shape[0] - crop + 1))
    left = int(rng.integers(0, texture.shape[1] - crop + 1))
    patch = texture[top : top + crop, left : left + crop]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if rng.random() < 0.5:
        patch = patch[::-1, :]
    # resample to image_size by block means (anti-aliased, dependency-free and exact for crop = 2 * size)
    rows = np.linspace(0, crop, image_size + 1).astype(int)
    cols = np.linspace(0, crop, image_size + 1).astype(int)
    out = np.add.reduceat(np.add.reduceat(patch, rows[:-1], axis=0), cols[:-1], axis=1)
    out /= np.outer(np.diff(rows), np.diff(cols))
    return out.astype(np.float32)


def _normal_image(base: np.ndarray, image_size: int, rng: np.random.Generator) -> np.ndarray:
    grey = _random_crop(base, image_size, rng)
    gain = 1.0 + 0.05 * rng.standard_normal()  # slight exposure variation between "photos"
    rgb = np.clip(grey[..., None] * _BASE_TINT * gain, 0.0, 1.0)
    return rgb.astype(np.float32)


def _ellipse_mask(image_size: int, rng: np.random.Generator, min_frac: float, max_frac: float) -> np.ndarray:
    radius_lo, radius_hi = max(2.0, min_frac * image_size), max(3.0, max_frac * image_size)
    ry, rx = rng.uniform(radius_lo, radius_hi, size=2)
    margin = int(np.ceil(max(ry, rx))) + 1
    cy, cx = rng.integers(margin, max(margin + 1, image_size - margin), size=2)
    angle = rng.uniform(0.0, np.pi)
    yy, xx = np.mgrid[:image_size, :image_size].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def _segment_mask(image_size: int, rng: np.random.Generator) -> np.ndarray:
    length = rng.uniform(0.3, 0.6) * image_size
    half_width = max(1.0, rng.uniform(0.008, 0.016) * image_size)
    angle = rng.uniform(0.0, np.pi)
    direction = np.array([np.sin(angle), np.cos(angle)])
    centre = rng.uniform(0.3, 0.7, size=2) * image_size
    start, end = centre - direction * length / 2, centre + direction * length / 2
    yy, xx = np.mgrid[:image_size, :image_size].astype(np.float64)
    points = np.stack([yy, xx], axis=-1)
    # distance of every pixel to the segment [start, end]
    t = np.clip(((points - start) @ (end - start)) / float((end - start) @ (end - start)), 0.0, 1.0)
    nearest = start + t[..., None] * (end - start)
    return np.linalg.norm(points - nearest, axis=-1) <= half_width


def _add_defect(
    image: np.ndarray, defect_type: str, foreign: list[np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Image with one defect of ``defect_type`` and its binary mask (True where pixels were changed)."""
    size = image.shape[0]
    out = image.copy()
    if defect_type == "blob":
        mask = _ellipse_mask(size, rng, 0.05, 0.12)
        colour = np.zeros(3, dtype=np.float32)
        colour[rng.integers(0, 3)] = 1.0  # a saturated primary: far from the brown texture
        colour[rng.integers(0, 3)] += 0.4
        out[mask] = 0.15 * out[mask] + 0.85 * np.clip(colour, 0.0, 1.0)
    elif defect_type == "scratch":
        mask = _segment_mask(size, rng)
        value = 0.97 if rng.random() < 0.5 else 0.03
        out[mask] = value
    elif defect_type == "patch":
        mask = _ellipse_mask(size, rng, 0.08, 0.16)
        texture = foreign[int(rng.integers(0, len(foreign)))]
        grey = _random_crop(texture, size, rng)
        # a cool tint, so the foreign texture also differs in colour from the warm brick
        tint = np.array([rng.uniform(0.3, 0.6), rng.uniform(0.5, 0.9), rng.uniform(1.1, 1.4)], dtype=np.float32)
        out[mask] = np.clip(grey[mask][:, None] * tint + 0.1, 0.0, 1.0)
    else:
        raise ValueError(f"unknown demo defect type {defect_type!r}; expected one of {DEMO_DEFECT_TYPES}")
    return out, mask


def _save_rgb(array: np.ndarray, path: Path) -> None:
    Image.fromarray(np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)).save(path)  # (H, W, 3) uint8 -> RGB


def make_demo_dataset(
    root: str | Path,
    category: str = "demo",
    n_train: int = 24,
    n_test_good: int = 8,
    n_test_defect: int = 12,
    image_size: int = 128,
    seed: int = 0,
    defect_types: tuple[str, ...] = DEMO_DEFECT_TYPES,
) -> Path:
    """Write a small synthetic MVTec-layout dataset (RGB PNG images, binary PNG masks).

    Layout::

        <root>/<category>/train/good/000.png ...
        <root>/<category>/test/good/000.png ...
        <root>/<category>/test/<defect>/000.png ...          (defect in ``defect_types``)
        <root>/<category>/ground_truth/<defect>/000_mask.png  (0 / 255)

    Defect images are spread round-robin over ``defect_types``. The output depends only on the
    arguments: the same seed writes identical files. Existing files of the same names are overwritten.

    Args:
        root: folder in which the category folder is created.
        category: name of the category folder.
        n_train: number of normal training images.
        n_test_good: number of normal test images.
        n_test_defect: number of defective test images.
        image_size: side of the square images, at least 16.
        seed: seed of the random generator.
        defect_types: subset of ``("blob", "scratch", "patch")``.

    Returns:
        path of the category folder (pass it to ``mvtec_datalist(path, None, split)``).
    """
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    if n_train < 1:
        raise ValueError(f"n_train must be at least 1, got {n_train}")
    unknown = set(defect_types) - set(DEMO_DEFECT_TYPES)
    if unknown or not defect_types:
        raise ValueError(f"defect_types must be a non-empty subset of {DEMO_DEFECT_TYPES}, got {defect_types}")

    rng = np.random.default_rng(seed)
    base, foreign = _textures()
    category_dir = Path(root).expanduser() / category

    train_dir = category_dir / "train" / "good"
    train_dir.mkdir(parents=True, exist_ok=True)
    for index in range(n_train):
        _save_rgb(_normal_image(base, image_size, rng), train_dir / f"{index:03d}.png")

    good_dir = category_dir / "test" / "good"
    good_dir.mkdir(parents=True, exist_ok=True)
    for index in range(n_test_good):
        _save_rgb(_normal_image(base, image_size, rng), good_dir / f"{index:03d}.png")

    counters = dict.fromkeys(defect_types, 0)
    for index in range(n_test_defect):
        defect_type = defect_types[index % len(defect_types)]
        image, mask = _add_defect(_normal_image(base, image_size, rng), defect_type, foreign, rng)
        number = counters[defect_type]
        counters[defect_type] += 1
        image_dir = category_dir / "test" / defect_type
        mask_dir = category_dir / "ground_truth" / defect_type
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        _save_rgb(image, image_dir / f"{number:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_dir / f"{number:03d}_mask.png")
    return category_dir
