"""DICOM series discovery, geometry and lazy slice reading.

A folder exported from a PACS is scanned header-only (``pydicom.dcmread(stop_before_pixels=True)``),
files are grouped into series by ``SeriesInstanceUID`` and slices are ordered by their position
along the slice normal (not by ``InstanceNumber``, which scanners and exporters do not keep
monotonic). Single-frame series and multi-frame objects (enhanced CT/MR, Ophthalmic Tomography
where each frame is an OCT B-scan) give the same :class:`SeriesInfo`.

Conventions
    * A series volume is a float32 array ``[slices, rows, cols]`` (frame ``k`` of the sorted series
      is ``volume[k]``; for OCT, a B-scan).
    * Its affine is a 4x4 NIfTI-style matrix in RAS+ millimetres for the voxel index order
      ``(i, j, k) = (column, row, slice)``, i.e. for the array ``volume.transpose(2, 1, 0)``: the
      layout written by dcm2niix, ITK/SimpleITK and MONAI's ``ITKReader``. It is built from the DICOM
      LPS geometry (ImagePositionPatient, ImageOrientationPatient, PixelSpacing and the actual
      step between sorted slice positions) with the x and y axes negated.
    * No patient-identifying attribute is stored in these objects or written to logs: series are
      named by their ``SeriesInstanceUID``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from ura_monai.utils.paths import IGNORED_NAMES, is_within, safe_child, safe_name, special_file_reason

__all__ = [
    "DicomDecodeError",
    "SeriesInfo",
    "SkippedFile",
    "SliceRef",
    "compute_intensity_window",
    "dicom_slice_datalist",
    "discover_series",
    "iter_series_slices",
    "iteration_shape",
    "load_series_volume",
    "read_slice_pixels",
    "series_affine",
]

logger = logging.getLogger(__name__)

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
_LUMINANCE_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601
# pip names of the packages behind pydicom's decoding plugins
_PIP_NAMES = {"gdcm": "python-gdcm"}

# relative tolerance on slice steps before a series is called unevenly spaced
_SPACING_TOLERANCE = 0.05
# largest difference between direction cosines of frames of one stack
_ORIENTATION_TOLERANCE = 1e-3
# slices closer than this along the normal (mm) are at the same position
_POSITION_TOLERANCE_MM = 1e-2
# smallest angle (degrees) between the slice step and the slice normal reported as a tilt
_TILT_TOLERANCE_DEGREES = 0.5


class DicomDecodeError(RuntimeError):
    """Pixel data could not be decoded; the message says which package to install when relevant."""


@dataclass
class SkippedFile:
    """A file that is not part of any analysable series.

    Attributes:
        path: the file path.
        reason: why it was skipped (human readable, no patient data).
        series_uid: the SeriesInstanceUID when the header could be read (e.g. a truncated slice).
    """

    path: str
    reason: str
    series_uid: str | None = None


@dataclass(frozen=True)
class SliceRef:
    """Where one 2D frame of a series lives and how to rescale it.

    Attributes:
        path: the file.
        frame_index: 0-based frame number in a multi-frame file; ``None`` for a single-frame file.
        sop_instance_uid: the SOPInstanceUID of the file.
        position: ImagePositionPatient (LPS, mm) of the frame's first voxel, ``None`` when absent.
        instance_number: InstanceNumber, used only as a tie-breaker.
        rescale_slope: RescaleSlope (1 when absent).
        rescale_intercept: RescaleIntercept (0 when absent).
        transfer_syntax_uid: the file's transfer syntax.
    """

    path: str
    frame_index: int | None
    sop_instance_uid: str
    position: tuple[float, float, float] | None
    instance_number: int | None
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    transfer_syntax_uid: str = pydicom.uid.ExplicitVRLittleEndian


@dataclass
class SeriesInfo:
    """One image series (or one stack of it), ordered along the slice normal.

    Attributes:
        uid: SeriesInstanceUID.
        modality: Modality (e.g. ``"MR"``, ``"OPT"``).
        files: the series' files in slice order (each once).
        num_frames: number of 2D frames (slices / B-scans) in the volume.
        rows: Rows of every frame.
        cols: Columns of every frame.
        spacing: ``(row spacing, column spacing, slice spacing)`` in mm; ``PixelSpacing`` gives the
            first two (distance between rows, between columns), the slice spacing is the median
            distance between consecutive positions along the normal.
        orientation: ImageOrientationPatient (row direction cosines, then column direction cosines).
        positions: ImagePositionPatient of each sorted frame (LPS mm); empty without geometry.
        is_multiframe: whether the frames come from multi-frame objects.
        warnings: geometry or content problems found (missing slices, uneven spacing, tilt, ...).
        slices: one :class:`SliceRef` per sorted frame.
        study_uid: StudyInstanceUID.
        frame_of_reference_uid: FrameOfReferenceUID (``None`` when absent).
        sop_class_uid: SOPClassUID of the source objects.
        samples_per_pixel: 1 for grayscale, 3 for colour.
        photometric_interpretation: PhotometricInterpretation.
        bits_stored: BitsStored.
        pixel_representation: 0 unsigned, 1 signed.
        has_geometry: whether positions and orientation were found (else the affine is a
            spacing-only placeholder and slices are in InstanceNumber / frame order).
        stack_index: 1-based stack number when one SeriesInstanceUID held several stacks
            (different orientations or sizes, repeated positions), else ``None``.
        skipped_files: files of this series that were left out (e.g. truncated).
    """

    uid: str
    modality: str
    files: list[str]
    num_frames: int
    rows: int
    cols: int
    spacing: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    positions: list[tuple[float, float, float]]
    is_multiframe: bool
    warnings: list[str] = field(default_factory=list)
    slices: list[SliceRef] = field(default_factory=list)
    study_uid: str = ""
    frame_of_reference_uid: str | None = None
    sop_class_uid: str = ""
    samples_per_pixel: int = 1
    photometric_interpretation: str = "MONOCHROME2"
    bits_stored: int = 16
    pixel_representation: int = 0
    has_geometry: bool = True
    stack_index: int | None = None
    skipped_files: list[SkippedFile] = field(default_factory=list)

    @property
    def name(self) -> str:
        """A file-system safe name for outputs: the UID, plus ``_stackN`` for split series.

        The UID comes from the file, so it may hold anything (``../``, ``/``): it is reduced to one portable path
        component, with a short hash of the original added when that changed it (two UIDs never share a name).
        """
        name = safe_name(self.uid, fallback="series")
        if name != self.uid:
            name = f"{name}-{hashlib.sha1(self.uid.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
        return name if self.stack_index is None else f"{name}_stack{self.stack_index}"

    @property
    def num_slices(self) -> int:
        """Alias of :attr:`num_frames`."""
        return self.num_frames

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(slices, rows, cols)`` of :func:`load_series_volume`'s volume."""
        return (self.num_frames, self.rows, self.cols)

    @property
    def is_rgb(self) -> bool:
        return self.samples_per_pixel == 3

    @property
    def sop_class_name(self) -> str:
        return UID(self.sop_class_uid).name if self.sop_class_uid else ""

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly description (no patient data) for reports and logs."""
        return {
            "series_uid": self.uid,
            "stack_index": self.stack_index,
            "modality": self.modality,
            "sop_class": self.sop_class_name,
            "num_files": len(self.files),
            "num_frames": self.num_frames,
            "rows": self.rows,
            "cols": self.cols,
            "spacing_mm": [round(float(s), 6) for s in self.spacing],
            "orientation": [round(float(c), 6) for c in self.orientation],
            "is_multiframe": self.is_multiframe,
            "samples_per_pixel": self.samples_per_pixel,
            "photometric_interpretation": self.photometric_interpretation,
            "has_geometry": self.has_geometry,
            "warnings": list(self.warnings),
        }


# --------------------------------------------------------------------------------------------
# header reading
# --------------------------------------------------------------------------------------------


@dataclass
class _FrameRecord:
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


def _read_header(path: str) -> tuple[pydicom.Dataset, bool, str | None]:
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


def _frame_records(path: str, dataset: pydicom.Dataset) -> list[_FrameRecord]:
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
            _FrameRecord(
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
            _FrameRecord(
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


def _skip_reason(dataset: pydicom.Dataset, has_pixel_data: bool) -> str | None:
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
# grouping and geometry
# --------------------------------------------------------------------------------------------


def _normal(orientation: Sequence[float]) -> np.ndarray:
    row_direction = np.asarray(orientation[:3], dtype=np.float64)
    column_direction = np.asarray(orientation[3:], dtype=np.float64)
    normal = np.cross(row_direction, column_direction)
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 0 else np.array([0.0, 0.0, 1.0])


def _missing_decoder_message(transfer_syntax_uid: str) -> str | None:
    """A message naming the packages to install when no decoder is available, else ``None``."""
    try:
        decoder = pydicom.pixels.get_decoder(UID(transfer_syntax_uid))
    except NotImplementedError:
        return f"transfer syntax {UID(transfer_syntax_uid).name} ({transfer_syntax_uid}) is not supported by pydicom"
    if decoder.is_available:
        return None
    return f"no decoder installed for {UID(transfer_syntax_uid).name} ({transfer_syntax_uid}): " + _install_hint(
        decoder.missing_dependencies
    )


def _install_hint(missing_dependencies: Sequence[str]) -> str:
    """Turn pydicom's ``'plugin - requires a>=1 and b>=2'`` strings into pip commands."""
    commands = []
    for entry in missing_dependencies:
        requirement = entry.split("requires", 1)[-1]
        packages = [re.split(r"[<>=!~ ]", part.strip())[0] for part in requirement.split(" and ")]
        packages = [_PIP_NAMES.get(p, p) for p in packages if p]
        if packages:
            commands.append("`pip install " + " ".join(packages) + "`")
    return "install one of: " + " or ".join(commands) if commands else "install a pydicom pixel data plugin"


