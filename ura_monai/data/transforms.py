"""Loading and preprocessing transforms for anomaly-detection images, in MONAI's array / dictionary style.

:func:`anomaly_transforms` builds the standard chain that turns a datalist item
(see :mod:`ura_monai.data.datalists`) into::

    {
        "image": torch.float32 (C, H, W) in [0, 1],
        "mask": torch.float32 (1, H, W) with values 0 / 1,
        "label": torch.int64 scalar (when the item has a label),
        "has_mask": bool,
        "image_path": str,
        "mask_path": str ("" when there is no mask),
        "orig_size": torch.int64 (2,) = (H, W) of the file before resizing,
        ... other keys of the item (defect_type, category) unchanged
    }

No value is None, so ``monai.data.DataLoader``'s default collation works.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Compose, EnsureTyped, MapTransform, RandFlipd, RandRotate90d, Transform
from monai.utils import ensure_tuple
from PIL import Image

__all__ = [
    "MAX_IMAGE_PIXELS",
    "LoadAnomalyImage",
    "LoadAnomalyImaged",
    "LoadAnomalyMask",
    "ResizeAnomaly",
    "ResizeAnomalyd",
    "anomaly_transforms",
    "image_size_reason",
    "load_image_tensor",
    "read_image_array",
    "stored_size",
]

logger = logging.getLogger("ura_monai.data")

PathLike = str | Path

# images above this many pixels are refused per file (clear error, the run goes on) instead of decoding them:
# an 8000x8000 RGB image costs several GB as float32 with its maps and overlay; set URA_MONAI_MAX_IMAGE_PIXELS
# to change it (see docs/robustness.md)
MAX_IMAGE_PIXELS = int(os.environ.get("URA_MONAI_MAX_IMAGE_PIXELS", 40_000_000))

_TIFF_EXTENSIONS = (".tif", ".tiff")
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# --------------------------------------------------------------------------- reading


def stored_size(path: Path) -> tuple[int, int] | None:
    """(H, W) from the file's header, without decoding the pixels; None when the header gives none."""
    if path.suffix.lower() in _TIFF_EXTENSIONS:
        try:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tif.series[0].shape
            sizes = sorted((int(n) for n in shape), reverse=True)[:2]
            return (sizes[0], sizes[1]) if len(sizes) == 2 else None
        except Exception:  # noqa: BLE001 - PIL below reads what tifffile rejects
            pass
    try:
        with Image.open(path) as img:
            return (int(img.height), int(img.width))
    except Exception:  # noqa: BLE001 - the decode itself reports unreadable files
        return None


def image_size_reason(path: PathLike) -> str | None:
    """``None`` when ``path``'s header says the image has at most :data:`MAX_IMAGE_PIXELS` pixels (or gives no
    size), else why it is refused. Reads the header only."""
    size = stored_size(Path(path))
    if size is None or size[0] * size[1] <= MAX_IMAGE_PIXELS:
        return None
    return (
        f"image is {size[1]}x{size[0]} ({size[0] * size[1] / 1e6:.1f} megapixels), over the limit of "
        f"{MAX_IMAGE_PIXELS / 1e6:.1f} megapixels; downscale it first (or set URA_MONAI_MAX_IMAGE_PIXELS)"
    )


def _read_raw(path: Path) -> np.ndarray:
    """Pixel array (H, W) or (H, W, C) with its stored dtype; 16-bit and float TIFFs through tifffile."""
    too_large = image_size_reason(path)
    if too_large is not None:
        raise ValueError(f"{path}: {too_large}")
    if path.suffix.lower() in _TIFF_EXTENSIONS:
        try:
            import tifffile

            return _channels_last(np.asarray(tifffile.imread(path)), path)
        except ImportError:
            pass
        except Exception:  # noqa: BLE001 - PIL reads some TIFFs tifffile rejects (e.g. old JPEG-in-TIFF)
            pass
    with Image.open(path) as img:
        img.load()
        return _pil_to_array(img)


