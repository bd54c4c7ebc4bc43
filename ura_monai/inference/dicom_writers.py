"""Writers for per-series results: NIfTI maps, DICOM Parametric Map / SEG, report.json, results.csv.

Every file goes through :mod:`ura_monai.utils.fileio` (temporary file + ``os.replace``).

* NIfTI maps carry the source affine of :func:`ura_monai.data.dicom.series_affine` (RAS, voxel
  order column/row/slice, sform and qform "scanner"), so they overlay the source series in
  3D Slicer. :func:`write_nifti_slabs` streams slice slabs to disk so a map never has to be held in
  memory.
* DICOM results are built with highdicom (an optional dependency: ``pip install ura-monai[dicom]``)
  from the source headers, so they carry the source study, patient, frame of reference and a
  ReferencedSeriesSequence naming every source instance.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom

from ura_monai.data.dicom import SeriesInfo
from ura_monai.utils.fileio import atomic_path, atomic_write_csv, atomic_write_text

__all__ = [
    "DICOM_EXTRA_HINT",
    "RESULTS_CSV_FIELDS",
    "highdicom_available",
    "nifti_header",
    "read_source_headers",
    "update_results_csv",
    "write_nifti_slabs",
    "write_parametric_map",
    "write_report_json",
    "write_segmentation",
]

DICOM_EXTRA_HINT = "pip install ura-monai[dicom]"

RESULTS_CSV_FIELDS = [
    "series_dir",
    "status",
    "series_uid",
    "modality",
    "sop_class",
    "slices",
    "rows",
    "cols",
    "axis",
    "volume_score",
    "aggregation",
    "threshold",
    "decision",
    "top_slices",
    "warnings",
    "skipped_files",
    "message",
    "time_read_infer_s",
    "time_write_s",
    "time_total_s",
]

_MANUFACTURER = "ura-monai"
_MODEL_NAME = "URA-Net"


def highdicom_available() -> bool:
    """Whether the optional highdicom package can be imported."""
    try:
        import highdicom  # noqa: F401
    except ImportError:
        return False
    return True


def _import_highdicom() -> Any:
    try:
        import highdicom
    except ImportError as error:
        raise ImportError(f"DICOM result objects need highdicom: {DICOM_EXTRA_HINT}") from error
    return highdicom


def _software_version() -> str:
    from ura_monai import __version__

    return __version__


def _derived_series_attributes(hd: Any, series_number: int) -> dict[str, Any]:
    """The attributes a new derived series (Parametric Map, SEG) gets: new UIDs, its number, and the device."""
    return {
        "series_instance_uid": hd.UID(),
        "series_number": series_number,
        "sop_instance_uid": hd.UID(),
        "instance_number": 1,
        "manufacturer": _MANUFACTURER,
        "manufacturer_model_name": _MODEL_NAME,
        "software_versions": _software_version(),
        "device_serial_number": "none",
    }


def _save_derived(dataset: Any, path: str | os.PathLike[str], series_description: str) -> Path:
    dataset.SeriesDescription = series_description
    with atomic_path(path) as temporary_path:
        dataset.save_as(temporary_path)
    return Path(path)


# --------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------


def nifti_header(
    volume_shape: Sequence[int],
    affine: np.ndarray,
    value_range: tuple[float, float] | None = None,
    description: str = "",
) -> nib.Nifti1Header:
    """A float32 NIfTI-1 header for a ``[slices, rows, cols]`` volume stored as ``(cols, rows, slices)``.

    Args:
        volume_shape: ``(slices, rows, cols)``.
        affine: 4x4 RAS affine for voxel order ``(column, row, slice)``.
        value_range: written to ``cal_min``/``cal_max`` (the default display range of viewers).
        description: ``descrip`` text (80 characters at most; no patient data).

    Returns:
        the header, with sform and qform set (code 1, scanner) and ``vox_offset`` 352.
    """
    slices, rows, cols = (int(v) for v in volume_shape)
    header = nib.Nifti1Header(endianness="<")
    header.set_data_dtype(np.float32)
    header.set_data_shape((cols, rows, slices))
    header.set_xyzt_units("mm", "sec")
    # the sform holds the exact (possibly sheared, for tilted gantries) affine; the qform its
    # nearest rigid version, which is all a quaternion can hold
    header.set_sform(affine, code=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        header.set_qform(affine, code=1)
    if value_range is not None:
        header["cal_min"], header["cal_max"] = float(value_range[0]), float(value_range[1])
    header["descrip"] = description[:79].encode("ascii", "replace")
    header["vox_offset"] = 352
    return header


def write_nifti_slabs(
    path: str | os.PathLike[str],
    slabs: Iterable[np.ndarray],
    volume_shape: Sequence[int],
    affine: np.ndarray,
    value_range: tuple[float, float] | None = None,
    description: str = "",
    compresslevel: int = 1,
) -> Path:
    """Stream a volume to a NIfTI file slab by slab, without holding it in memory.

    The C-order bytes of a ``[slices, rows, cols]`` array are exactly NIfTI's on-disk order for
    the shape ``(cols, rows, slices)`` (first index fastest), so consecutive slice slabs can be
    appended after the header.

    Args:
        path: ``.nii`` or ``.nii.gz`` destination (written atomically).
        slabs: consecutive float arrays ``[k, rows, cols]`` covering all slices in order.
        volume_shape: ``(slices, rows, cols)``.
        affine: 4x4 RAS affine for voxel order ``(column, row, slice)``.
        value_range: display range stored as ``cal_min``/``cal_max``.
        description: header description.
        compresslevel: gzip level for ``.nii.gz`` (1: fast; float maps compress little anyway).

    Returns:
        the destination path.
    """
    destination = Path(path)
    header = nifti_header(volume_shape, affine, value_range, description)
    slices, rows, cols = (int(v) for v in volume_shape)
    written = 0
    with atomic_path(destination) as temporary_path:
        raw = open(temporary_path, "wb")
        stream: io.BufferedIOBase = (
            gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=compresslevel, mtime=0)  # type: ignore[assignment]
            if destination.name.endswith(".gz")
            else raw
        )
        try:
            stream.write(header.binaryblock)
            stream.write(b"\x00" * 4)  # no header extension
            for slab in slabs:
                slab = np.asarray(slab)
                if slab.ndim == 2:
                    slab = slab[None]
                if slab.shape[1:] != (rows, cols):
                    raise ValueError(f"slab of shape {slab.shape} does not match slices of {(rows, cols)}")
                stream.write(np.ascontiguousarray(slab, dtype="<f4").tobytes())
                written += slab.shape[0]
            if written != slices:
                raise ValueError(f"wrote {written} slices, expected {slices}")
        finally:
            if stream is not raw:
                stream.close()
            raw.close()
    return destination


# --------------------------------------------------------------------------------------------
# DICOM (highdicom)
# --------------------------------------------------------------------------------------------


def read_source_headers(series: SeriesInfo) -> list[pydicom.Dataset]:
    """The source datasets (headers only, no pixel data) in the series' slice order.

    Single-frame series give one dataset per slice, in sorted slice order; multi-frame
    objects one dataset per file.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [pydicom.dcmread(path, stop_before_pixels=True) for path in series.files]


