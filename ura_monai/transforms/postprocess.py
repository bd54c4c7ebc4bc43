"""Post-processing transforms for anomaly maps and scores, in MONAI's array / dictionary style.

They act on what :class:`ura_monai.networks.nets.URANet` returns per image (``anomaly_map`` (B, 1, H, W)
unbounded >= 0, ``uncertainty_map`` (B, 1, H, W) in [0, 1], ``pred_score`` (B,)) or on one item of it
((1, H, W) maps, scalar scores), and can be named with ``_target_`` in a MONAI bundle config::

    postprocessing:
      _target_: Compose
      transforms:
        - {_target_: ura_monai.transforms.NormalizeAnomalyScored, keys: pred_score,
           threshold: "@image_threshold", min_value: "@image_min", max_value: "@image_max"}
        - {_target_: ura_monai.transforms.ThresholdAnomalyMapd, keys: anomaly_map, threshold: 0.5}

Every array transform accepts torch tensors (MetaTensor included, any device) and numpy arrays and returns
the same type, except :class:`RenderHeatmapOverlay`, whose output is always a numpy RGB image for writers.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

from ura_monai.networks.blocks.anomaly_map import AnomalyMapGenerator

__all__ = [
    "NormalizeAnomalyScore",
    "NormalizeAnomalyScored",
    "RenderHeatmapOverlay",
    "RenderHeatmapOverlayd",
    "SmoothAnomalyMap",
    "SmoothAnomalyMapd",
    "ThresholdAnomalyMap",
    "ThresholdAnomalyMapd",
    "image_to_rgb",
    "single_channel",
]

Array = np.ndarray | torch.Tensor


def _float_dtype(data: Any) -> Any:
    """The dtype a float result should have: the input's own when it is floating, else float32."""
    if isinstance(data, torch.Tensor):
        return data.dtype if data.is_floating_point() else torch.float32
    data = np.asarray(data)
    return data.dtype if np.issubdtype(data.dtype, np.floating) else np.float32


def _to_numpy(data: Any) -> np.ndarray:
    """Numpy view/copy of a tensor (any device, bfloat16 included) or array-like."""
    if isinstance(data, torch.Tensor):
        data = data.detach()
        if data.dtype == torch.bfloat16:  # numpy has no bfloat16
            data = data.float()
        return data.cpu().numpy()
    return np.asarray(data)


# --------------------------------------------------------------------------- smoothing


