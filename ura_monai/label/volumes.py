"""Images and volumes of a MONAI Label datastore, as the 2D slices URA-Net works on.

URA-Net is a 2D detector. A datastore holds 2D pictures (OCT B-scans, photos: ``.png``, ``.jpg``, ``.jpeg``, ...)
and 3D volumes (``.nii.gz``, ``.nrrd``, ... or a DICOM series folder). Volumes are handled slice by slice, as
:func:`ura_monai.inference.dicom_inference.predict_dicom_folder` does for DICOM series:

- a volume is read with MONAI's ``ITKReader`` (the reader MONAI Label itself uses), so the array is in MONAI's
  spatial order ``(x, y, z)`` and the affine is RAS; a DICOM series folder is read the same way;
- intensities are mapped to [0, 1] with a robust window (the 0.5 and 99.5 percentiles of a subsample), the
  window :func:`ura_monai.data.dicom.compute_intensity_window` uses for DICOM series;
- the slices are cut along one axis (``z`` by default: the slices of a CT/MR series, the B-scans of an OCT
  volume) and each slice is shown to the network as rows x columns, i.e. the transposed ``(x, y)`` plane.

2D pictures are read with :func:`ura_monai.data.read_image_array`, exactly as training reads them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ura_monai.data import IMAGE_EXTENSIONS

__all__ = [
    "VOLUME_EXTENSIONS",
    "intensity_window",
    "is_volume",
    "iter_slice_batches",
    "load_volume",
    "normalize_volume",
    "place_slice_maps",
    "slice_to_image",
]

# volume formats ITK reads (a folder is read as a DICOM series)
VOLUME_EXTENSIONS: tuple[str, ...] = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
_LUMINANCE_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as for DICOM RGB


def _suffix(path: str | os.PathLike) -> str:
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def is_volume(path: str | os.PathLike) -> bool:
    """Whether ``path`` is read as a 3D volume (a DICOM folder or a volume file) rather than a 2D picture.

    Raises:
        ValueError: for a file that is neither (the message lists the extensions that are).
    """
    if os.path.isdir(path):
        return True
    suffix = _suffix(path)
    if suffix in VOLUME_EXTENSIONS:
        return True
    if suffix in IMAGE_EXTENSIONS:
        return False
    raise ValueError(
        f"{path}: not an image URA-Net reads (extension {suffix or '<none>'!r}); "
        f"2D: {', '.join(IMAGE_EXTENSIONS)}; 3D: {', '.join(VOLUME_EXTENSIONS)} or a DICOM series folder"
    )


def load_volume(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a volume file or a DICOM series folder.

    Returns:
        ``(volume, affine)``: float32 ``(x, y, z)`` in the file's units (a 2D file gets ``z`` = 1; colour voxels
        become luminance) and the 4x4 RAS affine MONAI's ``ITKReader`` gives.
    """
    from monai.transforms import LoadImage

    image = LoadImage(reader="ITKReader", image_only=True)(str(path))
    affine = np.asarray(image.affine, dtype=np.float64)
    array = np.asarray(image.array if hasattr(image, "array") else image, dtype=np.float32)
    if array.ndim == 4 and array.shape[-1] in (3, 4):  # (x, y, z, rgb[a]) vector pixels
        array = array[..., :3] @ _LUMINANCE_WEIGHTS
    elif array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got an array of shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{path}: the volume contains NaN or infinite values")
    return np.ascontiguousarray(array), affine


def intensity_window(
    volume: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5), max_values: int = 1_000_000
) -> tuple[float, float]:
    """``(low, high)`` percentiles of a strided subsample of ``volume``, with ``high > low``."""
    values = volume.ravel()
    values = values[:: max(1, values.size // max_values)]
    low, high = (float(v) for v in np.percentile(values, percentiles))
    if not high > low:
        high = low + 1.0
    return low, high


def normalize_volume(volume: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """float32 ``volume`` mapped to [0, 1] with ``window`` (:func:`intensity_window` when None), clipped."""
    low, high = intensity_window(volume) if window is None else window
    return np.clip((volume - np.float32(low)) / np.float32(high - low), 0.0, 1.0).astype(np.float32, copy=False)


def _check_axis(axis: int) -> int:
    if axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1 or 2 (of the volume's x, y, z), got {axis!r}")
    return int(axis)


def slice_to_image(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Slice ``index`` along ``axis`` as a 2D image (rows, columns): the transposed plane of the other two axes."""
    return np.ascontiguousarray(np.take(volume, index, axis=_check_axis(axis)).T)


def iter_slice_batches(
    volume: np.ndarray, axis: int = 2, batch_size: int = 8, indices: Sequence[int] | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of slices of a normalized volume.

    Yields:
        ``(indices, images)``: int64 slice indices and float32 ``(N, 1, H, W)`` images (see :func:`slice_to_image`).
    """
    axis = _check_axis(axis)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.arange(volume.shape[axis], dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    for start in range(0, order.size, batch_size):
        chunk = order[start : start + batch_size]
        yield chunk, np.stack([slice_to_image(volume, axis, int(i)) for i in chunk])[:, None]


def place_slice_maps(
    maps: np.ndarray, shape: Sequence[int], axis: int, out: np.ndarray, indices: Sequence[int] | np.ndarray
) -> None:
    """Write ``(N, H, W)`` slice maps back into ``out`` (the volume's shape) at ``indices`` along ``axis``."""
    axis = _check_axis(axis)
    for map_2d, index in zip(maps, indices):
        selector: list[slice | int] = [slice(None)] * 3
        selector[axis] = int(index)
        out[tuple(selector)] = map_2d.T