def _pil_to_array(img: Image.Image) -> np.ndarray:
    """PIL image to array, keeping 16-bit ('I;16*', 'I') and float ('F') depth, colour as RGB."""
    mode = img.mode
    if mode in ("1", "L", "F", "I", "RGB") or mode.startswith("I;16"):
        return np.asarray(img)
    if mode == "LA":
        return np.asarray(img)[..., 0]  # drop alpha, keep grey
    if mode == "RGBA":
        return np.asarray(img)[..., :3]
    return np.asarray(img.convert("RGB"))  # P, PA, CMYK, YCbCr, LAB, HSV, ...


def _channels_last(array: np.ndarray, path: Path) -> np.ndarray:
    """(H, W) or (H, W, C) from a tifffile array that may be (C, H, W) or carry singleton axes."""
    array = np.squeeze(array)
    if array.ndim == 2:
        return array
    if array.ndim == 3:
        if array.shape[-1] <= 4:
            return array
        if array.shape[0] <= 4:
            return np.moveaxis(array, 0, -1)
    raise ValueError(f"expected a 2D grey or colour image in {path}, got an array of shape {array.shape}")


def _to_unit_range(array: np.ndarray, path: Path) -> np.ndarray:
    """float32 in [0, 1]: uint8 / 255, uint16 / 65535, other integers and out-of-range floats min-max."""
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if np.issubdtype(array.dtype, np.integer):
        # PIL's 32-bit 'I' mode is how some Pillow versions open 16-bit PNGs
        if array.min() >= 0 and array.max() <= 65535:
            return array.astype(np.float32) / 65535.0
        return _min_max(array.astype(np.float64)).astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise ValueError(f"image {path} contains NaN or infinite values")
        if array.min() >= 0.0 and array.max() <= 1.0:
            return array.astype(np.float32)
        return _min_max(array.astype(np.float64)).astype(np.float32)
    raise ValueError(f"unsupported pixel type {array.dtype} in image {path}")


def _min_max(array: np.ndarray) -> np.ndarray:
    low, high = float(array.min()), float(array.max())
    if high <= low:  # a constant image carries no contrast; map it to 0 instead of dividing by zero
        return np.zeros_like(array)
    return (array - low) / (high - low)


def read_image_array(path: PathLike, channels: int | None = None, warn_conversion: bool = False) -> np.ndarray:
    """Read an image file into a float32 array (C, H, W) with values in [0, 1].

    8-bit data is divided by 255 and 16-bit data by 65535; float data already in [0, 1] is kept,
    other float or wide-integer data is min-max scaled. Grey images stay one channel; RGBA, palette
    and other colour modes become RGB (alpha dropped). 16-bit colour PNGs are read by PIL at 8 bits.

    Args:
        path: image file (png, jpg, bmp, tif, ...).
        channels: None keeps the file's channels; 1 converts colour to grey (ITU-R 601 luma);
            3 repeats a grey channel to RGB.
        warn_conversion: warn (naming the file) when the file's channels are converted, e.g. a grey image given
            to a model trained on RGB images.

    Returns:
        float32 array of shape (C, H, W).

    Raises:
        ValueError: when the file holds NaN/inf, an unsupported pixel type or shape, or ``channels`` is invalid.
        OSError: when the file cannot be decoded (PIL's error, with the path).
    """
    path = Path(path)
    try:
        raw = _read_raw(path)
    except (OSError, SyntaxError) as err:
        raise OSError(f"cannot read image {path}: {err}") from err
    array = _to_unit_range(raw, path)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 2:  # grey + alpha (tifffile)
        array = array[..., :1]
    elif array.shape[-1] == 4:  # RGBA (tifffile)
        array = array[..., :3]
    array = np.ascontiguousarray(np.moveaxis(array, -1, 0))
    if warn_conversion and channels is not None and array.shape[0] != channels:
        kind = "grey" if array.shape[0] == 1 else "colour"
        target = "RGB (grey repeated)" if channels == 3 else "grey (luma)"
        warnings.warn(
            f"{path} is a {kind} image; converted to {target} as the model expects {channels} channel(s)",
            UserWarning,
            stacklevel=2,
        )
    return _convert_channels(array, channels, path)


