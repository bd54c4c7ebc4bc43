"""Predict anomaly maps and scores for image files with a trained URA-Net checkpoint.

:class:`URANetPredictor` wraps a checkpoint written by :func:`ura_monai.networks.checkpoint.save_checkpoint`:

- called on a batch ``(N, C, H, W)`` in [0, 1] of any size, it resizes to the network's size, runs it and resizes
  the maps back, returning ``anomaly_map`` / ``uncertainty_map`` ``(N, H, W)`` and ``pred_score`` /
  ``pred_score_normalized`` / ``pred_label`` ``(N,)``. With its ``image_threshold`` and ``pixel_threshold``
  attributes this is the :class:`ura_monai.inference.dicom_inference.SlicePredictor` protocol;
- :meth:`URANetPredictor.predict_files` runs over image files and writes, per image, a heatmap overlay, the raw
  maps at the file's own size and an uncertainty picture, and one ``scores.csv`` for the run.

A file that cannot be read (corrupt, not an image) gets a row with its error in ``scores.csv`` and the run goes
on. ``scores.csv`` is rewritten atomically after every batch, so an interrupted run keeps what it finished.
Outputs are named after their inputs by :func:`ura_monai.inference.writers.output_path_for` and never replace
an input file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ura_monai.data import IMAGE_EXTENSIONS
from ura_monai.data.transforms import LoadAnomalyImage, ResizeAnomaly
from ura_monai.inference.writers import output_path_for, save_array, save_png, write_csv
from ura_monai.networks.checkpoint import load_checkpoint
from ura_monai.transforms.postprocess import RenderHeatmapOverlay, ThresholdAnomalyMap
from ura_monai.transforms.thresholds import normalize_score
from ura_monai.utils.paths import claim_output_dir, special_file_reason

__all__ = ["URANetPredictor", "SCORES_CSV_NAME", "SCORES_CSV_COLUMNS"]

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


def _resize(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W); anti-aliased when shrinking, as the training preprocessing does."""
    size = (int(size[0]), int(size[1]))
    if tuple(maps.shape[-2:]) == size:
        return maps
    shrinking = maps.shape[-2] > size[0] or maps.shape[-1] > size[1]
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


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


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _format_error(err: BaseException) -> str:
    # one line: CSV cells with newlines are valid but awkward in spreadsheets and logs
    return f"{type(err).__name__}: {err}".replace("\r", " ").replace("\n", " ")