class SmoothAnomalyMap(Transform):
    """Gaussian smoothing of an anomaly map, with reflected borders.

    This is the smoothing step of :class:`ura_monai.networks.blocks.anomaly_map.AnomalyMapGenerator` (the same
    kernel, truncation and padding), called with the map's own size so that it does not resample. Use it to
    smooth maps produced without smoothing (``sigma=0`` in the network) or to re-smooth with another sigma.

    Args:
        sigma: Gaussian standard deviation in pixels; 0 returns a copy of the input.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, sigma: float = 4.0) -> None:
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.sigma = float(sigma)
        # one generator (and kernel) per transform, not per call
        self.generator = AnomalyMapGenerator(self.sigma)

    def __call__(self, img: Array) -> Array:
        """
        Args:
            img: a (C, H, W) or (B, C, H, W) map; every channel is smoothed on its own.

        Returns:
            the smoothed map, same shape and container type; float dtype (the input's, or float32 for integers).
        """
        if img.ndim not in (3, 4):
            raise ValueError(f"expected a (C, H, W) or (B, C, H, W) map, got shape {tuple(img.shape)}")
        dtype = _float_dtype(img)
        x = convert_to_tensor(img, track_meta=False)
        x = x.float() if not x.is_floating_point() else x
        batched = x.unsqueeze(0) if img.ndim == 3 else x
        size = (int(batched.shape[-2]), int(batched.shape[-1]))
        radius = (self.generator.kernel.numel() - 1) // 2
        if self.sigma > 0 and min(size) <= radius:
            # reflect padding needs the map to be larger than the kernel radius
            raise ValueError(
                f"map of size {size} is too small for sigma={self.sigma} (kernel radius {radius}, reflect borders)"
            )
        out = self.generator(batched, size)
        out = out[0] if img.ndim == 3 else out
        if out is x:  # sigma == 0 and a same-size interpolate could hand back the input itself
            out = out.clone()
        return convert_to_dst_type(out, img, dtype=dtype)[0]


class SmoothAnomalyMapd(MapTransform):
    """Dictionary wrapper of :class:`SmoothAnomalyMap`.

    Args:
        keys: keys of the maps to smooth.
        sigma: Gaussian standard deviation in pixels.
        allow_missing_keys: don't raise when a key is missing.
    """

    backend = SmoothAnomalyMap.backend

    def __init__(self, keys: KeysCollection, sigma: float = 4.0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.smoother = SmoothAnomalyMap(sigma)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.smoother(d[key])
        return d


# --------------------------------------------------------------------------- normalization


class NormalizeAnomalyScore(Transform):
    """Min-max normalization of anomaly scores or maps to [0, 1] around a threshold, as anomalib does::

        clip((x - threshold) / (max_value - min_value) + 0.5, 0, 1)

    The decision threshold lands on 0.5 whatever the model's scale, so normalized scores of different models
    (and image scores vs. maps, with their own statistics) read the same way. The statistics (typically from
    the validation set) are fixed per instance: use one instance for image scores and another for maps.

    Args:
        threshold: decision threshold in raw units; mapped to 0.5.
        min_value: smallest raw value seen on the statistics set.
        max_value: largest raw value seen on the statistics set (> ``min_value``).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, threshold: float, min_value: float, max_value: float) -> None:
        # float() also accepts 0-d tensors / numpy scalars read from a checkpoint
        self.threshold, self.min_value, self.max_value = float(threshold), float(min_value), float(max_value)
        if not self.max_value > self.min_value:
            raise ValueError(
                f"max_value must be greater than min_value, got min={self.min_value}, max={self.max_value}"
            )

    def __call__(self, img: Array | float) -> Array | float:
        """
        Args:
            img: a scalar score, a score vector or a map of any shape.

        Returns:
            normalized values in [0, 1]: a Python float for a Python scalar, else the input's container type
            with a float dtype.
        """
        if isinstance(img, (int, float)) and not isinstance(img, bool):
            value = (float(img) - self.threshold) / (self.max_value - self.min_value) + 0.5
            return min(max(value, 0.0), 1.0)
        if isinstance(img, torch.Tensor):
            t = img if img.is_floating_point() else img.float()
            return ((t - self.threshold) / (self.max_value - self.min_value) + 0.5).clamp(0.0, 1.0)
        x = np.asarray(img)
        x = x.astype(_float_dtype(x), copy=False)
        return np.clip((x - self.threshold) / (self.max_value - self.min_value) + 0.5, 0.0, 1.0).astype(
            x.dtype, copy=False
        )


