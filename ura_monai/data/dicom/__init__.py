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

The package is split along those jobs: :mod:`.series` (the data objects), :mod:`.headers` (header reading and
geometry), :mod:`.discovery` (folder scan and grouping into series), :mod:`.pixels` (lazy decoding, windowing,
slice streaming) and :mod:`.datalists` (cached training slices). Import from ``ura_monai.data.dicom``.
"""

from ura_monai.data.dicom.datalists import dicom_slice_datalist
from ura_monai.data.dicom.discovery import discover_series
from ura_monai.data.dicom.headers import series_affine
from ura_monai.data.dicom.pixels import (
    DicomDecodeError,
    compute_intensity_window,
    iter_series_slices,
    iteration_shape,
    load_series_volume,
    read_slice_pixels,
)
from ura_monai.data.dicom.series import SeriesInfo, SkippedFile, SliceRef

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
