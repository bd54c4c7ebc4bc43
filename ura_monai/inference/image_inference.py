"""Anomaly detection on a list of image files: the image counterpart of :mod:`ura_monai.inference.dicom_inference`.

:func:`predict_files` runs a predictor (:class:`ura_monai.inference.predictor.URANetPredictor`) over image files,
batch by batch, and writes per image a heatmap overlay, the raw maps at the file's own size and an uncertainty
picture (:func:`ura_monai.data.writers.save_prediction_files`), and one ``scores.csv`` for the run.

A file that cannot be read (corrupt, not an image) gets a row with its error in ``scores.csv`` and the run goes
on. ``scores.csv`` is rewritten atomically after every batch, so an interrupted run keeps what it finished.
Outputs are named after their inputs by :func:`ura_monai.data.writers.output_path_for` and never replace
an input file.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ura_monai.data.image_files import image_extension_reason
from ura_monai.data.transforms import LoadAnomalyImage, ResizeAnomaly
from ura_monai.data.writers import output_path_for, save_prediction_files, write_csv
from ura_monai.inference.predictor import resize_maps
from ura_monai.utils.paths import claim_output_dir, list_input_files, special_file_reason

if TYPE_CHECKING:
    from ura_monai.inference.predictor import URANetPredictor

__all__ = ["SCORES_CSV_COLUMNS", "SCORES_CSV_NAME", "format_error", "list_prediction_inputs", "predict_files"]

logger = logging.getLogger("ura_monai")

SCORES_CSV_NAME = "scores.csv"
SCORES_CSV_COLUMNS = ("path", "score", "normalized_score", "decision", "threshold", "error", "overlay")
# per-image output files, in the order their names are handed out (the same order for every image keeps the
# collision suffixes of output_path_for consistent between the files of one input)
_OUTPUT_SUFFIXES = {
    "overlay": "_overlay.png",
    "anomaly_map": "_anomaly_map.npy",
    "uncertainty": "_uncertainty.npy",
    "uncertainty_png": "_uncertainty.png",
}
_MAP_KEYS = ("anomaly_map", "uncertainty_map", "pred_score")


def format_error(err: BaseException) -> str:
    """``"<Type>: <message>"`` on one line (CSV cells with newlines are valid but awkward in spreadsheets and logs)."""
    return f"{type(err).__name__}: {err}".replace("\r", " ").replace("\n", " ")


def list_prediction_inputs(folder: str | os.PathLike) -> list[Path]:
    """Every file under ``folder`` to predict (recursive, sorted), without hidden files / folders and OS clutter
    (:func:`ura_monai.utils.paths.list_input_files`).

    Non-image files are kept: :func:`predict_files` gives them an error row, so that the table says what was not
    predicted and why. So are FIFOs, devices, dangling links and link loops (their row says which; they are never
    opened); an unreadable sub-folder gets a logged warning.
    """
    skipped: list[tuple[str, str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported below: as rows of scores.csv, or as one warning per folder
        files = list_input_files(folder, skipped=skipped)
    for path, reason in skipped:
        if reason.startswith("unreadable folder"):
            logger.warning("skipping %s: %s", path, reason)
        else:
            files.append(Path(path))
    return sorted(files)


def _naming_source(path: Path, input_root: str | os.PathLike | None) -> Path:
    """The path whose stem names ``path``'s outputs: with ``input_root``, its relative path flattened with ``_``.

    ``good/000.png`` and ``crack/000.png`` then give ``good_000_*`` and ``crack_000_*`` instead of ``000_*`` and a
    hashed ``000-1a2b3c4d_*``. The result is a sibling of ``path``, so the safety checks of ``output_path_for``
    still see the input tree.
    """
    if input_root is None:
        return path
    try:
        relative = path.resolve().relative_to(Path(input_root).resolve())
    except ValueError:  # not under the root: name it by its own stem
        return path
    return path.with_name("_".join(relative.with_suffix("").parts) + path.suffix)


class _FileRun:
    """The state of one :func:`predict_files` run: the predictor, the image loaders, the names handed out, the
    progress bar."""

    def __init__(
        self,
        predictor: URANetPredictor,
        output_dir: Path,
        input_root: str | os.PathLike | None,
        inputs: list[Path],
        bar: Any,
    ) -> None:
        self.predictor = predictor
        self.output_dir = output_dir
        self.input_root = input_root
        # every input, resolved: an output name must never land on any of them, not only on its own input
        self.input_set = {p.resolve() for p in inputs}
        self.taken: set[str] = set()
        self.loader = LoadAnomalyImage(channels=None)
        self.resizer = ResizeAnomaly(predictor.image_size, "bilinear")
        self.threshold_cell = "" if predictor.image_threshold is None else predictor.image_threshold
        self.bar = bar

    def skip(self, row: dict[str, Any], path: Path, err: BaseException | None = None) -> None:
        """Give ``row`` the error (when not set already), log it and count the file as done."""
        if err is not None:
            row["error"] = format_error(err)
        logger.warning("skipping %s: %s", path, row["error"])
        self.bar.update(1)

    def load(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """``(original as uint8, model input)`` of one file; raises on anything that is not a grey or RGB image."""
        special = special_file_reason(path)
        if special is not None:  # never open a FIFO or a device: the read could block forever
            raise ValueError(special)
        not_an_image = image_extension_reason(path)
        if not_an_image is not None:
            raise ValueError(not_an_image)
        image = self.loader(path)
        if image.shape[0] not in (1, 3):
            raise ValueError(f"expected a grey or RGB image, got {image.shape[0]} channels")
        image = self.predictor.to_model_channels(image, path)
        model_input = self.resizer(image)
        # keep the full-size image as 8 bits for the overlay: 4x less memory than float32
        original = (image.clamp(0, 1) * 255.0).round().to(torch.uint8)
        return original, model_input

    def load_chunk(
        self, chunk: list[Path]
    ) -> tuple[list[dict[str, Any]], list[tuple[int, Path, torch.Tensor, torch.Tensor]]]:
        """One row per file of ``chunk`` and ``(row index, path, original uint8, model input)`` per readable one."""
        rows: list[dict[str, Any]] = []
        loaded: list[tuple[int, Path, torch.Tensor, torch.Tensor]] = []
        for path in chunk:
            row = {
                "path": str(path),
                "score": "",
                "normalized_score": "",
                "decision": "",
                "threshold": self.threshold_cell,
                "error": "",
                "overlay": "",
            }
            rows.append(row)
            try:
                original, model_input = self.load(path)
            except Exception as err:  # noqa: BLE001 - one bad file must not stop the run; its row says why
                self.skip(row, path, err)
                continue
            loaded.append((len(rows) - 1, path, original, model_input))
        return rows, loaded

    def forward(self, batch: torch.Tensor, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The network on a batch; when it runs out of memory, image by image, failing only the images that do."""
        try:
            return self.predictor.run_network(batch)
        except MemoryError:
            pass
        size = batch.shape[-1]
        parts: dict[str, list[torch.Tensor]] = {key: [] for key in _MAP_KEYS}
        for index, row in enumerate(rows):
            try:
                out = self.predictor.run_network(batch[index : index + 1])
            except MemoryError as err:
                row["error"] = format_error(err) or "MemoryError"
                out = {
                    "anomaly_map": torch.full((1, 1, size, size), float("nan")),
                    "uncertainty_map": torch.full((1, 1, size, size), float("nan")),
                    "pred_score": torch.full((1,), float("nan")),
                }
            for key in parts:
                parts[key].append(out[key])
        return {key: torch.cat(values) for key, values in parts.items()}

    def output_names(self, path: Path) -> dict[str, Path]:
        """The output files of one input, refused when one would land on any input."""
        source = _naming_source(path, self.input_root)
        names = {
            k: output_path_for(source, self.output_dir, s, self.input_root, self.taken)
            for k, s in _OUTPUT_SUFFIXES.items()
        }
        clash = [n for n in names.values() if n.resolve() in self.input_set]
        if clash:
            raise ValueError(f"refusing to write {clash[0]} over an input file: outputs never overwrite inputs")
        return names

    def write_image(
        self, names: dict[str, Path], original: torch.Tensor, anomaly_map: torch.Tensor, uncertainty_map: torch.Tensor
    ) -> None:
        """Resize one image's (1, S, S) maps to its own size and write its four files."""
        size = tuple(original.shape[-2:])
        predictor = self.predictor
        calibrated = predictor.pixel_threshold is not None
        save_prediction_files(
            names,
            original.float().div_(255.0),
            resize_maps(anomaly_map[None].float(), size)[0, 0].numpy(),
            resize_maps(uncertainty_map[None].float(), size)[0, 0].numpy(),
            pixel_threshold=predictor.pixel_threshold,
            # a fixed colour scale (the normal range up to 2x the threshold) keeps overlays of different images comparable
            vmin=predictor.pixel_min if calibrated else None,
            vmax=predictor.pixel_max if calibrated else None,
        )

    def predict_chunk(self, chunk: list[Path]) -> list[dict[str, Any]]:
        """Load, predict and write the files of one batch; returns their rows, in input order."""
        rows, loaded = self.load_chunk(chunk)
        if not loaded:
            return rows
        # grey and colour files may share a batch (checkpoints without a stored channel count): the network repeats
        # grey to RGB anyway
        channels = max(item[3].shape[0] for item in loaded)
        batch = torch.stack([item[3].expand(channels, -1, -1) for item in loaded])
        out = self.forward(batch, [rows[item[0]] for item in loaded])
        normalized, labels = self.predictor.decisions(out["pred_score"])
        calibrated = self.predictor.image_threshold is not None
        for i, (row_index, path, original, _) in enumerate(loaded):
            row = rows[row_index]
            if row["error"]:
                self.skip(row, path)
                continue
            try:
                names = self.output_names(path)
            except ValueError as err:
                self.skip(row, path, err)
                continue
            try:
                self.write_image(names, original, out["anomaly_map"][i], out["uncertainty_map"][i])
            except (MemoryError, OSError) as err:  # this image's outputs only; the run goes on
                self.skip(row, path, err)
                continue
            row.update(
                score=float(out["pred_score"][i]),
                normalized_score=float(normalized[i]) if calibrated else "",
                decision=("anomalous" if bool(labels[i]) else "normal") if calibrated else "",
                overlay=names["overlay"].name,
            )
            self.bar.update(1)
        return rows


