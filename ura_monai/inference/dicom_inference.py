"""Per-series anomaly detection on a folder of DICOM files.

:func:`predict_dicom_folder` discovers the series of an input folder (e.g. a PACS export), runs a
2D slice detector over each series, batch by batch, and writes per-series results to a new output
folder: NIfTI anomaly and uncertainty maps with the source geometry, DICOM Parametric Map / SEG
referencing the source series (with highdicom), ``report.json``, and a row per series in the
folder-level ``results.csv``.

Memory: slices are decoded one batch at a time and the maps go to raw files in the series'
staging folder as they are predicted; the NIfTI files are streamed from them. Only the DICOM
objects need a map in memory (highdicom builds the object whole): one float32 volume.

Safety: the output folder may not be inside the input folder (nor the reverse); each series is
built in a hidden staging folder and renamed into place when complete, so a crash never leaves a
half-written series folder; every file is written through a temporary file + ``os.replace``.
A failing series gets an ``error`` row in ``results.csv`` and the others go on. No patient name
or ID is used in file names or logs: series folders are named by SeriesInstanceUID, reduced to one
portable path component (a UID is file content: ``../`` or an absolute path must not leave the
output folder) and checked to stay inside it. The output folder follows the rule of
``docs/robustness.md`` (new or empty, or a previous run's with ``overwrite``).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

from ura_monai.data.dicom import (
    SeriesInfo,
    SkippedFile,
    compute_intensity_window,
    discover_series,
    iter_series_slices,
    iteration_shape,
    series_affine,
)
from ura_monai.inference.aggregation import aggregate_slice_scores, check_volume_aggregation
from ura_monai.inference.dicom_writers import (
    DICOM_EXTRA_HINT,
    highdicom_available,
    read_source_headers,
    update_results_csv,
    write_nifti_slabs,
    write_parametric_map,
    write_report_json,
    write_segmentation,
)
from ura_monai.utils.paths import claim_output_dir, ensure_within, is_within, safe_child

__all__ = ["SlicePredictor", "aggregate_slice_scores", "check_output_folder", "predict_dicom_folder"]

logger = logging.getLogger(__name__)

RESULTS_CSV_NAME = "results.csv"


@runtime_checkable
class SlicePredictor(Protocol):
    """A 2D anomaly detector as used by :func:`predict_dicom_folder`.

    Called with a float tensor ``(N, C, H, W)`` in [0, 1] (``C`` 1, or 3 for RGB series) at the
    slices' own size, on the CPU (the predictor moves it to its device), it returns a dict with
    ``"anomaly_map"`` ``(N, H, W)``, ``"uncertainty_map"`` ``(N, H, W)`` (optional) and
    ``"pred_score"`` ``(N,)``. ``image_threshold`` is the score above which an image is anomalous
    (``None`` when not calibrated); an optional ``pixel_threshold`` attribute is used for the SEG
    output, falling back to ``image_threshold``.
    """

    image_threshold: float | None

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]: ...


def check_output_folder(input_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Resolve both folders and refuse overlapping trees.

    Raises:
        FileNotFoundError: the input folder does not exist.
        ValueError: the output folder is the input folder, inside it, or contains it.

    Returns:
        the resolved ``(input_dir, output_dir)``.
    """
    input_path = Path(input_dir).expanduser().resolve()
    output_path = Path(output_dir).expanduser().resolve()
    if not input_path.is_dir():
        raise FileNotFoundError(f"input folder not found: {input_path}")
    if is_within(output_path, input_path):
        raise ValueError(
            f"output folder {output_path} is inside the input folder {input_path}: results are never "
            "written into the input tree; choose an output folder outside it"
        )
    if is_within(input_path, output_path):
        raise ValueError(
            f"input folder {input_path} is inside the output folder {output_path}: choose an output "
            "folder that does not contain the input"
        )
    return input_path, output_path