def _convert_channels(array: np.ndarray, channels: int | None, path: Path) -> np.ndarray:
    if channels is None or array.shape[0] == channels:
        return array
    if channels == 1 and array.shape[0] == 3:
        return np.tensordot(_LUMA_WEIGHTS, array, axes=1)[None].astype(np.float32)
    if channels == 3 and array.shape[0] == 1:
        return np.repeat(array, 3, axis=0)
    raise ValueError(f"cannot convert the {array.shape[0]}-channel image {path} to {channels} channels")


class LoadAnomalyImage(Transform):
    """Load an image file as a float32 tensor (C, H, W) in [0, 1].

    See :func:`read_image_array` for how bit depths and colour modes are handled.

    Args:
        channels: None keeps the file's channels; 1 forces grey; 3 forces RGB.
        warn_conversion: warn, naming the file, when its channels are converted.
    """

    def __init__(self, channels: int | None = None, warn_conversion: bool = False) -> None:
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
        self.channels = channels
        self.warn_conversion = warn_conversion

    def __call__(self, path: PathLike) -> torch.Tensor:
        """
        Args:
            path: image file.

        Returns:
            float32 tensor (C, H, W) in [0, 1].
        """
        return torch.from_numpy(read_image_array(path, self.channels, self.warn_conversion))


class LoadAnomalyMask(Transform):
    """Load a ground-truth mask as a binary float32 tensor (1, H, W): 1 where any channel is > 0.

    Args:
        spatial_size: expected (H, W); when given, a mask of another size raises ValueError.
    """

    def __init__(self, spatial_size: Sequence[int] | None = None) -> None:
        self.spatial_size = None if spatial_size is None else tuple(int(s) for s in spatial_size)

    def __call__(self, path: PathLike | None, image_path: PathLike | None = None) -> torch.Tensor:
        """
        Args:
            path: mask file, or None / "" for an all-zero mask (needs ``spatial_size``).
            image_path: the image the mask belongs to, named in the size-mismatch error.

        Returns:
            float32 tensor (1, H, W) with values 0 and 1.
        """
        if path is None or str(path) == "":
            if self.spatial_size is None:
                raise ValueError("an all-zero mask for a missing mask file needs spatial_size")
            return torch.zeros((1, *self.spatial_size), dtype=torch.float32)
        path = Path(path)
        try:
            raw = _read_raw(path)
        except (OSError, SyntaxError) as err:
            raise OSError(f"cannot read mask {path}: {err}") from err
        if raw.ndim == 3:  # colour masks: a defect may be drawn in any colour
            raw = raw.max(axis=-1)
        values = np.unique(raw)
        if values.size > 2 or (values.size == 2 and values[0] != 0):
            # anti-aliased edges or a label map: binarising at > 0 may not be what the annotator meant
            warnings.warn(
                f"mask {path} is not binary ({values.size} distinct values from {values[0]} to {values[-1]}); "
                "binarised at > 0",
                UserWarning,
                stacklevel=2,
            )
        size = tuple(raw.shape)
        if self.spatial_size is not None and size != self.spatial_size:
            raise ValueError(
                f"mask {path} has size {size[0]}x{size[1]} (HxW) but image {image_path} has size "
                f"{self.spatial_size[0]}x{self.spatial_size[1]}"
            )
        return torch.from_numpy(np.ascontiguousarray(raw > 0, dtype=np.float32))[None]


