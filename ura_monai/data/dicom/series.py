"""The objects a DICOM folder scan gives: a series (:class:`SeriesInfo`), its frames (:class:`SliceRef`) and the
files left out (:class:`SkippedFile`). Pure data: no file is read here."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.uid import UID

from ura_monai.utils.paths import safe_name

__all__ = ["SeriesInfo", "SkippedFile", "SliceRef"]


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
    def shape(self) -> tuple[int, int, int]:
        """``(slices, rows, cols)`` of :func:`ura_monai.data.dicom.load_series_volume`'s volume."""
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