class NormalizeAnomalyScored(MapTransform):
    """Dictionary wrapper of :class:`NormalizeAnomalyScore` (one set of statistics for all ``keys``).

    Args:
        keys: keys of the scores or maps to normalize.
        threshold: decision threshold in raw units; mapped to 0.5.
        min_value: smallest raw value on the statistics set.
        max_value: largest raw value on the statistics set.
        allow_missing_keys: don't raise when a key is missing.
    """

    backend = NormalizeAnomalyScore.backend

    def __init__(
        self,
        keys: KeysCollection,
        threshold: float,
        min_value: float,
        max_value: float,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalizer = NormalizeAnomalyScore(threshold, min_value, max_value)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalizer(d[key])
        return d


# --------------------------------------------------------------------------- thresholding


class ThresholdAnomalyMap(Transform):
    """Binary mask from an anomaly map: 1 where ``map >= threshold``, else 0.

    The mask is **uint8 0/1** by default (compact to store, direct input of ``skimage`` and of the metrics);
    pass ``dtype=torch.float32`` / ``np.float32`` for float 0/1 (e.g. to multiply with images).

    Args:
        threshold: pixel threshold in the map's units (0.5 after :class:`NormalizeAnomalyScore`).
        dtype: output dtype, numpy or torch (converted to the container's equivalent).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, threshold: float, dtype: Any = np.uint8) -> None:
        self.threshold = float(threshold)
        self.dtype = dtype

    def __call__(self, img: Array) -> Array:
        """
        Args:
            img: a map (or scores) of any shape.

        Returns:
            the 0/1 mask, same shape and container type as ``img``, dtype ``self.dtype``.
        """
        mask = img >= self.threshold if isinstance(img, torch.Tensor) else np.asarray(img) >= self.threshold
        if isinstance(mask, torch.Tensor):  # drop MetaTensor meta ops; convert_to_dst_type copies meta back
            mask = mask.as_tensor() if hasattr(mask, "as_tensor") else mask
        return convert_to_dst_type(mask, img, dtype=self.dtype)[0]


class ThresholdAnomalyMapd(MapTransform):
    """Dictionary wrapper of :class:`ThresholdAnomalyMap`; the mask replaces the map unless ``output_keys``
    are given (one per key), e.g. ``keys="anomaly_map", output_keys="pred_mask"``.

    Args:
        keys: keys of the maps to threshold.
        threshold: pixel threshold.
        dtype: output dtype (uint8 by default).
        output_keys: where to store the masks; ``None`` overwrites the maps.
        allow_missing_keys: don't raise when a key is missing.
    """

    backend = ThresholdAnomalyMap.backend

    def __init__(
        self,
        keys: KeysCollection,
        threshold: float,
        dtype: Any = np.uint8,
        output_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.thresholder = ThresholdAnomalyMap(threshold, dtype)
        if output_keys is None:
            self.output_keys: tuple[Hashable, ...] = tuple(self.keys)
        else:
            self.output_keys = (output_keys,) if isinstance(output_keys, (str, int)) else tuple(output_keys)  # type: ignore[arg-type]
        if len(self.output_keys) != len(self.keys):
            raise ValueError(f"output_keys must match keys one to one, got {self.output_keys} for {self.keys}")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = self.thresholder(d[key])
        return d


# --------------------------------------------------------------------------- overlay


def image_to_rgb(image: Any) -> np.ndarray:
    """(C, H, W) with C in {1, 3}, or (H, W), in [0, 1] -> float64 (H, W, 3) in [0, 1]."""
    x = _to_numpy(image).astype(np.float64)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected an image (C, H, W) with 1 or 3 channels, or (H, W), got shape {x.shape}")
    x = np.clip(x, 0.0, 1.0)
    return np.repeat(x, 3, axis=0).transpose(1, 2, 0) if x.shape[0] == 1 else x.transpose(1, 2, 0)


def single_channel(data: Any, what: str) -> np.ndarray:
    """(1, H, W) or (H, W) -> (H, W) numpy."""
    x = _to_numpy(data)
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 2:
        raise ValueError(f"expected the {what} as (1, H, W) or (H, W), got shape {x.shape}")
    return x


class RenderHeatmapOverlay(Transform):
    """Blend a colour-mapped anomaly map over its image, for people to look at (not for metrics).

    ``rgb = (1 - alpha) * image + alpha * colormap(normalized map)``, with the map normalized to [0, 1] by
    ``vmin``/``vmax`` (fixed values make images comparable) or by its own min/max when they are ``None``. When a
    predicted mask is given, its contour is drawn on top in ``contour_color``.

    Args:
        alpha: weight of the heatmap (0 keeps the image, 1 shows only the heatmap).
        colormap: a matplotlib colormap name.
        vmin: map value drawn with the colormap's low end; ``None``: the map's minimum.
        vmax: map value drawn with the colormap's high end; ``None``: the map's maximum.
        contour_color: RGB uint8 colour of the mask contour (white: it stands out on ``jet``, unlike green).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        alpha: float = 0.5,
        colormap: str = "jet",
        vmin: float | None = None,
        vmax: float | None = None,
        contour_color: Sequence[int] = (255, 255, 255),
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        import matplotlib

        self.alpha = float(alpha)
        self.colormap = colormap
        self.cmap = matplotlib.colormaps[colormap]  # fail early on an unknown name
        self.vmin, self.vmax = vmin, vmax
        if len(contour_color) != 3:
            raise ValueError(f"contour_color must be an RGB triple, got {contour_color}")
        self.contour_color = np.asarray(contour_color, dtype=np.uint8)

    def normalize(self, anomaly_map: np.ndarray) -> np.ndarray:
        """The map scaled to [0, 1] with ``vmin``/``vmax`` (or its own range), as the colormap sees it."""
        low = float(np.min(anomaly_map)) if self.vmin is None else float(self.vmin)
        high = float(np.max(anomaly_map)) if self.vmax is None else float(self.vmax)
        if high <= low:  # a flat map (or a degenerate range) has no contrast to show: lowest colour
            return np.zeros_like(anomaly_map, dtype=np.float64)
        return np.clip((anomaly_map.astype(np.float64) - low) / (high - low), 0.0, 1.0)

    def __call__(self, image: Any, anomaly_map: Any, mask: Any | None = None) -> np.ndarray:
        """
        Args:
            image: (C, H, W) with 1 or 3 channels (or (H, W)), values in [0, 1] (clipped).
            anomaly_map: (1, H, W) or (H, W), same spatial size as the image.
            mask: optional predicted mask (1, H, W) or (H, W); pixels > 0.5 are inside.

        Returns:
            RGB uint8 numpy array (H, W, 3).
        """
        rgb = image_to_rgb(image)
        amap = single_channel(anomaly_map, "anomaly map")
        if amap.shape != rgb.shape[:2]:
            raise ValueError(f"anomaly map size {amap.shape} differs from image size {rgb.shape[:2]}; resize it first")
        heat = self.cmap(self.normalize(amap))[..., :3]
        blended = (1.0 - self.alpha) * rgb + self.alpha * heat
        out = np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)
        if mask is not None:
            from skimage.segmentation import find_boundaries

            mask_np = single_channel(mask, "mask")
            if mask_np.shape != amap.shape:
                raise ValueError(f"mask size {mask_np.shape} differs from image size {amap.shape}")
            # inner boundary: the contour stays on the predicted region's own pixels
            out[find_boundaries(mask_np > 0.5, mode="inner")] = self.contour_color
        return out