def _to_numpy_maps(value: Any, count: int, height: int, width: int, name: str) -> np.ndarray:
    """A predictor output as float32 ``(N, H, W)``, resized bilinearly when its size differs."""
    tensor = torch.as_tensor(value).detach().float()
    if tensor.ndim == 4 and tensor.shape[1] == 1:
        tensor = tensor[:, 0]
    if tensor.ndim != 3 or tensor.shape[0] != count:
        raise ValueError(
            f"predictor returned {name} of shape {tuple(tensor.shape)}, expected ({count}, {height}, {width})"
        )
    if tensor.shape[1:] != (height, width):
        tensor = torch.nn.functional.interpolate(
            tensor[:, None], size=(height, width), mode="bilinear", align_corners=False
        )[:, 0]
    return tensor.cpu().numpy().astype(np.float32, copy=False)


def _iter_volume_slabs(raw_path: Path, axis: int, shape_along_axis: tuple[int, int, int], chunk: int = 16):
    """Yield ``[k, rows, cols]`` slabs of the volume from a raw map stored in iteration order.

    Along axis 0 the raw file already is in volume order and is read sequentially; along the
    other axes it is memory-mapped read-only and transposed slice by slice.
    """
    length, height, width = shape_along_axis
    if axis == 0:
        with open(raw_path, "rb") as stream:
            for start in range(0, length, chunk):
                count = min(chunk, length - start)
                yield np.fromfile(stream, dtype=np.float32, count=count * height * width).reshape(count, height, width)
        return
    stored = np.memmap(raw_path, dtype=np.float32, mode="r", shape=shape_along_axis)
    slices = height  # along axes 1 and 2 the slice axis of the volume is the stored height
    for start in range(0, slices, chunk):
        stop = min(start + chunk, slices)
        if axis == 1:  # stored[r, s, c] = volume[s, r, c]
            yield np.ascontiguousarray(np.asarray(stored[:, start:stop, :]).transpose(1, 0, 2))
        else:  # stored[c, s, r] = volume[s, r, c]
            yield np.ascontiguousarray(np.asarray(stored[:, start:stop, :]).transpose(1, 2, 0))
    del stored


def _read_volume(raw_path: Path, axis: int, shape_along_axis: tuple[int, int, int]) -> np.ndarray:
    return np.concatenate(list(_iter_volume_slabs(raw_path, axis, shape_along_axis)), axis=0)


def _relative(path: str, root: Path) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:  # another drive on Windows
        return path


def _skipped_rows(skipped: list[SkippedFile], input_path: Path) -> list[dict[str, Any]]:
    return [
        {
            "status": "skipped",
            "series_uid": item.series_uid or "",
            "skipped_files": _relative(item.path, input_path),
            "message": item.reason,
        }
        for item in skipped
    ]


class _RawMaps:
    """The maps of one series as predicted, slice batch by slice batch, in raw float32 files of its staging folder
    (iteration order), with their value ranges and the slice scores."""

    def __init__(self, staging: Path, length: int) -> None:
        self.anomaly_path, self.uncertainty_path = staging / ".anomaly_map.f32", staging / ".uncertainty_map.f32"
        self.slice_scores = np.empty(length, dtype=np.float32)
        self.anomaly_range = [np.inf, -np.inf]
        self.uncertainty_range = [np.inf, -np.inf]
        self.has_uncertainty = True

    def remove(self) -> None:
        self.anomaly_path.unlink(missing_ok=True)
        self.uncertainty_path.unlink(missing_ok=True)