def predict_files(
    paths: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    predictor: URANetPredictor,
    input_root: str | os.PathLike | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Predict every file of ``paths`` and write the results to ``output_dir``.

    Per readable image (``<stem>``: the file name without extension or, with ``input_root``, the path relative
    to it with ``_`` for the separators; a short hash is added when two inputs still share it):

    - ``<stem>_overlay.png``: the anomaly heatmap over the image at its own size (colour scale fixed by the
      checkpoint's pixel statistics, so images compare), with the contour of ``map >= pixel_threshold``;
    - ``<stem>_anomaly_map.npy`` and ``<stem>_uncertainty.npy``: float32 maps (H, W) at the file's size;
    - ``<stem>_uncertainty.png``: the uncertainty map in [0, 1] (viridis).

    ``scores.csv`` has one row per input: ``path``, ``score``, ``normalized_score``, ``decision``
    (``anomalous`` / ``normal``), ``threshold``, ``error`` (empty on success) and ``overlay`` (the overlay's
    file name). It is rewritten atomically after every batch and when the run stops on an exception.

    Args:
        paths: files to predict; files that are not images or fail to decode get an error row.
        output_dir: output folder (created when missing).
        predictor: a :class:`ura_monai.inference.predictor.URANetPredictor`.
        input_root: the folder the inputs come from, if any; nothing is written inside it.
        progress: show a tqdm progress bar.
        overwrite: replace a previous ura-monai run in ``output_dir``; without it a non-empty ``output_dir``
            is refused (:func:`ura_monai.utils.paths.claim_output_dir`, the rule of ``docs/robustness.md``).

    Returns:
        the rows of ``scores.csv``, in input order.

    Raises:
        ValueError: when ``output_dir`` is (or lies inside) ``input_root`` or the folder of an input file, or is
            not empty (:class:`ura_monai.utils.paths.OutputFolderError`).
    """
    from tqdm.auto import tqdm

    output_dir = Path(output_dir)
    inputs = [Path(p) for p in paths]
    # outputs never go into an input folder: they could replace inputs, and a later run would read them as inputs
    claim_output_dir(
        output_dir, "predict", overwrite=overwrite, inputs=([input_root] if input_root is not None else []) + inputs
    )
    csv_path = output_dir / SCORES_CSV_NAME
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(inputs), desc="predict", unit="image", disable=not progress, leave=False)
    run = _FileRun(predictor, output_dir, input_root, inputs, bar)
    try:
        for start in range(0, len(inputs), predictor.batch_size):
            rows.extend(run.predict_chunk(inputs[start : start + predictor.batch_size]))
            write_csv(csv_path, rows, fieldnames=SCORES_CSV_COLUMNS)
    finally:
        bar.close()
        # an exception or Ctrl-C mid-batch: keep the rows of the finished batches (and the table's header)
        if not csv_path.exists() or len(rows) < len(inputs):
            write_csv(csv_path, rows, fieldnames=SCORES_CSV_COLUMNS)
    return rows