class RenderHeatmapOverlayd(MapTransform):
    """Dictionary wrapper of :class:`RenderHeatmapOverlay`: ``d[output_key] = overlay(d[image_key], d[map_key],
    d[mask_key])``, an RGB uint8 numpy array (H, W, 3).

    Args:
        image_key: key of the image (C, H, W) in [0, 1].
        map_key: key of the anomaly map (1, H, W).
        output_key: key to store the overlay under.
        alpha: weight of the heatmap.
        colormap: matplotlib colormap name.
        vmin: map value of the colormap's low end (``None``: the map's minimum).
        vmax: map value of the colormap's high end (``None``: the map's maximum).
        mask_key: optional key of a predicted mask whose contour is drawn.
        contour_color: RGB colour of that contour.
        allow_missing_keys: when the image or map (or mask) is missing, skip (or draw no contour) instead of raising.
    """

    backend = RenderHeatmapOverlay.backend

    def __init__(
        self,
        image_key: str,
        map_key: str,
        output_key: str,
        alpha: float = 0.5,
        colormap: str = "jet",
        vmin: float | None = None,
        vmax: float | None = None,
        mask_key: str | None = None,
        contour_color: Sequence[int] = (255, 255, 255),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__([image_key, map_key], allow_missing_keys)
        self.image_key, self.map_key, self.output_key, self.mask_key = image_key, map_key, output_key, mask_key
        self.renderer = RenderHeatmapOverlay(alpha, colormap, vmin, vmax, contour_color)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        present = list(self.key_iterator(d))  # raises on a missing key unless allow_missing_keys
        if len(present) < 2:
            return d
        mask = None
        if self.mask_key is not None:
            if self.mask_key in d:
                mask = d[self.mask_key]
            elif not self.allow_missing_keys:
                raise KeyError(
                    f"key '{self.mask_key}' is not found in data, set allow_missing_keys=True to skip the contour"
                )
        d[self.output_key] = self.renderer(d[self.image_key], d[self.map_key], mask)
        return d