def _predict_slices(
    series: SeriesInfo,
    staging: Path,
    predictor: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    axis: int,
    batch_size: int,
    progress: bool,
) -> _RawMaps:
    """Run ``predictor`` over the series' slices along ``axis``; the maps go to raw files in ``staging``."""
    from tqdm.auto import tqdm

    length, height, width = iteration_shape(series, axis)
    window = compute_intensity_window(series)
    maps = _RawMaps(staging, length)
    written = 0
    with (
        open(maps.anomaly_path, "wb") as anomaly_stream,
        open(maps.uncertainty_path, "wb") as uncertainty_stream,
        tqdm(total=length, desc=f"series {series.name[-12:]}", unit="slice", disable=not progress, leave=False) as bar,
        torch.inference_mode(),
    ):
        for indices, images in iter_series_slices(series, batch_size, axis=axis, window=window, scratch_dir=staging):
            if int(indices[0]) != written:  # the raw files are written in order
                raise RuntimeError(f"slices arrived out of order at {int(indices[0])}")
            count = len(indices)
            outputs = predictor(torch.from_numpy(images))
            anomaly = _to_numpy_maps(outputs["anomaly_map"], count, height, width, "anomaly_map")
            anomaly_stream.write(anomaly.tobytes())
            maps.anomaly_range = [
                min(maps.anomaly_range[0], float(anomaly.min())),
                max(maps.anomaly_range[1], float(anomaly.max())),
            ]
            uncertainty_value = outputs.get("uncertainty_map")
            if uncertainty_value is None:
                maps.has_uncertainty = False
            elif maps.has_uncertainty:
                uncertainty = _to_numpy_maps(uncertainty_value, count, height, width, "uncertainty_map")
                uncertainty_stream.write(uncertainty.tobytes())
                maps.uncertainty_range = [
                    min(maps.uncertainty_range[0], float(uncertainty.min())),
                    max(maps.uncertainty_range[1], float(uncertainty.max())),
                ]
            scores = torch.as_tensor(outputs["pred_score"]).detach().float().reshape(-1).cpu().numpy()
            if scores.shape[0] != count:
                raise ValueError(f"predictor returned {scores.shape[0]} scores for {count} slices")
            maps.slice_scores[indices] = scores
            written += count
            bar.update(count)
    return maps


def _write_nifti_maps(series: SeriesInfo, staging: Path, maps: _RawMaps, axis: int) -> dict[str, str]:
    """The anomaly (and uncertainty) map as NIfTI with the series geometry, streamed from the raw files."""
    affine = series_affine(series)
    shape_along_axis = iteration_shape(series, axis)
    maps_to_write = [("anomaly_map", maps.anomaly_path, maps.anomaly_range, "URA-Net anomaly map")]
    if maps.has_uncertainty:
        maps_to_write.append(
            ("uncertainty_map", maps.uncertainty_path, maps.uncertainty_range, "URA-Net uncertainty map")
        )
    outputs_written: dict[str, str] = {}
    for name, raw_path, value_range, description in maps_to_write:
        slabs = _iter_volume_slabs(raw_path, axis, shape_along_axis)
        write_nifti_slabs(
            staging / f"{name}.nii.gz", slabs, series.shape, affine, (value_range[0], value_range[1]), description
        )
        outputs_written[f"{name}_nifti"] = f"{name}.nii.gz"
    return outputs_written


def _write_dicom_objects(
    series: SeriesInfo, staging: Path, maps: _RawMaps, axis: int, pixel_threshold: float | None
) -> tuple[dict[str, str], list[str]]:
    """The DICOM Parametric Map and (with a threshold) SEG of the anomaly map: ``(files written, warnings)``.

    Without highdicom, or when the source does not allow an object, a warning says what was not written.
    """
    outputs_written: dict[str, str] = {}
    output_warnings: list[str] = []
    if not highdicom_available():
        message = f"DICOM outputs skipped: highdicom is not installed ({DICOM_EXTRA_HINT})"
        logger.warning(message)
        return outputs_written, [message]
    sources = read_source_headers(series)
    anomaly_volume = _read_volume(maps.anomaly_path, axis, iteration_shape(series, axis))
    writers: list[tuple[str, str, Callable[[Path], Any]]] = [
        ("parametric_map", "anomaly_map_pm.dcm", lambda p: write_parametric_map(p, anomaly_volume, series, sources))
    ]
    if pixel_threshold is not None:
        writers.append(
            (
                "segmentation",
                "anomaly_seg.dcm",
                lambda p: write_segmentation(
                    p, anomaly_volume >= pixel_threshold, series, float(pixel_threshold), sources
                ),
            )
        )
    for key, file_name, writer in writers:
        try:
            writer(staging / file_name)
            outputs_written[key] = file_name
        except Exception as error:  # a DICOM object the source does not allow: keep the rest
            message = f"DICOM {key} not written: {type(error).__name__}: {error}"
            logger.warning("series %s: %s", series.name, message)
            output_warnings.append(message)
    return outputs_written, output_warnings