class LoadAnomalyImaged(MapTransform):
    """Dictionary wrapper of :class:`LoadAnomalyImage` that also loads the item's mask.

    For every key in ``keys`` (usually just "image") the path is moved to ``<key>_path`` and the
    tensor (C, H, W) put under ``<key>``; the first key's size (H, W) is stored as an int64 tensor
    under ``orig_size``. ``mask_key`` holds the mask path (or None / "" / absent): it is replaced by
    a binary float32 tensor (1, H, W), zeros when there is no mask, and its path is kept under
    ``mask_path`` ("" when none). ``has_mask`` is filled in when absent, and ``label`` becomes an
    int64 tensor when present.

    Args:
        keys: keys holding image paths.
        mask_key: key holding the mask path; None loads no mask.
        channels: None keeps the files' channels; 1 forces grey; 3 forces RGB.
        allow_missing_keys: don't raise when an image key is missing.
        warn_conversion: warn, naming the file, when an image's channels are converted.

    Raises:
        ValueError: when the mask's size differs from the image's (naming both files), or the image
            holds NaN/inf values.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str | None = "mask",
        channels: int | None = None,
        allow_missing_keys: bool = False,
        warn_conversion: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.loader = LoadAnomalyImage(channels, warn_conversion)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first_size: tuple[int, int] | None = None
        first_path = ""
        for key in self.key_iterator(d):
            path = str(d[key])
            image = self.loader(path)
            d[f"{key}_path"] = path
            d[key] = image
            if first_size is None:
                first_size, first_path = (int(image.shape[-2]), int(image.shape[-1])), path
        if first_size is None:
            return d
        d["orig_size"] = torch.tensor(first_size, dtype=torch.int64)
        if self.mask_key is not None:
            mask_path = d.get(self.mask_key)
            mask_path = "" if mask_path is None else str(mask_path)
            d[self.mask_key] = LoadAnomalyMask(first_size)(mask_path, first_path)
            d["mask_path"] = mask_path
            d.setdefault("has_mask", bool(mask_path))
        if "label" in d:
            d["label"] = torch.as_tensor(int(d["label"]), dtype=torch.int64)
        return d


def _spatial_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return (image_size, image_size)
    size = tuple(int(s) for s in image_size)
    if len(size) != 2:
        raise ValueError(f"image_size must be an int or (H, W), got {image_size!r}")
    return size  # type: ignore[return-value]


class ResizeAnomaly(Transform):
    """Resize a (C, H, W) image tensor with ``torch.nn.functional.interpolate``.

    Used instead of ``monai.transforms.Resize`` because MONAI's anti-aliasing smooths with zero
    padding, which darkens a band along the image border (about 15% at a 2x reduction).

    Args:
        spatial_size: output (H, W), or one int for a square.
        mode: "bilinear" (anti-aliased when shrinking, for images) or "nearest-exact" (for masks), or any
            other ``interpolate`` mode for 2D data.
    """

    def __init__(self, spatial_size: int | Sequence[int], mode: str = "bilinear") -> None:
        self.spatial_size = _spatial_size(spatial_size)
        self.mode = mode

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """
        Args:
            img: tensor (C, H, W).

        Returns:
            float32 tensor (C, *spatial_size); values stay in the input's range.
        """
        img = torch.as_tensor(img).as_subclass(torch.Tensor).to(torch.float32)
        if tuple(img.shape[-2:]) == self.spatial_size:
            return img
        smooth = self.mode in ("bilinear", "bicubic")
        resized = torch.nn.functional.interpolate(
            img[None],
            size=self.spatial_size,
            mode=self.mode,
            antialias=smooth,
            align_corners=False if smooth else None,
        )[0]
        if self.mode == "bicubic":  # cubic overshoots; keep the input's range
            resized = resized.clamp(float(img.min()), float(img.max()))
        return resized


class ResizeAnomalyd(MapTransform):
    """Resize images bilinearly with anti-aliasing and masks by nearest neighbour (they stay binary).

    Args:
        keys: image keys.
        spatial_size: output (H, W), or one int for a square.
        mask_keys: mask keys, resized with "nearest-exact".
        allow_missing_keys: don't raise when a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        spatial_size: int | Sequence[int] = 256,
        mask_keys: KeysCollection = "mask",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_keys = list(ensure_tuple(mask_keys))
        self.image_resizer = ResizeAnomaly(spatial_size, "bilinear")
        self.mask_resizer = ResizeAnomaly(spatial_size, "nearest-exact")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.image_resizer(d[key])
        for key in self.mask_keys:
            if key in d:
                d[key] = self.mask_resizer(d[key])
            elif not self.allow_missing_keys:
                raise KeyError(f"mask key {key!r} not in the data; set allow_missing_keys=True to resize without it")
        return d


