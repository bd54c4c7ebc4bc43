"""Training datalists from DICOM series of normal cases: 2D slices cached as ``.npy`` files."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ura_monai.data.dicom.discovery import discover_series
from ura_monai.data.dicom.pixels import compute_intensity_window, iter_series_slices
from ura_monai.data.dicom.series import SeriesInfo
from ura_monai.utils.fileio import atomic_path, atomic_write_text
from ura_monai.utils.paths import is_within, safe_child

__all__ = ["dicom_slice_datalist"]

logger = logging.getLogger("ura_monai.data.dicom")


def _cached_series_slices(
    series: SeriesInfo,
    series_folder: Path,
    scratch_dir: Path,
    axis: int,
    slice_step: int,
    percentiles: tuple[float, float],
    rgb: str,
    foreground_level: float,
    overwrite: bool,
    batch_size: int,
) -> list[dict[str, Any]]:
    """The cached ``.npy`` slices of one series (``{"image", "slice_index", "foreground"}`` entries): reused when
    ``slices.json`` records the same settings (and not ``overwrite``), else written."""
    parameters = {"axis": axis, "slice_step": slice_step, "percentiles": list(percentiles), "rgb": rgb}
    settings_path = series_folder / "slices.json"
    reuse = (
        not overwrite
        and settings_path.exists()
        and json.loads(settings_path.read_text()).get("parameters") == parameters
    )
    if reuse:
        return json.loads(settings_path.read_text())["items"]
    series_items: list[dict[str, Any]] = []
    window = compute_intensity_window(series, percentiles)
    for indices, images in iter_series_slices(
        series, batch_size, axis=axis, window=window, rgb=rgb, scratch_dir=scratch_dir
    ):
        for index, image in zip(indices.tolist(), images):
            if index % slice_step:
                continue
            foreground = float(np.mean(image.max(axis=0) > foreground_level))
            slice_path = series_folder / f"slice_{index:05d}.npy"
            array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
            with atomic_path(slice_path, fsync=False) as temporary_path:
                with open(temporary_path, "wb") as stream:
                    np.save(stream, np.ascontiguousarray(array, dtype=np.float32))
            series_items.append({"image": str(slice_path), "slice_index": index, "foreground": foreground})
    atomic_write_text(settings_path, json.dumps({"parameters": parameters, "items": series_items}))
    return series_items


def dicom_slice_datalist(
    root: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    axis: int = 0,
    slice_step: int = 1,
    percentiles: tuple[float, float] = (0.5, 99.5),
    rgb: str = "luminance",
    min_foreground_fraction: float = 0.0,
    foreground_level: float = 0.05,
    modalities: Sequence[str] | None = None,
    overwrite: bool = False,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Turn DICOM series of normal cases into 2D training samples cached as ``.npy`` slices.

    Each series is windowed to [0, 1] on its own (robust percentiles from a subsample), cut along
    ``axis`` and every ``slice_step``-th slice is saved as a float32 ``.npy`` file under
    ``cache_dir/<series uid>/`` (written atomically; existing files are reused unless
    ``overwrite``). Grayscale slices are saved ``(H, W)``; colour series are converted to
    luminance by default (``rgb="luminance"``) or saved ``(H, W, 3)`` with ``rgb="keep"`` -- the
    layout of an image file, so MONAI's ``LoadImage`` + ``EnsureChannelFirst`` treat them alike.
    A series that fails (corrupt pixels, missing decoder) is logged and left out.

    Args:
        root: folder of DICOM series (normal cases only).
        cache_dir: where the ``.npy`` slices go; must not be inside ``root``.
        axis: slicing axis of the ``[slices, rows, cols]`` volume (0: DICOM slices / B-scans).
        slice_step: keep one slice in ``slice_step``.
        percentiles: intensity window percentiles.
        rgb: ``"luminance"`` or ``"keep"`` for colour series.
        min_foreground_fraction: drop slices whose fraction of pixels above ``foreground_level``
            is smaller (e.g. air-only slices at the edges of a head scan).
        foreground_level: the [0, 1] level counted as foreground.
        modalities: keep only these Modality values (e.g. ``["MR"]``); all when ``None``.
        overwrite: rewrite cached slices.
        batch_size: slices decoded at a time.

    Returns:
        MONAI-style items ``{"image": path, "label": 0, "mask": None, "has_mask": False,
        "defect_type": "good", "category": series uid, "series_uid": ..., "slice_index": ...}``.
    """
    if slice_step < 1:
        raise ValueError(f"slice_step must be >= 1, got {slice_step}")
    root_path, cache_path = Path(root).resolve(), Path(cache_dir).resolve()
    if is_within(cache_path, root_path):
        raise ValueError(
            f"cache folder {cache_path} is inside the input folder {root_path}; choose a folder outside it"
        )
    cache_path.mkdir(parents=True, exist_ok=True)
    series_list, skipped = discover_series(root_path)
    for item in skipped:
        logger.info("skipped %s: %s", os.path.relpath(item.path, root_path), item.reason)
    wanted = {m.upper() for m in modalities} if modalities else None
    items: list[dict[str, Any]] = []
    for series in series_list:
        if wanted is not None and series.modality.upper() not in wanted:
            continue
        series_folder = safe_child(cache_path, series.name)
        try:
            series_items = _cached_series_slices(series, series_folder, cache_path, axis, slice_step, percentiles, rgb,
                                                 foreground_level, overwrite, batch_size)  # fmt: skip
        except Exception as error:
            logger.warning("series %s left out of the datalist: %s", series.name, error)
            continue
        # fmt: off
        items.extend({"image": entry["image"], "label": 0, "mask": None, "has_mask": False, "defect_type": "good",
                      "category": series.uid, "series_uid": series.uid, "slice_index": entry["slice_index"]}
                     for entry in series_items if entry["foreground"] >= min_foreground_fraction)
        # fmt: on
    return items