def _top_slices(series: SeriesInfo, slice_scores: np.ndarray, top_k: int, axis: int) -> list[dict[str, Any]]:
    """The ``top_k`` most anomalous slices, with their source instance (and frame) when cut along axis 0."""
    order = np.argsort(-slice_scores, kind="stable")[: max(1, min(top_k, len(slice_scores)))]
    top_slices = []
    for index in order.tolist():
        entry: dict[str, Any] = {"index": int(index), "score": float(slice_scores[index])}
        if axis == 0:  # slices along axis 0 are source frames: name them for PACS users
            ref = series.slices[index]
            entry["sop_instance_uid"] = ref.sop_instance_uid
            if ref.frame_index is not None:
                entry["frame_number"] = ref.frame_index + 1
        top_slices.append(entry)
    return top_slices


def _run_series(
    series: SeriesInfo,
    staging: Path,
    predictor: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    axis: int,
    batch_size: int,
    aggregation: str,
    top_k: int,
    write_dicom: bool,
    progress: bool,
    input_path: Path,
) -> dict[str, Any]:
    """Predict one series into ``staging``; returns its report (without timings of the rename)."""
    started = time.perf_counter()
    maps = _predict_slices(series, staging, predictor, axis, batch_size, progress)
    inferred = time.perf_counter()

    outputs_written = _write_nifti_maps(series, staging, maps, axis)
    output_warnings: list[str] = []
    image_threshold = getattr(predictor, "image_threshold", None)
    pixel_threshold = getattr(predictor, "pixel_threshold", None)
    pixel_threshold = image_threshold if pixel_threshold is None else pixel_threshold
    if write_dicom:
        dicom_written, output_warnings = _write_dicom_objects(series, staging, maps, axis, pixel_threshold)
        outputs_written.update(dicom_written)
    maps.remove()
    written_at = time.perf_counter()

    slice_scores = maps.slice_scores
    volume_score = aggregate_slice_scores(slice_scores, aggregation, top_k)
    if image_threshold is None:
        decision = "unknown"
    else:
        decision = "anomalous" if volume_score >= image_threshold else "normal"
    return {
        "series": series.summary(),
        "study_uid": series.study_uid,
        "frame_of_reference_uid": series.frame_of_reference_uid,
        "axis": axis,
        "affine_ras": series_affine(series).tolist(),
        "volume_score": volume_score,
        "aggregation": aggregation,
        "top_k": top_k,
        "image_threshold": image_threshold,
        "pixel_threshold": pixel_threshold,
        "decision": decision,
        "top_slices": _top_slices(series, slice_scores, top_k, axis),
        "slice_scores": [float(s) for s in slice_scores],
        "anomaly_range": [float(v) for v in maps.anomaly_range],
        "outputs": outputs_written,
        "warnings": list(series.warnings) + output_warnings,
        "skipped_files": [{"path": _relative(s.path, input_path), "reason": s.reason} for s in series.skipped_files],
        "timings_s": {
            "read_infer": round(inferred - started, 3),
            "write": round(written_at - inferred, 3),
        },
    }


