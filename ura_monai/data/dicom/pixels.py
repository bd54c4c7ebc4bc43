"""DICOM pixel decoding: frames decoded lazily (only those asked for), rescaled, windowed to [0, 1] and streamed
as batches of 2D slices along any axis of the ``[slices, rows, cols]`` volume.

Decoding goes through ``pydicom.pixels`` (pydicom 3); a transfer syntax without an installed decoder gives a
:class:`DicomDecodeError` naming the package to install.
"""

from __future__ import annotations

import os
import re
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
import pydicom
from pydicom.uid import UID

from ura_monai.data.dicom.headers import series_affine
from ura_monai.data.dicom.series import SeriesInfo, SliceRef

__all__ = [
    "DicomDecodeError",
    "compute_intensity_window",
    "iter_series_slices",
    "iteration_shape",
    "load_series_volume",
    "missing_decoder_message",
    "read_slice_pixels",
]

_LUMINANCE_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601
# pip names of the packages behind pydicom's decoding plugins
_PIP_NAMES = {"gdcm": "python-gdcm"}


class DicomDecodeError(RuntimeError):
    """Pixel data could not be decoded; the message says which package to install when relevant."""


def missing_decoder_message(transfer_syntax_uid: str) -> str | None:
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


def _decode_error(error: Exception, ref: SliceRef) -> DicomDecodeError:
    location = os.path.basename(ref.path) + (f" frame {ref.frame_index + 1}" if ref.frame_index is not None else "")
    message = missing_decoder_message(ref.transfer_syntax_uid)
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
                    # frames of one multi-frame file: every one has its index
                    indices = [index for p in positions if (index := refs[p].frame_index) is not None]
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