class URANetPredictor:
    """Inference with a URA-Net checkpoint on batches of images or on image files.

    Args:
        checkpoint: file written by :func:`ura_monai.networks.checkpoint.save_checkpoint` (e.g. ``model.pt``).
        device: ``"cpu"``, ``"cuda"`` or a ``torch.device``.
        num_samples: stochastic perception passes for the uncertainty map; ``None`` keeps the checkpoint's
            setting, 0 skips them (zero uncertainty, fastest). The anomaly map and score do not depend on it.
        batch_size: images per forward pass.
        seed: seed of the uncertainty sampling, forked from the global RNG so that the same inputs give the same
            uncertainty maps; ``None`` draws from the global RNG.
        fast: run the fast inference path (:class:`ura_monai.inference.fast.FastURANet`, the same maps within
            float rounding): ``True`` for its defaults, or a dict of its options, e.g.
            ``{"dtype": "bf16", "channels_last": True}`` on a GPU. Default: the reference path.

    Attributes:
        model: the network (eval mode) on ``device``.
        checkpoint: the loaded checkpoint dict.
        image_size: the square size the network runs at.
        image_threshold, image_min, image_max: image score statistics (``None`` when the checkpoint has none).
        pixel_threshold, pixel_min, pixel_max: anomaly-map statistics (``None`` when the checkpoint has none).

    Example::

        predictor = URANetPredictor("runs/bottle/model.pt")
        out = predictor(torch.rand(2, 3, 300, 400))   # out["anomaly_map"].shape == (2, 300, 400)
        rows = predictor.predict_files(["a.png", "b.jpg"], "predictions/")
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        device: str | torch.device = "cpu",
        num_samples: int | None = None,
        batch_size: int = 8,
        seed: int | None = 0,
        fast: bool | dict[str, Any] = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_samples is not None and num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.device = torch.device(device)
        self.model, self.checkpoint = load_checkpoint(checkpoint, self.device)
        self.checkpoint_path = Path(checkpoint)
        self.num_samples = num_samples
        self.batch_size = int(batch_size)
        self.seed = seed
        self.network = self.model
        if fast:
            from ura_monai.inference.fast import FastURANet

            self.network = FastURANet(self.model, **({} if fast is True else dict(fast)))
        size = self.checkpoint.get("extra", {}).get("image_size") or self.model.config["image_size"]
        self.image_size = int(size)
        # the channel count of the training images (None for checkpoints written before it was stored)
        channels = self.checkpoint.get("extra", {}).get("channels")
        self.channels = None if channels is None else int(channels)
        post = self.checkpoint.get("postprocessing") or {}
        self.image_threshold = _optional_float(post.get("image_threshold"))
        self.image_min = _optional_float(post.get("image_min"))
        self.image_max = _optional_float(post.get("image_max"))
        self.pixel_threshold = _optional_float(post.get("pixel_threshold"))
        self.pixel_min = _optional_float(post.get("pixel_min"))
        self.pixel_max = _optional_float(post.get("pixel_max"))

    # ------------------------------------------------------------------ tensors
    def _forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The network on (N, C, S, S) images at its own size; (N, 1, S, S) maps and (N,) scores, on the CPU."""
        outputs: dict[str, list[torch.Tensor]] = {"anomaly_map": [], "uncertainty_map": [], "pred_score": []}
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=self.seed is not None), torch.inference_mode():
            if self.seed is not None:
                torch.manual_seed(self.seed)
            for start in range(0, images.shape[0], self.batch_size):
                batch = images[start : start + self.batch_size].to(self.device, torch.float32)
                out = self.network(batch, num_samples=self.num_samples)
                for key in outputs:
                    outputs[key].append(out[key].float().cpu())
        return {key: torch.cat(values) for key, values in outputs.items()}

    def _decisions(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized scores (threshold at 0.5) and boolean labels; NaN / False without thresholds."""
        if self.image_threshold is None:
            return torch.full_like(scores, float("nan")), torch.zeros_like(scores, dtype=torch.bool)
        low = self.image_min if self.image_min is not None else self.image_threshold
        high = self.image_max if self.image_max is not None else self.image_threshold
        return normalize_score(scores, self.image_threshold, low, high), scores >= self.image_threshold

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """
        Args:
            images: (N, C, H, W) with C 1 or 3, intensities in [0, 1], any H and W, any device.

        Returns:
            CPU tensors: ``anomaly_map`` and ``uncertainty_map`` (N, H, W) float32 at the input size,
            ``pred_score`` (N,) raw scores, ``pred_score_normalized`` (N,) in [0, 1] with the image threshold
            at 0.5 (NaN when the checkpoint has no thresholds) and ``pred_label`` (N,) bool
            (``pred_score >= image_threshold``).
        """
        if images.ndim != 4:
            raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
        size = tuple(images.shape[-2:])
        # resize on the CPU in float32: the same operation as the training preprocessing (ResizeAnomaly)
        model_input = _resize(images.detach().to("cpu", torch.float32), (self.image_size, self.image_size))
        out = self._forward(model_input)
        normalized, labels = self._decisions(out["pred_score"])
        return {
            "anomaly_map": _resize(out["anomaly_map"], size)[:, 0],
            "uncertainty_map": _resize(out["uncertainty_map"], size)[:, 0],
            "pred_score": out["pred_score"],
            "pred_score_normalized": normalized,
            "pred_label": labels,
        }

    # ------------------------------------------------------------------ files
    def predict_files(
        self,
        paths: Sequence[str | os.PathLike],
        output_dir: str | os.PathLike,
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
        claim_output_dir(output_dir, "predict", overwrite=overwrite, inputs=([input_root] if input_root is not None else []) + inputs)
        # every input, resolved: an output name must never land on any of them, not only on its own input
        input_set = {p.resolve() for p in inputs}
        csv_path = output_dir / SCORES_CSV_NAME

        rows: list[dict[str, Any]] = []
        taken: set[str] = set()
        loader = LoadAnomalyImage(channels=None)
        resizer = ResizeAnomaly(self.image_size, "bilinear")
        threshold_cell = "" if self.image_threshold is None else self.image_threshold
        bar = tqdm(total=len(inputs), desc="predict", unit="image", disable=not progress, leave=False)
        try:
            for start in range(0, len(inputs), self.batch_size):
                chunk = inputs[start : start + self.batch_size]
                batch_rows: list[dict[str, Any]] = []
                loaded: list[tuple[int, Path, torch.Tensor, torch.Tensor]] = []  # (row index, path, original uint8, model input)
                for path in chunk:
                    row = {"path": str(path), "score": "", "normalized_score": "", "decision": "", "threshold": threshold_cell, "error": "", "overlay": ""}
                    batch_rows.append(row)
                    try:
                        special = special_file_reason(path)
                        if special is not None:  # never open a FIFO or a device: the read could block forever
                            raise ValueError(special)
                        if path.suffix.lower() not in IMAGE_EXTENSIONS:
                            raise ValueError(f"not an image file (extension {path.suffix.lower() or '<none>'!r} is not one of {', '.join(IMAGE_EXTENSIONS)})")
                        image = loader(path)
                        if image.shape[0] not in (1, 3):
                            raise ValueError(f"expected a grey or RGB image, got {image.shape[0]} channels")
                        image = self._model_channels(image, path)
                        model_input = resizer(image)
                        # keep the full-size image as 8 bits for the overlay: 4x less memory than float32
                        original = (image.clamp(0, 1) * 255.0).round().to(torch.uint8)
                    except Exception as err:  # noqa: BLE001 - one bad file must not stop the run; its row says why
                        row["error"] = _format_error(err)
                        logger.warning("skipping %s: %s", path, row["error"])
                        bar.update(1)
                        continue
                    loaded.append((len(batch_rows) - 1, path, original, model_input))

                if loaded:
                    # grey and colour files may share a batch (checkpoints without a stored channel count): the
                    # network repeats grey to RGB anyway
                    channels = max(item[3].shape[0] for item in loaded)
                    batch = torch.stack([item[3].expand(channels, -1, -1) for item in loaded])
                    try:
                        out = self._forward(batch)
                    except MemoryError:
                        # one image too many for this machine: go on one image at a time, failing only that one
                        out = self._forward_one_by_one(batch, [batch_rows[item[0]] for item in loaded])
                    normalized, labels = self._decisions(out["pred_score"])
                    for i, (row_index, path, original, _) in enumerate(loaded):
                        row = batch_rows[row_index]
                        if row["error"]:
                            logger.warning("skipping %s: %s", path, row["error"])
                            bar.update(1)
                            continue
                        try:
                            source = _naming_source(path, input_root)
                            names = {k: output_path_for(source, output_dir, s, input_root, taken) for k, s in _OUTPUT_SUFFIXES.items()}
                            clash = [n for n in names.values() if n.resolve() in input_set]
                            if clash:
                                raise ValueError(f"refusing to write {clash[0]} over an input file: outputs never overwrite inputs")
                        except ValueError as err:
                            row["error"] = _format_error(err)
                            logger.warning("skipping %s: %s", path, row["error"])
                            bar.update(1)
                            continue
                        try:
                            self._write_outputs(names, original, out["anomaly_map"][i], out["uncertainty_map"][i])
                        except (MemoryError, OSError) as err:  # this image's outputs only; the run goes on
                            row["error"] = _format_error(err)
                            logger.warning("skipping %s: %s", path, row["error"])
                            bar.update(1)
                            continue
                        score = float(out["pred_score"][i])
                        row.update(
                            score=score,
                            normalized_score=float(normalized[i]) if self.image_threshold is not None else "",
                            decision=("anomalous" if bool(labels[i]) else "normal") if self.image_threshold is not None else "",
                            overlay=names["overlay"].name,
                        )
                        bar.update(1)
                rows.extend(batch_rows)
                write_csv(csv_path, rows, fieldnames=SCORES_CSV_COLUMNS)
        finally:
            bar.close()
            # an exception or Ctrl-C mid-batch: keep the rows of the finished batches (and the table's header)
            if not csv_path.exists() or len(rows) < len(inputs):
                write_csv(csv_path, rows, fieldnames=SCORES_CSV_COLUMNS)
        return rows

    def _model_channels(self, image: torch.Tensor, path: Path) -> torch.Tensor:
        """``image`` with the channel count the model was trained on, with a warning when it is converted."""
        if self.channels is None or image.shape[0] == self.channels:
            return image
        if self.channels == 3:
            logger.warning("%s is a grey image; the model was trained on RGB images: grey repeated to RGB", path)
            return image.expand(3, -1, -1)
        logger.warning("%s is an RGB image; the model was trained on grey images: converted to grey (luma)", path)
        return torch.tensordot(torch.tensor([0.299, 0.587, 0.114]), image, dims=1)[None]

    def _forward_one_by_one(self, batch: torch.Tensor, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """``_forward`` image by image; an image that runs out of memory gets an error in its row and NaN outputs."""
        size = batch.shape[-1]
        parts: dict[str, list[torch.Tensor]] = {"anomaly_map": [], "uncertainty_map": [], "pred_score": []}
        for index, row in enumerate(rows):
            try:
                out = self._forward(batch[index : index + 1])
            except MemoryError as err:
                row["error"] = _format_error(err) or "MemoryError"
                out = {"anomaly_map": torch.full((1, 1, size, size), float("nan")), "uncertainty_map": torch.full((1, 1, size, size), float("nan")),
                       "pred_score": torch.full((1,), float("nan"))}
            for key in parts:
                parts[key].append(out[key])
        return {key: torch.cat(values) for key, values in parts.items()}

    def _write_outputs(self, names: dict[str, Path], original: torch.Tensor, anomaly_map: torch.Tensor, uncertainty_map: torch.Tensor) -> None:
        """Resize one image's (1, S, S) maps to its own size and write its four files."""
        import matplotlib

        size = tuple(original.shape[-2:])
        amap = _resize(anomaly_map[None].float(), size)[0, 0].numpy()
        umap = _resize(uncertainty_map[None].float(), size)[0, 0].numpy()
        image = original.float().div_(255.0)
        mask = ThresholdAnomalyMap(self.pixel_threshold)(amap) if self.pixel_threshold is not None else None
        # a fixed colour scale (the normal range up to 2x the threshold) keeps overlays of different images comparable
        vmin = self.pixel_min if self.pixel_threshold is not None else None
        vmax = self.pixel_max if self.pixel_threshold is not None else None
        renderer = RenderHeatmapOverlay(alpha=0.5, colormap="jet", vmin=vmin, vmax=vmax)
        save_png(names["overlay"], renderer(image, amap, mask))
        save_array(names["anomaly_map"], amap)
        save_array(names["uncertainty"], umap)
        viridis = matplotlib.colormaps["viridis"]
        save_png(names["uncertainty_png"], np.rint(viridis(np.clip(umap, 0.0, 1.0))[..., :3] * 255.0).astype(np.uint8))