def _finalize_series_folder(staging: Path, final: Path) -> None:
    """Move a complete staging folder into place, replacing the folder of an earlier run."""
    previous = None
    if final.exists():
        previous = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
        os.replace(final, previous)
    os.replace(staging, final)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def predict_dicom_folder(
    input_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    predictor: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    axis: int = 0,
    batch_size: int = 16,
    volume_aggregation: str = "max",
    top_k: int = 5,
    write_dicom: bool = True,
    progress: bool = True,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Detect anomalies in every image series of a DICOM folder and write per-series results.

    Output layout (``output_dir`` is created; it must not be inside ``input_dir``)::

        output_dir/
            results.csv                     one row per series (ok / error), one per skipped file
            <SeriesInstanceUID>/
                anomaly_map.nii.gz          float32, source geometry (overlays the series in 3D Slicer)
                uncertainty_map.nii.gz      when the predictor returns one
                anomaly_map_pm.dcm          DICOM Parametric Map (needs highdicom)
                anomaly_seg.dcm             DICOM SEG of map >= threshold (needs highdicom and a threshold)
                report.json                 scores, top slices, geometry, warnings, timings

    Args:
        input_dir: folder tree with DICOM files (e.g. a PACS export).
        output_dir: a new or empty results folder (or a previous run's, with ``overwrite``), outside ``input_dir``.
        predictor: a :class:`SlicePredictor`.
        axis: slicing axis of the ``[slices, rows, cols]`` volume: 0 for the acquired slices (OCT
            B-scans), 1 or 2 for reformatted planes (then the series is staged in a memmap).
        batch_size: slices per predictor call.
        volume_aggregation: ``"max"``, ``"mean"`` or ``"topk_mean"`` of the slice scores.
        top_k: number of most anomalous slices reported (and averaged by ``"topk_mean"``).
        write_dicom: also write DICOM Parametric Map / SEG (skipped with a warning without highdicom).
        progress: show tqdm progress bars.
        overwrite: replace a previous ura-monai run in ``output_dir``; without it a non-empty ``output_dir`` is
            refused (:func:`ura_monai.utils.paths.claim_output_dir`, the rule of ``docs/robustness.md``).

    Returns:
        the rows written to ``results.csv`` by this run (dicts keyed by
        :data:`ura_monai.inference.dicom_writers.RESULTS_CSV_FIELDS`).

    Raises:
        FileNotFoundError: ``input_dir`` does not exist.
        ValueError: overlapping input/output folders, an empty input folder, a folder without any
            DICOM image series, or invalid arguments.
    """
    check_volume_aggregation(volume_aggregation)
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    if batch_size < 1 or top_k < 1:
        raise ValueError("batch_size and top_k must be >= 1")
    input_path, output_path = check_output_folder(input_dir, output_dir)

    series_list, skipped, discovery_seconds = _discover(input_path)
    if write_dicom and not highdicom_available():
        logger.warning(
            "highdicom is not installed: DICOM Parametric Map / SEG outputs are skipped (%s)", DICOM_EXTRA_HINT
        )

    claim_output_dir(output_path, "predict-dicom", overwrite=overwrite, inputs=[input_path])
    csv_path = output_path / RESULTS_CSV_NAME
    all_rows: list[dict[str, Any]] = []
    # files that belong to no analysed series get their own rows
    loose_skipped = [item for item in skipped if not any(item in s.skipped_files for s in series_list)]
    skipped_rows = _skipped_rows(loose_skipped, input_path)
    if skipped_rows:
        update_results_csv(csv_path, skipped_rows)
        all_rows.extend(skipped_rows)

    settings = _SeriesSettings(
        predictor, axis, batch_size, volume_aggregation, top_k, write_dicom, progress, input_path
    )
    for number, series in enumerate(series_list, start=1):
        row = _predict_series(series, f"{number}/{len(series_list)}", output_path, settings, discovery_seconds)
        update_results_csv(csv_path, [row])
        all_rows.append(row)
    return all_rows


def _discover(input_path: Path) -> tuple[list[SeriesInfo], list[SkippedFile], float]:
    """The series and skipped files of the input folder, and the seconds the scan took; ValueError when there is
    no series to analyse."""
    started = time.perf_counter()
    series_list, skipped = discover_series(input_path)
    discovery_seconds = time.perf_counter() - started
    if not series_list:
        if not skipped:
            raise ValueError(f"input folder {input_path} is empty: no files to analyse")
        reasons = sorted({item.reason.split(":")[0] for item in skipped})
        raise ValueError(
            f"no DICOM image series found in {input_path}: {len(skipped)} file(s) skipped ({'; '.join(reasons)})"
        )
    logger.info("found %d series and %d skipped file(s) in %.1f s", len(series_list), len(skipped), discovery_seconds)
    return series_list, skipped, discovery_seconds


class _SeriesSettings(NamedTuple):
    """The arguments of :func:`_run_series` that are the same for every series of a run."""

    predictor: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    axis: int
    batch_size: int
    aggregation: str
    top_k: int
    write_dicom: bool
    progress: bool
    input_path: Path


def _predict_series(
    series: SeriesInfo, position: str, output_path: Path, settings: _SeriesSettings, discovery_seconds: float
) -> dict[str, Any]:
    """Predict one series into its folder of ``output_path`` (built in a staging folder, renamed when complete);
    returns its ``results.csv`` row, an ``error`` row when anything fails."""
    series_started = time.perf_counter()
    axis, volume_aggregation, input_path = settings.axis, settings.aggregation, settings.input_path
    row: dict[str, Any] = {
        "series_dir": series.name,
        "series_uid": series.uid,
        "modality": series.modality,
        "sop_class": series.sop_class_name,
        "slices": series.num_frames,
        "rows": series.rows,
        "cols": series.cols,
        "axis": axis,
        "aggregation": volume_aggregation,
        "warnings": "; ".join(series.warnings),
        "skipped_files": " | ".join(f"{_relative(s.path, input_path)}: {s.reason}" for s in series.skipped_files),
    }
    # series.name is sanitised from the SeriesInstanceUID; safe_child checks again that it stays inside output_path
    final_folder = safe_child(output_path, series.name)
    staging = ensure_within(
        output_path / f".{final_folder.name}.partial-{secrets.token_hex(4)}", output_path, "staging folder"
    )
    try:
        staging.mkdir(parents=True)
        report = _run_series(series, staging, *settings)
        report["timings_s"]["total"] = round(time.perf_counter() - series_started, 3)
        report["timings_s"]["discovery_folder"] = round(discovery_seconds, 3)
        write_report_json(staging / "report.json", report)
        _finalize_series_folder(staging, final_folder)
        row.update(
            status="ok",
            volume_score=f"{report['volume_score']:.6g}",
            threshold="" if report["image_threshold"] is None else f"{report['image_threshold']:.6g}",
            decision=report["decision"],
            top_slices=";".join(f"{t['index']}:{t['score']:.4g}" for t in report["top_slices"]),
            warnings="; ".join(report["warnings"]),
            message="",
            time_read_infer_s=report["timings_s"]["read_infer"],
            time_write_s=report["timings_s"]["write"],
        )
        logger.info(
            "series %s %s (%s, %d slices): score %.4g, %s",
            position,
            series.name,
            series.modality,
            series.num_frames,
            report["volume_score"],
            report["decision"],
        )
    except Exception as error:  # one bad series must not stop the folder
        shutil.rmtree(staging, ignore_errors=True)
        row.update(status="error", decision="", message=f"{type(error).__name__}: {error}")
        logger.error("series %s %s failed: %s", position, series.name, row["message"])
    row["time_total_s"] = round(time.perf_counter() - series_started, 3)
    return row