def _order_records(records: list[_FrameRecord], normal: np.ndarray | None) -> list[_FrameRecord]:
    def key(record: _FrameRecord) -> tuple:
        ref = record.ref
        distance = float(np.dot(normal, ref.position)) if (normal is not None and ref.position is not None) else 0.0
        return (distance, ref.instance_number if ref.instance_number is not None else 0, ref.frame_index or 0, ref.path)

    return sorted(records, key=key)


def _split_repeated_positions(
    records: list[_FrameRecord], normal: np.ndarray
) -> tuple[list[list[_FrameRecord]], str | None]:
    """Split a stack whose positions repeat (echoes, phases) into one stack per repetition."""
    # records arrive sorted along the normal: consecutive ones closer than the tolerance share a position
    by_distance: dict[float, list[_FrameRecord]] = {}
    current: float | None = None
    for record in records:
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
        stacks: list[list[_FrameRecord]] = [[] for _ in range(repeat)]
        for distance in sorted(by_distance):
            for stack, record in zip(stacks, by_distance[distance]):  # already in instance order
                stack.append(record)
        return stacks, f"every slice position appears {repeat} times (echoes/phases?): split into {repeat} stacks"
    duplicates = sum(len(group) - 1 for group in by_distance.values())
    note = f"{duplicates} repeated slice position(s) with uneven repetition: kept in place, geometry is unreliable"
    return [records], note