# --------------------------------------------------------------------------- pipelines


def anomaly_transforms(
    image_size: int | Sequence[int] = 256,
    augment: bool | str = False,
    channels: int | None = None,
    warn_conversion: bool = False,
) -> Compose:
    """Standard transform chain from a datalist item to network-ready tensors.

    Loads image and mask (:class:`LoadAnomalyImaged`), resizes the image bilinearly with
    anti-aliasing and the mask by nearest neighbour (:class:`ResizeAnomalyd`), optionally augments,
    and returns plain ``torch.Tensor`` values (not MetaTensor). See the module docstring for the keys.

    Args:
        image_size: output (H, W), or one int for a square.
        augment: False for none (evaluation); True or "dihedral" for random horizontal / vertical flips
            (p=0.5 each) plus a random rot90 (p=0.5, square sizes only); "hflip" for a horizontal flip
            only, for images with a natural up-down orientation (e.g. OCT B-scans).
        channels: None keeps the files' channels; 1 forces grey; 3 forces RGB (e.g. ImageNet backbones).
        warn_conversion: warn, naming the file, when an image's channels are converted (a grey image given to a
            model trained on RGB images).

    Returns:
        a ``monai.transforms.Compose``; call ``.set_random_state(seed)`` on it for reproducible augmentation.
    """
    spatial_size = _spatial_size(image_size)
    keys = ["image", "mask"]
    transforms: list[Any] = [
        LoadAnomalyImaged(keys="image", mask_key="mask", channels=channels, warn_conversion=warn_conversion),
        ResizeAnomalyd(keys="image", spatial_size=spatial_size, mask_keys="mask"),
    ]
    if augment:
        mode = "dihedral" if augment is True else str(augment).lower()
        if mode not in ("dihedral", "hflip"):
            raise ValueError(f"augment must be a bool, 'dihedral' or 'hflip', got {augment!r}")
        transforms.append(RandFlipd(keys=keys, prob=0.5, spatial_axis=1))
        if mode == "dihedral":
            transforms.append(RandFlipd(keys=keys, prob=0.5, spatial_axis=0))
            if spatial_size[0] == spatial_size[1]:  # rot90 of a non-square image would break batching
                transforms.append(RandRotate90d(keys=keys, prob=0.5, max_k=3, spatial_axes=(0, 1)))
    # plain tensors: downstream code needs no MONAI metadata, and MetaTensor slows simple ops
    transforms.append(EnsureTyped(keys=keys, data_type="tensor", dtype=torch.float32, track_meta=False))
    return Compose(transforms)


def load_image_tensor(
    path: PathLike, image_size: int | Sequence[int] = 256, channels: int | None = None
) -> torch.Tensor:
    """Load and resize one image for prediction, as in :func:`anomaly_transforms` without augmentation.

    Args:
        path: image file.
        image_size: output (H, W), or one int for a square.
        channels: None keeps the file's channels; 1 forces grey; 3 forces RGB.

    Returns:
        float32 tensor (C, H, W) in [0, 1]; add a batch axis with ``[None]``.
    """
    image = LoadAnomalyImage(channels)(path)
    return ResizeAnomaly(image_size, "bilinear")(image)