def _frames_in_source_order(volume: np.ndarray, series: SeriesInfo, sources: Sequence[pydicom.Dataset]) -> np.ndarray:
    """Arrange a ``[slices, rows, cols]`` map as the frames of the source objects.

    highdicom derives plane positions and source-frame references from the source images in
    their own frame order: one frame per single-frame source (already sorted), or the frames of
    a multi-frame source in file order, which may differ from the sorted order.
    """
    if not series.is_multiframe:
        return volume
    if len(sources) != 1:
        raise ValueError("DICOM output for a series spread over several multi-frame objects is not supported")
    number_of_frames = int(sources[0].get("NumberOfFrames", 1))
    if number_of_frames != series.num_frames:
        raise ValueError(f"the source object has {number_of_frames} frames, the analysed stack {series.num_frames}")
    frames = np.empty_like(volume)
    for sorted_index, ref in enumerate(series.slices):
        frames[ref.frame_index] = volume[sorted_index]
    return frames


def write_parametric_map(
    path: str | os.PathLike[str],
    anomaly_volume: np.ndarray,
    series: SeriesInfo,
    source_datasets: Sequence[pydicom.Dataset] | None = None,
    series_number: int = 9901,
    series_description: str = "URA-Net anomaly map",
) -> Path:
    """Write the anomaly map as a DICOM Parametric Map (float pixels) referencing the source series.

    Args:
        path: destination ``.dcm`` (written atomically).
        anomaly_volume: float ``[slices, rows, cols]`` in the series' sorted slice order.
        series: the source series.
        source_datasets: source headers from :func:`read_source_headers` (read when ``None``).
        series_number: SeriesNumber of the new series.
        series_description: SeriesDescription of the new series.

    Returns:
        the destination path.

    Raises:
        ImportError: highdicom is not installed (the message says ``pip install ura-monai[dicom]``).
    """
    hd = _import_highdicom()
    from pydicom.sr.codedict import codes

    sources = list(source_datasets) if source_datasets is not None else read_source_headers(series)
    frames = _frames_in_source_order(np.asarray(anomaly_volume, dtype=np.float32), series, sources)
    low, high = float(np.min(frames)), float(np.max(frames))
    if not high > low:
        high = low + 1.0
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="ANOMALY",
        lut_explanation="URA-Net anomaly score",
        unit=codes.UCUM.NoUnits,
        value_range=(low, high),
        slope=1.0,
        intercept=0.0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parametric_map = hd.pm.ParametricMap(
            source_images=sources,
            pixel_array=frames,
            **_derived_series_attributes(hd, series_number),
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[hd.VOILUTTransformation(window_center=(low + high) / 2, window_width=high - low)],
            content_label="ANOMALY",
            content_description="URA-Net anomaly map",
        )
    return _save_derived(parametric_map, path, series_description)


