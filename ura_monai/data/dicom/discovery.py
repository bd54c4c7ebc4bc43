"""DICOM series discovery: a folder tree scanned header-only, files grouped into series by
``SeriesInstanceUID`` and split into stacks (size, colour layout, orientation, repeated positions), frames
ordered along the slice normal."""

from __future__ import annotations

import logging
import os
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
from pydicom.errors import InvalidDicomError

from ura_monai.data.dicom.headers import (
    FrameRecord,
    frame_records,
    geometry_warnings,
    order_records,
    read_header,
    skip_reason,
    slice_normal,
    split_repeated_positions,
)
from ura_monai.data.dicom.pixels import missing_decoder_message
from ura_monai.data.dicom.series import SeriesInfo, SkippedFile
from ura_monai.utils.paths import IGNORED_NAMES, special_file_reason

__all__ = ["discover_series"]

logger = logging.getLogger("ura_monai.data.dicom")

# largest difference between direction cosines of frames of one stack
_ORIENTATION_TOLERANCE = 1e-3


def _group_records(records: list[FrameRecord]) -> dict[tuple, list[FrameRecord]]:
    """The frames of one SeriesInstanceUID by (rows, cols, samples per pixel, orientation)."""
    # frames of one volume share size, colour layout and orientation; localizers do not
    # (orientations are compared with a tolerance: exported cosines jitter in the last digits)
    groups: dict[tuple, list[FrameRecord]] = defaultdict(list)
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
    return groups


def _ordered_stacks(groups: dict[tuple, list[FrameRecord]]) -> list[tuple[list[FrameRecord], list[str]]]:
    """Each group ordered along its normal (split where positions repeat), with the notes that go with it."""
    stacks: list[tuple[list[FrameRecord], list[str]]] = []
    split_note = (
        [f"one SeriesInstanceUID holds {len(groups)} differently sized or oriented stacks: analysed separately"]
        if len(groups) > 1
        else []
    )
    for group_records in groups.values():
        orientation = group_records[0].orientation
        with_geometry = orientation is not None and all(r.ref.position is not None for r in group_records)
        if with_geometry:
            normal = slice_normal(orientation)  # type: ignore[arg-type]
            ordered = order_records(group_records, normal)
            parts, note = split_repeated_positions(ordered, normal)
            for part in parts:
                stacks.append((part, split_note + ([note] if note else [])))
        else:
            stacks.append((order_records(group_records, None), list(split_note)))
    return stacks


def _content_warnings(stack_records: list[FrameRecord]) -> list[str]:
    """Decoders missing for the stack's transfer syntaxes, unsupported or palette colour layouts."""
    header = stack_records[0].header
    messages = []
    for transfer_syntax_uid in sorted({r.ref.transfer_syntax_uid for r in stack_records}):
        message = missing_decoder_message(transfer_syntax_uid)
        if message:
            messages.append(message)
    if header["samples_per_pixel"] not in (1, 3):
        messages.append(f"unsupported SamplesPerPixel={header['samples_per_pixel']}")
    if header["photometric_interpretation"] == "PALETTE COLOR":
        messages.append("PALETTE COLOR images are analysed as palette indices (no colour lookup)")
    return messages


def _stack_info(
    stack_records: list[FrameRecord], notes: list[str], stack_index: int | None, skipped: list[SkippedFile]
) -> SeriesInfo:
    """The :class:`SeriesInfo` of one ordered stack: spacing, geometry and content warnings."""
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
        normal = slice_normal(orientation)  # type: ignore[arg-type]
        slice_spacing, geometry_notes = geometry_warnings(
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
    warnings_list.extend(_content_warnings(stack_records))
    if skipped:
        warnings_list.append(f"{len(skipped)} file(s) of this series skipped (see skipped_files)")
    return SeriesInfo(
        uid=first.series_uid,
        modality=header["modality"],
        files=list(dict.fromkeys(r.ref.path for r in stack_records)),
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
        stack_index=stack_index,
        skipped_files=list(skipped),
    )


def _build_series(records: list[FrameRecord], skipped_by_series: dict[str, list[SkippedFile]]) -> list[SeriesInfo]:
    """Group the frames of one SeriesInstanceUID into one or more ordered stacks."""
    series_uid = records[0].series_uid
    stacks = _ordered_stacks(_group_records(records))
    return [
        _stack_info(
            stack_records,
            notes,
            stack_number if len(stacks) > 1 else None,
            # the series' skipped files are reported with its first stack
            skipped_by_series.get(series_uid, []) if stack_number == 1 else [],
        )
        for stack_number, (stack_records, notes) in enumerate(stacks, start=1)
    ]


def _scan_file(path: str, records_by_series: dict[str, list[FrameRecord]], skipped: list[SkippedFile]) -> None:
    """Read one file's header: its frames go to ``records_by_series``, or the file to ``skipped`` with a reason."""
    special = special_file_reason(path)
    if special is not None:  # a FIFO would block the header read forever; a dangling link says nothing
        skipped.append(SkippedFile(path, special))
        return
    try:
        # pydicom warns about odd values, quoting them: keep element values out of logs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset, has_pixel_data, truncation = read_header(path)
            reason = skip_reason(dataset, has_pixel_data)
            series_uid = str(dataset.get("SeriesInstanceUID", "")) or None
            if reason is None and truncation:
                reason = truncation
            if reason is not None:
                # an image file of a known series (e.g. truncated) is reported with that series
                is_image_file = "Rows" in dataset and "Columns" in dataset
                skipped.append(SkippedFile(path, reason, series_uid if is_image_file else None))
                return
            records_by_series[str(series_uid)].extend(frame_records(path, dataset))
    except InvalidDicomError:
        skipped.append(SkippedFile(path, "not a DICOM file (no DICM preamble)"))
    except Exception as error:  # any corrupt header: report it and keep scanning
        skipped.append(SkippedFile(path, f"unreadable DICOM header: {type(error).__name__}: {error}"))


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

    records_by_series: dict[str, list[FrameRecord]] = defaultdict(list)
    skipped: list[SkippedFile] = []

    def unreadable(error: OSError) -> None:  # os.walk drops an unreadable sub-folder silently otherwise
        skipped.append(SkippedFile(str(error.filename), f"unreadable folder: {error.strerror or error}"))

    for folder, folder_names, file_names in os.walk(root_path, onerror=unreadable):
        folder_names.sort()
        for file_name in sorted(file_names):
            path = os.path.join(folder, file_name)
            if file_name.lower() in IGNORED_NAMES:
                continue
            _scan_file(path, records_by_series, skipped)

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
