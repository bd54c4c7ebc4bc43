"""DICOM headers and geometry: header-only reads, one record per frame, why a file is left out, slice order along
the normal, spacing / gap / tilt warnings and the RAS affine of a series.

Headers are read with ``pydicom.dcmread(stop_before_pixels=True)``; the pixel data element is only looked at (its
declared length against the file size) to report truncated transfers without decoding anything.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from ura_monai.data.dicom.series import SeriesInfo, SliceRef

__all__ = [
    "FrameRecord",
    "frame_records",
    "geometry_warnings",
    "order_records",
    "read_header",
    "series_affine",
    "skip_reason",
    "slice_normal",
    "split_repeated_positions",
]

# SOP classes that carry pixels but are derived results, not images to analyse (our own outputs
# among them): a PACS export often contains them next to the source series
_DERIVED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.30": "Parametric Map Storage",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose Storage",
}
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
_PIXEL_DATA_TAGS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}
# VRs whose explicit-VR element header has 2 reserved bytes and a 4-byte length
_LONG_HEADER_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UT", b"UR", b"UC"}

# relative tolerance on slice steps before a series is called unevenly spaced
_SPACING_TOLERANCE = 0.05
# slices closer than this along the normal (mm) are at the same position
_POSITION_TOLERANCE_MM = 1e-2
# smallest angle (degrees) between the slice step and the slice normal reported as a tilt
_TILT_TOLERANCE_DEGREES = 0.5


@dataclass
class FrameRecord:
    """One frame seen while scanning (before grouping into series)."""

    ref: SliceRef
    series_uid: str
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    header: dict[str, Any]


def _float_tuple(value: Any, length: int) -> tuple[float, ...] | None:
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(values) != length or not all(math.isfinite(v) for v in values):
        return None
    return values


def _optional_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _optional_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _pixel_element_problem(path: str, stream: Any, dataset: pydicom.Dataset) -> tuple[bool, str | None]:
    """Look at the pixel data element where ``stop_before_pixels`` left the file.

    Returns:
        ``(has_pixel_data, problem)``: whether a pixel data element follows the header, and a
        reason when its declared length runs past the end of the file (a truncated transfer).
    """
    offset = stream.tell()
    file_size = os.path.getsize(path)
    stream.seek(offset)
    element_header = stream.read(12)
    if len(element_header) < 8:
        return False, None
    is_implicit_vr, is_little_endian = dataset.original_encoding
    endian = "<" if is_little_endian is not False else ">"
    group, element = struct.unpack(endian + "HH", element_header[:4])
    tag = (group << 16) | element
    if tag not in _PIXEL_DATA_TAGS:
        return False, None
    if is_implicit_vr:
        (length,) = struct.unpack(endian + "I", element_header[4:8])
        header_length = 8
    elif element_header[4:6] in _LONG_HEADER_VRS:
        if len(element_header) < 12:
            return True, "truncated file: pixel data element header is incomplete"
        (length,) = struct.unpack(endian + "I", element_header[8:12])
        header_length = 12
    else:
        (length,) = struct.unpack(endian + "H", element_header[6:8])
        header_length = 8
    if length == 0xFFFFFFFF:
        # encapsulated (compressed) fragments end with a sequence delimiter item
        stream.seek(max(file_size - 8, 0))
        tail = stream.read(8)
        delimiter = b"\xfe\xff\xdd\xe0" if endian == "<" else b"\xff\xfe\xe0\xdd"
        if not tail.startswith(delimiter):
            return True, "truncated file: encapsulated pixel data has no sequence delimiter at the end"
        return True, None
    expected_end = offset + header_length + length
    if expected_end > file_size:
        return True, (
            f"truncated file: {_PIXEL_DATA_TAGS[tag]} declares {length} bytes but the file ends "
            f"{expected_end - file_size} bytes early"
        )
    return True, None


def read_header(path: str) -> tuple[pydicom.Dataset, bool, str | None]:
    """Read a file's header only and check its pixel data element.

    Returns:
        ``(dataset, has_pixel_data, truncation_problem)``.

    Raises:
        InvalidDicomError: not a DICOM file.
    """
    with open(path, "rb") as stream:
        try:
            dataset = pydicom.dcmread(stream, stop_before_pixels=True)
        except InvalidDicomError:
            # files without the 128-byte preamble (old exports) start directly with group 0008
            stream.seek(0)
            if stream.read(2) not in (b"\x08\x00", b"\x02\x00"):
                raise
            stream.seek(0)
            dataset = pydicom.dcmread(stream, stop_before_pixels=True, force=True)
        has_pixel_data, problem = _pixel_element_problem(path, stream, dataset)
    return dataset, has_pixel_data, problem


def _functional_group_item(dataset: pydicom.Dataset, frame_index: int, sequence_name: str) -> pydicom.Dataset | None:
    """The first item of a functional group macro for a frame: per-frame first, then shared."""
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame_index < len(per_frame):
        sequence = per_frame[frame_index].get(sequence_name)
        if sequence:
            return sequence[0]
    shared = dataset.get("SharedFunctionalGroupsSequence")
    if shared:
        sequence = shared[0].get(sequence_name)
        if sequence:
            return sequence[0]
    return None


def _header_summary(dataset: pydicom.Dataset, transfer_syntax_uid: str) -> dict[str, Any]:
    """The series-level attributes we keep (no patient data)."""
    return {
        "modality": str(dataset.get("Modality", "") or "OT"),
        "study_uid": str(dataset.get("StudyInstanceUID", "")),
        "frame_of_reference_uid": str(dataset.get("FrameOfReferenceUID", "")) or None,
        "sop_class_uid": str(dataset.get("SOPClassUID", "")),
        "rows": int(dataset.Rows),
        "cols": int(dataset.Columns),
        "samples_per_pixel": int(dataset.get("SamplesPerPixel", 1) or 1),
        "photometric_interpretation": str(dataset.get("PhotometricInterpretation", "MONOCHROME2")),
        "bits_stored": int(dataset.get("BitsStored", dataset.get("BitsAllocated", 16)) or 16),
        "pixel_representation": int(dataset.get("PixelRepresentation", 0) or 0),
        "transfer_syntax_uid": transfer_syntax_uid,
        "gantry_tilt": _optional_float(dataset.get("GantryDetectorTilt")),
    }


def frame_records(path: str, dataset: pydicom.Dataset) -> list[FrameRecord]:
    """One record per frame of a file (one for a single-frame file)."""
    file_meta = getattr(dataset, "file_meta", None)
    transfer_syntax_uid = str(file_meta.get("TransferSyntaxUID", "")) if file_meta is not None else ""
    if not transfer_syntax_uid:
        transfer_syntax_uid = pydicom.uid.ImplicitVRLittleEndian  # files without meta header
    series_uid = str(dataset.SeriesInstanceUID)
    sop_instance_uid = str(dataset.get("SOPInstanceUID", ""))
    instance_number = _optional_int(dataset.get("InstanceNumber"))
    header = _header_summary(dataset, transfer_syntax_uid)
    number_of_frames = _optional_int(dataset.get("NumberOfFrames")) or 1
    has_functional_groups = "PerFrameFunctionalGroupsSequence" in dataset or "SharedFunctionalGroupsSequence" in dataset

    if number_of_frames == 1 and not has_functional_groups:
        spacing = _float_tuple(dataset.get("PixelSpacing"), 2) or _float_tuple(dataset.get("ImagerPixelSpacing"), 2)
        return [
            FrameRecord(
                ref=SliceRef(
                    path=path,
                    frame_index=None,
                    sop_instance_uid=sop_instance_uid,
                    position=_float_tuple(dataset.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
                    instance_number=instance_number,
                    rescale_slope=_optional_float(dataset.get("RescaleSlope")) or 1.0,
                    rescale_intercept=_optional_float(dataset.get("RescaleIntercept")) or 0.0,
                    transfer_syntax_uid=transfer_syntax_uid,
                ),
                series_uid=series_uid,
                orientation=_float_tuple(dataset.get("ImageOrientationPatient"), 6),
                pixel_spacing=spacing,  # type: ignore[arg-type]
                slice_thickness=_optional_float(dataset.get("SpacingBetweenSlices"))
                or _optional_float(dataset.get("SliceThickness")),
                header=header,
            )
        ]

    records = []
    header = dict(header, multiframe=True)
    for frame_index in range(number_of_frames):
        plane_position = _functional_group_item(dataset, frame_index, "PlanePositionSequence")
        plane_orientation = _functional_group_item(dataset, frame_index, "PlaneOrientationSequence")
        pixel_measures = _functional_group_item(dataset, frame_index, "PixelMeasuresSequence")
        value_transformation = _functional_group_item(dataset, frame_index, "PixelValueTransformationSequence")
        position = _float_tuple(plane_position.get("ImagePositionPatient"), 3) if plane_position else None
        orientation = _float_tuple(plane_orientation.get("ImageOrientationPatient"), 6) if plane_orientation else None
        # multi-frame objects without functional groups (cine, legacy) keep top-level attributes
        position = position or (None if has_functional_groups else _float_tuple(dataset.get("ImagePositionPatient"), 3))
        orientation = orientation or _float_tuple(dataset.get("ImageOrientationPatient"), 6)
        spacing_source = pixel_measures if pixel_measures is not None else dataset
        spacing = _float_tuple(spacing_source.get("PixelSpacing"), 2) or _float_tuple(dataset.get("PixelSpacing"), 2)
        thickness = _optional_float(spacing_source.get("SpacingBetweenSlices")) or _optional_float(
            spacing_source.get("SliceThickness")
        )
        rescale_source = value_transformation if value_transformation is not None else dataset
        records.append(
            FrameRecord(
                ref=SliceRef(
                    path=path,
                    frame_index=frame_index,
                    sop_instance_uid=sop_instance_uid,
                    position=position,  # type: ignore[arg-type]
                    instance_number=instance_number,
                    rescale_slope=_optional_float(rescale_source.get("RescaleSlope")) or 1.0,
                    rescale_intercept=_optional_float(rescale_source.get("RescaleIntercept")) or 0.0,
                    transfer_syntax_uid=transfer_syntax_uid,
                ),
                series_uid=series_uid,
                orientation=orientation,
                pixel_spacing=spacing,  # type: ignore[arg-type]
                slice_thickness=thickness,
                header=header,
            )
        )
    return records


def skip_reason(dataset: pydicom.Dataset, has_pixel_data: bool) -> str | None:
    """Why a readable DICOM file is not an image to analyse (``None`` when it is one)."""
    file_meta = getattr(dataset, "file_meta", None)
    media_sop_class = str(file_meta.get("MediaStorageSOPClassUID", "")) if file_meta is not None else ""
    sop_class = str(dataset.get("SOPClassUID", "")) or media_sop_class
    if sop_class == _MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in dataset:
        return "DICOMDIR (media directory index, no image)"
    if sop_class in _DERIVED_SOP_CLASSES:
        return f"derived object ({_DERIVED_SOP_CLASSES[sop_class]}), not an image to analyse"
    sop_name = UID(sop_class).name if sop_class else "unknown SOP class"
    if not has_pixel_data:
        if ("Rows" in dataset and "Columns" in dataset) or "Image Storage" in sop_name:
            return f"image object without pixel data ({sop_name}): file truncated or corrupt"
        return f"no pixel data ({sop_name})"
    if "SeriesInstanceUID" not in dataset:
        return "no SeriesInstanceUID"
    if "Rows" not in dataset or "Columns" not in dataset:
        return "no Rows/Columns in the image header"
    return None


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    row_direction = np.asarray(orientation[:3], dtype=np.float64)
    column_direction = np.asarray(orientation[3:], dtype=np.float64)
    normal = np.cross(row_direction, column_direction)
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 0 else np.array([0.0, 0.0, 1.0])


def order_records(records: list[FrameRecord], normal: np.ndarray | None) -> list[FrameRecord]:
    def key(record: FrameRecord) -> tuple:
        ref = record.ref
        distance = float(np.dot(normal, ref.position)) if (normal is not None and ref.position is not None) else 0.0
        return (distance, ref.instance_number if ref.instance_number is not None else 0, ref.frame_index or 0, ref.path)

    return sorted(records, key=key)


def split_repeated_positions(
    records: list[FrameRecord], normal: np.ndarray
) -> tuple[list[list[FrameRecord]], str | None]:
    """Split a stack whose positions repeat (echoes, phases) into one stack per repetition."""
    # records arrive sorted along the normal: consecutive ones closer than the tolerance share a position
    by_distance: dict[float, list[FrameRecord]] = {}
    current: float | None = None
    for record in records:
        if record.ref.position is None:
            raise ValueError(
                f"{record.ref.path}: frame without a position (split_repeated_positions needs every frame's)"
            )
        distance = float(np.dot(normal, record.ref.position))
        if current is None or distance - current > _POSITION_TOLERANCE_MM:
            current = distance
            by_distance[current] = []
        by_distance[current].append(record)
    multiplicities = {len(group) for group in by_distance.values()}
    if multiplicities == {1}:
        return [records], None
    if len(multiplicities) == 1:
        repeat = multiplicities.pop()
        stacks: list[list[FrameRecord]] = [[] for _ in range(repeat)]
        for distance in sorted(by_distance):
            for stack, record in zip(stacks, by_distance[distance]):  # already in instance order
                stack.append(record)
        return stacks, f"every slice position appears {repeat} times (echoes/phases?): split into {repeat} stacks"
    duplicates = sum(len(group) - 1 for group in by_distance.values())
    note = f"{duplicates} repeated slice position(s) with uneven repetition: kept in place, geometry is unreliable"
    return [records], note


def geometry_warnings(
    positions: np.ndarray, normal: np.ndarray, gantry_tilt: float | None
) -> tuple[float | None, list[str]]:
    """Median slice spacing along the normal and warnings on gaps, uneven spacing and tilt."""
    messages: list[str] = []
    if len(positions) < 2:
        return None, messages
    distances = positions @ normal
    steps = np.diff(distances)
    median_step = float(np.median(steps))
    if median_step <= 1e-6:
        return None, ["slices share the same position: slice spacing unknown"]
    tolerance = _SPACING_TOLERANCE * median_step + 1e-3
    uneven = np.abs(steps - median_step) > tolerance
    if uneven.any():
        ratios = steps[uneven] / median_step
        gap_count = int(np.sum(np.maximum(np.round(ratios) - 1, 0)[ratios > 1.5]))
        if gap_count:
            gap_after = [int(i) for i in np.flatnonzero(uneven)[ratios > 1.5]][:10]
            messages.append(
                f"about {gap_count} missing slice(s): gaps after sorted slice(s) {gap_after} "
                f"(median spacing {median_step:.4g} mm); the volume stacks the slices as if evenly spaced"
            )
        if (ratios <= 1.5).any():
            messages.append(
                f"uneven slice spacing: steps from {steps.min():.4g} to {steps.max():.4g} mm "
                f"(median {median_step:.4g} mm); the NIfTI geometry is approximate"
            )
    step_direction = positions[-1] - positions[0]
    step_direction = step_direction / (np.linalg.norm(step_direction) or 1.0)
    angle = math.degrees(math.acos(min(1.0, abs(float(np.dot(step_direction, normal))))))
    if angle > _TILT_TOLERANCE_DEGREES or (gantry_tilt is not None and abs(gantry_tilt) > _TILT_TOLERANCE_DEGREES):
        tilt = angle if angle > _TILT_TOLERANCE_DEGREES else abs(gantry_tilt or 0.0)
        messages.append(
            f"tilted gantry / sheared stack: slices are offset {tilt:.2f} degrees from the slice normal; "
            "the affine keeps the true slice step (a sheared NIfTI sform; the qform is its nearest rotation)"
        )
    return median_step, messages


def series_affine(series: SeriesInfo) -> np.ndarray:
    """The 4x4 RAS affine of a series for voxel indices ``(column, row, slice)``.

    Columns of the matrix: row direction x column spacing, column direction x row spacing, the
    mean step between consecutive sorted slice positions (equal to normal x slice spacing unless
    the stack is tilted or sheared, which it then preserves), and the first slice position.

    Args:
        series: a discovered series.

    Returns:
        float64 array (4, 4), RAS+ mm (DICOM LPS with x and y negated).
    """
    row_spacing, column_spacing, slice_spacing = series.spacing
    row_direction = np.asarray(series.orientation[:3], dtype=np.float64)
    column_direction = np.asarray(series.orientation[3:], dtype=np.float64)
    if series.has_geometry and len(series.positions) > 1:
        positions = np.asarray(series.positions, dtype=np.float64)
        slice_step = (positions[-1] - positions[0]) / (len(positions) - 1)
    else:
        slice_step = slice_normal(series.orientation) * slice_spacing
    origin = np.asarray(series.positions[0], dtype=np.float64) if series.positions else np.zeros(3)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_direction * column_spacing
    affine_lps[:3, 1] = column_direction * row_spacing
    affine_lps[:3, 2] = slice_step
    affine_lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