def write_segmentation(
    path: str | os.PathLike[str],
    anomaly_mask: np.ndarray,
    series: SeriesInfo,
    threshold: float,
    source_datasets: Sequence[pydicom.Dataset] | None = None,
    series_number: int = 9902,
    series_description: str = "URA-Net anomaly segmentation",
) -> Path:
    """Write the thresholded anomaly map as a binary DICOM SEG referencing the source series.

    Args:
        path: destination ``.dcm`` (written atomically).
        anomaly_mask: boolean ``[slices, rows, cols]`` in the series' sorted slice order.
        series: the source series.
        threshold: the threshold that made the mask (recorded in the segment description).
        source_datasets: source headers from :func:`read_source_headers` (read when ``None``).
        series_number: SeriesNumber of the new series.
        series_description: SeriesDescription of the new series.

    Returns:
        the destination path.

    Raises:
        ImportError: highdicom is not installed (the message says ``pip install ura-monai[dicom]``).
    """
    hd = _import_highdicom()
    from pydicom.sr.codedict import codes

    sources = list(source_datasets) if source_datasets is not None else read_source_headers(series)
    frames = _frames_in_source_order(np.asarray(anomaly_mask, dtype=bool), series, sources).astype(np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=_MODEL_NAME, version=_software_version(), family=codes.cid7162.ArtificialIntelligence
    )
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=f"anomaly >= {threshold:.4g}",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        segmentation = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[description],
            **_derived_series_attributes(hd, series_number),
            content_label="ANOMALY",
            content_description="URA-Net thresholded anomaly map",
        )
    return _save_derived(segmentation, path, series_description)


# --------------------------------------------------------------------------------------------
# report.json, results.csv
# --------------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_report_json(path: str | os.PathLike[str], report: dict[str, Any]) -> Path:
    """Write a per-series report as indented JSON (atomically; numpy values converted)."""
    return atomic_write_text(path, json.dumps(report, indent=2, default=_json_default) + "\n")


def _row_key(row: dict[str, Any]) -> str:
    if row.get("series_dir"):
        return "series:" + str(row["series_dir"])
    return "skipped:" + str(row.get("skipped_files", ""))


def update_results_csv(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> Path:
    """Add rows to a folder-level results CSV, rewriting it whole (temporary file + replace).

    A row replaces an existing one for the same series folder (or the same skipped file), so a
    re-run into the same output folder keeps one row per series.

    Args:
        path: the CSV file (columns :data:`RESULTS_CSV_FIELDS`).
        rows: new rows (missing columns are left empty, unknown ones ignored).

    Returns:
        the CSV path.
    """
    csv_path = Path(path)
    merged: dict[str, dict[str, Any]] = {}
    if csv_path.exists():
        with open(csv_path, newline="", encoding="utf-8") as stream:
            for existing in csv.DictReader(stream):
                merged[_row_key(existing)] = existing
    for row in rows:
        merged[_row_key(row)] = row
    # cells escaped against formula injection: paths and messages come from the input folder
    table = [
        {key: ("" if row.get(key) is None else row.get(key)) for key in RESULTS_CSV_FIELDS} for row in merged.values()
    ]
    return atomic_write_csv(csv_path, table, RESULTS_CSV_FIELDS)