def _geometry_warnings(
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


def _build_series(records: list[_FrameRecord], skipped_by_series: dict[str, list[SkippedFile]]) -> list[SeriesInfo]:
    """Group the frames of one SeriesInstanceUID into one or more ordered stacks."""
    series_uid = records[0].series_uid
    # frames of one volume share size, colour layout and orientation; localizers do not
    # (orientations are compared with a tolerance: exported cosines jitter in the last digits)
    groups: dict[tuple, list[_FrameRecord]] = defaultdict(list)
    reference_orientations: list[tuple[float, ...]] = []
    for record in records:
        orientation_key: int | None = None
        if record.orientation is not None:
            for number, reference in enumerate(reference_orientations):
                if max(abs(a - b) for a, b in zip(record.orientation, reference)) < _ORIENTATION_TOLERANCE:
                    orientation_key = number
                    break
            else:
                reference_orientations.append(record.orientation)
                orientation_key = len(reference_orientations) - 1
        groups[
            (record.header["rows"], record.header["cols"], record.header["samples_per_pixel"], orientation_key)
        ].append(record)

    stacks: list[tuple[list[_FrameRecord], list[str]]] = []
    split_note = (
        [f"one SeriesInstanceUID holds {len(groups)} differently sized or oriented stacks: analysed separately"]
        if len(groups) > 1
        else []
    )
    for group_records in groups.values():
        orientation = group_records[0].orientation
        with_geometry = orientation is not None and all(r.ref.position is not None for r in group_records)
        if with_geometry:
            normal = _normal(orientation)  # type: ignore[arg-type]
            ordered = _order_records(group_records, normal)
            parts, note = _split_repeated_positions(ordered, normal)
            for part in parts:
                stacks.append((part, split_note + ([note] if note else [])))
        else:
            stacks.append((_order_records(group_records, None), list(split_note)))

    infos = []
    for stack_number, (stack_records, notes) in enumerate(stacks, start=1):
        first = stack_records[0]
        header = first.header
        warnings_list = list(notes)
        orientation = first.orientation
        has_geometry = orientation is not None and all(r.ref.position is not None for r in stack_records)
        pixel_spacing = first.pixel_spacing
        if pixel_spacing is None:
            pixel_spacing = (1.0, 1.0)
            warnings_list.append("no PixelSpacing: 1 mm assumed")
        positions = [r.ref.position for r in stack_records] if has_geometry else []
        slice_spacing = None
        if has_geometry:
            normal = _normal(orientation)  # type: ignore[arg-type]
            slice_spacing, geometry_notes = _geometry_warnings(
                np.asarray(positions, dtype=np.float64), normal, header.get("gantry_tilt")
            )
            warnings_list.extend(geometry_notes)
        else:
            orientation = orientation or (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
            warnings_list.append(
                "no patient geometry (ImagePositionPatient/ImageOrientationPatient): frames kept in "
                "InstanceNumber/frame order and the affine only carries the spacing"
            )
        if slice_spacing is None:
            slice_spacing = first.slice_thickness or 1.0
        transfer_syntaxes = sorted({r.ref.transfer_syntax_uid for r in stack_records})
        for transfer_syntax_uid in transfer_syntaxes:
            message = _missing_decoder_message(transfer_syntax_uid)
            if message:
                warnings_list.append(message)
        if header["samples_per_pixel"] not in (1, 3):
            warnings_list.append(f"unsupported SamplesPerPixel={header['samples_per_pixel']}")
        if header["photometric_interpretation"] == "PALETTE COLOR":
            warnings_list.append("PALETTE COLOR images are analysed as palette indices (no colour lookup)")
        files = list(dict.fromkeys(r.ref.path for r in stack_records))
        series_skipped = skipped_by_series.get(series_uid, []) if stack_number == 1 else []
        if series_skipped:
            warnings_list.append(f"{len(series_skipped)} file(s) of this series skipped (see skipped_files)")
        infos.append(
            SeriesInfo(
                uid=series_uid,
                modality=header["modality"],
                files=files,
                num_frames=len(stack_records),
                rows=header["rows"],
                cols=header["cols"],
                spacing=(float(pixel_spacing[0]), float(pixel_spacing[1]), float(slice_spacing)),
                orientation=tuple(float(v) for v in orientation),  # type: ignore[arg-type]
                positions=positions,  # type: ignore[arg-type]
                is_multiframe=bool(header.get("multiframe", False)),
                warnings=warnings_list,
                slices=[r.ref for r in stack_records],
                study_uid=header["study_uid"],
                frame_of_reference_uid=header["frame_of_reference_uid"],
                sop_class_uid=header["sop_class_uid"],
                samples_per_pixel=header["samples_per_pixel"],
                photometric_interpretation=header["photometric_interpretation"],
                bits_stored=header["bits_stored"],
                pixel_representation=header["pixel_representation"],
                has_geometry=has_geometry,
                stack_index=stack_number if len(stacks) > 1 else None,
                skipped_files=list(series_skipped),
            )
        )
    return infos


def discover_series(root: str | os.PathLike[str]) -> tuple[list[SeriesInfo], list[SkippedFile]]:
    """Scan a folder tree for DICOM image series, reading headers only.

    Files are grouped by SeriesInstanceUID (several series may share a folder, one series may span
    folders); frames are ordered by position along the slice normal. Files that are not DICOM,
    DICOMDIR, objects without pixel data (SR, presentation states, ...), derived objects (SEG,
    parametric maps) and unreadable or truncated files are returned as skipped with a reason.

    Args:
        root: the folder to scan (recursively; symbolic links to folders are not followed).

    Returns:
        ``(series, skipped)``: series sorted by UID (and stack), and the skipped files. A file of a
        known series that was skipped (e.g. truncated) is also listed in that series'
        ``skipped_files`` and counted in its warnings.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is not a folder.
    """
    root_path = Path(root)
    if not root_path.exists():
        raise FileNotFoundError(f"input folder not found: {root_path}")
    if not root_path.is_dir():
        raise NotADirectoryError(f"input must be a folder: {root_path}")

    records_by_series: dict[str, list[_FrameRecord]] = defaultdict(list)
    skipped: list[SkippedFile] = []

    def unreadable(error: OSError) -> None:  # os.walk drops an unreadable sub-folder silently otherwise
        skipped.append(SkippedFile(str(error.filename), f"unreadable folder: {error.strerror or error}"))

    for folder, folder_names, file_names in os.walk(root_path, onerror=unreadable):
        folder_names.sort()
        for file_name in sorted(file_names):
            path = os.path.join(folder, file_name)
            if file_name.lower() in IGNORED_NAMES:
                continue
            special = special_file_reason(path)
            if special is not None:  # a FIFO would block the header read forever; a dangling link says nothing
                skipped.append(SkippedFile(path, special))
                continue
            try:
                # pydicom warns about odd values, quoting them: keep element values out of logs
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    dataset, has_pixel_data, truncation = _read_header(path)
                    reason = _skip_reason(dataset, has_pixel_data)
                    series_uid = str(dataset.get("SeriesInstanceUID", "")) or None
                    if reason is None and truncation:
                        reason = truncation
                    if reason is not None:
                        # an image file of a known series (e.g. truncated) is reported with that series
                        is_image_file = "Rows" in dataset and "Columns" in dataset
                        skipped.append(SkippedFile(path, reason, series_uid if is_image_file else None))
                        continue
                    records_by_series[str(series_uid)].extend(_frame_records(path, dataset))
            except InvalidDicomError:
                skipped.append(SkippedFile(path, "not a DICOM file (no DICM preamble)"))
            except Exception as error:  # any corrupt header: report it and keep scanning
                skipped.append(SkippedFile(path, f"unreadable DICOM header: {type(error).__name__}: {error}"))

    skipped_by_series: dict[str, list[SkippedFile]] = defaultdict(list)
    for item in skipped:
        if item.series_uid is not None and item.series_uid in records_by_series:
            skipped_by_series[item.series_uid].append(item)
    series: list[SeriesInfo] = []
    for series_uid in sorted(records_by_series):
        series.extend(_build_series(records_by_series[series_uid], skipped_by_series))
    for info in series:
        logger.debug("series %s: %s %d frames %dx%d", info.name, info.modality, info.num_frames, info.rows, info.cols)
    return series, skipped


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
        slice_step = _normal(series.orientation) * slice_spacing
    origin = np.asarray(series.positions[0], dtype=np.float64) if series.positions else np.zeros(3)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_direction * column_spacing
    affine_lps[:3, 1] = column_direction * row_spacing
    affine_lps[:3, 2] = slice_step
    affine_lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps


# --------------------------------------------------------------------------------------------
# pixel reading
# --------------------------------------------------------------------------------------------


def _decode_error(error: Exception, ref: SliceRef) -> DicomDecodeError:
    location = os.path.basename(ref.path) + (f" frame {ref.frame_index + 1}" if ref.frame_index is not None else "")
    message = _missing_decoder_message(ref.transfer_syntax_uid)
    if message:
        return DicomDecodeError(f"cannot decode {location}: {message}")
    return DicomDecodeError(f"cannot decode {location}: {type(error).__name__}: {error}")


def read_slice_pixels(refs: Sequence[SliceRef]) -> list[np.ndarray]:
    """Decode frames lazily: only the requested frames, one file open per file and batch.

    Args:
        refs: the frames to read.

    Returns:
        one float32 array per ref, ``(rows, cols)`` or ``(rows, cols, 3)`` for colour, with
        RescaleSlope/RescaleIntercept applied to grayscale frames (YBR colour is converted to RGB).

    Raises:
        DicomDecodeError: pixel data missing, corrupt, or compressed without an installed decoder
            (the message names the package to install).
    """
    frames: list[np.ndarray | None] = [None] * len(refs)
    by_path: dict[str, list[int]] = defaultdict(list)
    for position, ref in enumerate(refs):
        by_path[ref.path].append(position)
    for path, positions in by_path.items():
        first = refs[positions[0]]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if first.frame_index is None:
                    arrays = [pydicom.pixels.pixel_array(path)]
                else:
                    indices = [refs[p].frame_index for p in positions]
                    arrays = list(pydicom.pixels.iter_pixels(path, indices=indices))
        except Exception as error:
            raise _decode_error(error, first) from error
        if len(arrays) != len(positions):
            raise DicomDecodeError(
                f"{os.path.basename(path)}: expected {len(positions)} frame(s), decoded {len(arrays)}"
            )
        for position, array in zip(positions, arrays):
            ref = refs[position]
            frame = np.asarray(array, dtype=np.float32)
            if frame.ndim == 2 and (ref.rescale_slope != 1.0 or ref.rescale_intercept != 0.0):
                frame = frame * np.float32(ref.rescale_slope) + np.float32(ref.rescale_intercept)
            frames[position] = frame
    return frames  # type: ignore[return-value]


def _to_luminance(frame: np.ndarray) -> np.ndarray:
    return frame @ _LUMINANCE_WEIGHTS if frame.ndim == 3 else frame


def compute_intensity_window(
    series: SeriesInfo,
    percentiles: tuple[float, float] = (0.5, 99.5),
    max_slices: int = 16,
    max_pixels_per_slice: int = 65536,
) -> tuple[float, float]:
    """A robust intensity window for mapping a series to [0, 1].

    Grayscale: the given percentiles of a subsample (``max_slices`` evenly spaced slices, strided
    pixels) of the rescaled values, so one hot pixel does not squash the contrast. Colour (RGB):
    the full range ``[0, 2**BitsStored - 1]``, which keeps colours as displayed.

    Args:
        series: the series.
        percentiles: lower and upper percentiles.
        max_slices: slices read for the estimate.
        max_pixels_per_slice: pixels kept per slice (by striding).

    Returns:
        ``(low, high)`` with ``high > low``.
    """
    if series.is_rgb:
        return 0.0, float(2 ** min(series.bits_stored, 16) - 1)
    count = min(max_slices, series.num_frames)
    chosen = sorted({int(round(i)) for i in np.linspace(0, series.num_frames - 1, count)})
    samples = []
    for frame in read_slice_pixels([series.slices[i] for i in chosen]):
        values = frame.ravel()
        stride = max(1, values.size // max_pixels_per_slice)
        samples.append(values[::stride])
    values = np.concatenate(samples)
    low, high = (float(v) for v in np.percentile(values, percentiles))
    if not high > low:
        high = low + 1.0
    return low, high


def _normalize(frames: np.ndarray, window: tuple[float, float], invert: bool) -> np.ndarray:
    low, high = window
    normalized = np.clip((frames - np.float32(low)) / np.float32(high - low), 0.0, 1.0)
    return (1.0 - normalized) if invert else normalized


def iteration_shape(series: SeriesInfo, axis: int = 0) -> tuple[int, int, int]:
    """``(number of 2D slices, height, width)`` when a series is cut along ``axis`` of ``[slices, rows, cols]``."""
    slices, rows, cols = series.shape
    return {0: (slices, rows, cols), 1: (rows, slices, cols), 2: (cols, slices, rows)}[_check_axis(axis)]


def _check_axis(axis: int) -> int:
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0 (DICOM slices / OCT B-scans), 1 (rows) or 2 (columns), got {axis}")
    return axis


def load_series_volume(
    series: SeriesInfo,
    out: np.ndarray | None = None,
    rgb: str = "luminance",
) -> tuple[np.ndarray, np.ndarray]:
    """Read a series into a volume, file by file, with its affine.

    Args:
        series: a discovered series.
        out: optional preallocated array (e.g. an ``np.memmap``) of shape ``[slices, rows, cols]``
            (``[slices, rows, cols, 3]`` with ``rgb="keep"``) to fill instead of allocating.
        rgb: for colour series, ``"luminance"`` (ITU-R BT.601 weights, a scalar volume that
            overlays like any other) or ``"keep"`` (a trailing channel axis of 3).

    Returns:
        ``(volume, affine)``: float32 volume ``[slices, rows, cols]`` with RescaleSlope/Intercept
        applied, and the RAS affine of :func:`series_affine` (for ``volume.transpose(2, 1, 0)``).

    Raises:
        DicomDecodeError: a frame cannot be decoded.
    """
    if rgb not in ("luminance", "keep"):
        raise ValueError(f"rgb must be 'luminance' or 'keep', got {rgb!r}")
    keep_channels = series.is_rgb and rgb == "keep"
    shape = series.shape + ((3,) if keep_channels else ())
    volume = np.empty(shape, dtype=np.float32) if out is None else out
    if tuple(volume.shape) != shape:
        raise ValueError(f"out has shape {tuple(volume.shape)}, expected {shape}")
    chunk = 32
    for start in range(0, series.num_frames, chunk):
        frames = read_slice_pixels(series.slices[start : start + chunk])
        for offset, frame in enumerate(frames):
            volume[start + offset] = frame if keep_channels else _to_luminance(frame)
    return volume, series_affine(series)


def iter_series_slices(
    series: SeriesInfo,
    batch_size: int = 16,
    axis: int = 0,
    window: tuple[float, float] | None = None,
    normalize: bool = True,
    rgb: str = "keep",
    scratch_dir: str | os.PathLike[str] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream a series as batches of 2D slices, reading pixel data lazily.

    Along ``axis=0`` (DICOM slices, OCT B-scans) only one batch of frames is decoded at a time, so
    memory does not grow with the number of slices. Along ``axis=1`` or ``2`` (reformatted rows or
    columns) the series is first streamed into an ``np.memmap`` in ``scratch_dir`` (a temporary
    folder when ``None``), then cut from it.

    Args:
        series: a discovered series.
        batch_size: slices per batch.
        axis: 0, 1 or 2 of the ``[slices, rows, cols]`` volume.
        window: intensity window for normalization; :func:`compute_intensity_window` when ``None``.
        normalize: map to [0, 1] with the window (MONOCHROME1 inverted so bright means high signal);
            ``False`` yields rescaled values.
        rgb: colour series: ``"keep"`` yields 3 channels, ``"luminance"`` one.
        scratch_dir: folder for the memmap used when ``axis != 0``.

    Yields:
        ``(slice_indices, images)``: int64 indices along ``axis`` (consecutive) and float32
        ``(N, C, H, W)`` images, ``C`` 1 or 3, ``(H, W)`` as given by :func:`iteration_shape`.
    """
    _check_axis(axis)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if rgb not in ("luminance", "keep"):
        raise ValueError(f"rgb must be 'luminance' or 'keep', got {rgb!r}")
    keep_channels = series.is_rgb and rgb == "keep"
    if normalize and window is None:
        window = compute_intensity_window(series)
    invert = series.photometric_interpretation == "MONOCHROME1"

    def prepare(frames: list[np.ndarray]) -> np.ndarray:
        stacked = np.stack([f if keep_channels else _to_luminance(f) for f in frames]).astype(np.float32, copy=False)
        if normalize:
            stacked = _normalize(stacked, window, invert)  # type: ignore[arg-type]
        # (N, H, W[, 3]) -> (N, C, H, W)
        return np.ascontiguousarray(stacked.transpose(0, 3, 1, 2) if keep_channels else stacked[:, None])

    if axis == 0:
        for start in range(0, series.num_frames, batch_size):
            stop = min(start + batch_size, series.num_frames)
            yield np.arange(start, stop, dtype=np.int64), prepare(read_slice_pixels(series.slices[start:stop]))
        return

    import tempfile

    with tempfile.TemporaryDirectory(prefix=".ura-slices-", dir=scratch_dir) as temporary_folder:
        channels = 3 if keep_channels else 1
        volume = np.memmap(
            os.path.join(temporary_folder, "volume.f32"), dtype=np.float32, mode="w+", shape=series.shape + (channels,)
        )
        for start in range(0, series.num_frames, batch_size):
            stop = min(start + batch_size, series.num_frames)
            batch = prepare(read_slice_pixels(series.slices[start:stop]))  # (N, C, H, W)
            volume[start:stop] = batch.transpose(0, 2, 3, 1)
        volume.flush()
        length = volume.shape[axis]
        for start in range(0, length, batch_size):
            stop = min(start + batch_size, length)
            if axis == 1:  # volume[:, r] is (slices, cols, C)
                block = np.asarray(volume[:, start:stop]).transpose(1, 3, 0, 2)
            else:  # volume[:, :, c] is (slices, rows, C)
                block = np.asarray(volume[:, :, start:stop]).transpose(2, 3, 0, 1)
            yield np.arange(start, stop, dtype=np.int64), np.ascontiguousarray(block)
        del volume


# --------------------------------------------------------------------------------------------
# training datalist
# --------------------------------------------------------------------------------------------


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
    from ura_monai.utils.fileio import atomic_path, atomic_write_text

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
        parameters = {"axis": axis, "slice_step": slice_step, "percentiles": list(percentiles), "rgb": rgb}
        settings_path = series_folder / "slices.json"
        reuse = (
            not overwrite
            and settings_path.exists()
            and json.loads(settings_path.read_text()).get("parameters") == parameters
        )
        try:
            series_items: list[dict[str, Any]] = []
            if reuse:
                series_items = json.loads(settings_path.read_text())["items"]
            else:
                window = compute_intensity_window(series, percentiles)
                for indices, images in iter_series_slices(
                    series, batch_size, axis=axis, window=window, rgb=rgb, scratch_dir=cache_path
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
        except Exception as error:
            logger.warning("series %s left out of the datalist: %s", series.name, error)
            continue
        for entry in series_items:
            if entry["foreground"] < min_foreground_fraction:
                continue
            items.append(
                {
                    "image": entry["image"],
                    "label": 0,
                    "mask": None,
                    "has_mask": False,
                    "defect_type": "good",
                    "category": series.uid,
                    "series_uid": series.uid,
                    "slice_index": entry["slice_index"],
                }
            )
    return items
