"""Inference over a datalist with the URA-Net evaluator, thresholds from normal data, and ``test`` (metrics,
per-image table, ROC curve): the evaluation side of the engines; :mod:`.workflow` is the training side."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from ignite.engine import Events
from ignite.handlers.tqdm_logger import ProgressBar

from ura_monai.engines.evaluator import URANetEvaluator
from ura_monai.engines.loaders import image_loader
from ura_monai.metrics import ANOMALY_METRIC_NAMES, AnomalyDetectionMetric, anomalous_tpr, normal_fpr
from ura_monai.networks.checkpoint import load_checkpoint
from ura_monai.networks.nets.ura_net import URANet
from ura_monai.transforms.thresholds import DEFAULT_FALSE_ALARM_RATE, normal_postprocessing_stats
from ura_monai.utils.distributed import unwrap
from ura_monai.utils.fileio import atomic_write_text
from ura_monai.utils.paths import mark_output_dir

__all__ = [
    "OPERATING_POINT_RATES",
    "run_inference",
    "compute_thresholds",
    "normal_scores_and_maps",
    "operating_points",
    "test",
]

logger = logging.getLogger("ura_monai")


def run_inference(
    model: URANet,
    items: Sequence[dict],
    image_size: int,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    num_samples: int | None = None,
    amp: bool = False,
    progress: bool = True,
    metric: AnomalyDetectionMetric | None = None,
    channels: int | None = None,
    warn_conversion: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run a ``URANetEvaluator`` over ``items``.

    Returns:
        ``(metrics, per_image)``: the metric dict (empty without ``metric``) and, per image, its path, label,
        defect type and score, with the (B, 1, H, W) maps under ``"anomaly_map"``/``"uncertainty_map"``.
    """
    device = torch.device(device)
    evaluator = URANetEvaluator(
        device=device,
        val_data_loader=image_loader(items, image_size, batch_size, num_workers, channels, warn_conversion),
        network=model.to(device),
        num_samples=num_samples,
        amp=amp,
    )
    if metric is not None:  # attached directly: MONAI registers extra metrics only beside a key metric
        metric.attach(evaluator, "anomaly")
    per_image: list[dict[str, Any]] = []

    @evaluator.on(Events.ITERATION_COMPLETED)
    def _collect(engine):
        out = engine.state.output
        for i in range(out["pred_score"].shape[0]):
            per_image.append(
                {
                    "image_path": out["image_path"][i],
                    "label": int(out["label"][i]),
                    "defect_type": out["defect_type"][i] if "defect_type" in out else "",
                    "pred_score": float(out["pred_score"][i]),
                    "anomaly_map": out["anomaly_map"][i],
                    "uncertainty_map": out["uncertainty_map"][i],
                }
            )

    if progress:
        ProgressBar(desc="inference", persist=False).attach(evaluator)
    evaluator.run()
    metrics = {k: float(v) for k, v in evaluator.state.metrics.items() if not isinstance(v, dict)}
    return metrics, per_image


# false-alarm rates at which ``operating_points`` reports the decision rates
OPERATING_POINT_RATES = (0.01, 0.02, 0.05, 0.1)


def operating_points(
    scores: Sequence[float] | torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    normal_scores: Sequence[float],
    rates: Sequence[float] = OPERATING_POINT_RATES,
) -> dict[str, dict[str, float]]:
    """``{str(rate): {"image_threshold", "normal_fpr", "anomalous_tpr"}}``: the test images' decision rates at the
    image threshold each false-alarm ``rate`` gives on the ``normal_scores`` (as ``fit`` sets the stored one), so that
    one set of test scores shows the whole trade-off."""
    points = {}
    for rate in rates:
        threshold = normal_postprocessing_stats(normal_scores, false_alarm_rate=rate)["image_threshold"]
        points[str(rate)] = {
            "image_threshold": round(threshold, 6),
            "normal_fpr": round(normal_fpr(scores, labels, threshold), 4),
            "anomalous_tpr": round(anomalous_tpr(scores, labels, threshold), 4),
        }
    return points


def compute_thresholds(
    network: torch.nn.Module,
    data: Sequence[dict[str, Any]],
    image_size: int,
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
    **options: Any,
) -> dict[str, float]:
    """Image and pixel thresholds from normal data: ``normal_postprocessing_stats`` of the scores and maps that
    :func:`normal_scores_and_maps` gives for ``network``, ``data``, ``image_size`` and its keyword ``options``
    (channels, batch_size, device, num_workers, amp and the cached training_features, training_images,
    training_groups), the image threshold at the ``1 - false_alarm_rate`` quantile of the normal scores (recorded
    as ``image_false_alarm_rate``)."""
    scores, maps = normal_scores_and_maps(network, data, image_size, **options)
    return normal_postprocessing_stats(scores, maps, false_alarm_rate=false_alarm_rate)


def normal_scores_and_maps(
    network: torch.nn.Module,
    data: Sequence[dict[str, Any]],
    image_size: int,
    channels: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    amp: bool = False,
    training_features: torch.Tensor | None = None,
    training_images: Iterable[torch.Tensor] | None = None,
    training_groups: torch.Tensor | None = None,
) -> tuple[list[float], torch.Tensor | None]:
    """``(image scores, anomaly maps (N, 1, H, W) or None)`` of normal data, that thresholds are set from: the
    held-out normal images ``data``, with the uncertainty passes off (they do not change the map), and, given the cached
    ``training_features``, the training images cross-fitted (``URANet.cross_fitted_grid_maps``: each block of images
    scored by normal models fitted without it), so that the thresholds rest on every normal image instead of a handful.
    A map guided by the image (``guided_radius > 0``) needs those images too: ``training_images``, batches of them in
    the rows' order (``engines.features.view_images``); ``training_groups``, the image of each row
    (``engines.features.bank_images``), keeps an image's views in one block. With ``score_map="grid_and_position"``
    the image scorer's statistics are set first, from the same normal images (``ImageScorer.calibrate``). ``network``
    may be DDP-wrapped; its train/eval mode is restored."""
    model = cast(URANet, unwrap(network))
    was_training = model.training
    model.eval()
    cross_fitted = (
        None
        if training_features is None
        else model.cross_fitted_grid_maps(training_features.to(model.map_calibration.device), groups=training_groups)
    )
    if model.image_scorer.needs_position:
        _calibrate_image_scorer(model, data, image_size, channels, batch_size, device, cross_fitted)
    _, outputs = run_inference(
        model,
        data,
        image_size,
        batch_size,
        device,
        num_workers,
        num_samples=0,
        amp=amp,
        progress=False,
        channels=channels,
    )
    model.train(was_training)
    scores = [float(o["pred_score"]) for o in outputs]
    maps = [torch.stack([o["anomaly_map"] for o in outputs]).float().cpu()] if outputs else []
    if cross_fitted is not None:
        grid, position = cross_fitted
        for rows, guide in _grid_parts_and_guides(model, grid.shape[0], training_images):
            part_maps = model.map_generator(grid[rows], (image_size, image_size), guide=guide)
            scores += model.score_images(grid[rows], part_maps, position[rows]).tolist()
            maps.append(part_maps.float().cpu())
    return scores, (torch.cat(maps) if maps else None)


@torch.no_grad()
def _calibrate_image_scorer(
    model: URANet,
    data: Sequence[dict[str, Any]],
    image_size: int,
    channels: int | None,
    batch_size: int,
    device: str | torch.device,
    cross_fitted: tuple[torch.Tensor, torch.Tensor] | None,
) -> None:
    """``model.image_scorer.calibrate`` on the grid maps and position distances of the normal images ``data`` and of
    the cross-fitted training images (``(grid maps, positions)`` or None)."""
    grids, positions = ([cross_fitted[0]], [cross_fitted[1]]) if cross_fitted is not None else ([], [])
    for batch in image_loader(data, image_size, batch_size, 0, channels):
        features = model.feature_extractor(batch["image"].to(device)).float()
        grid, _, position = model.signal_perception(features, 0)
        grids.append(grid)
        positions.append(position)
    if sum(g.shape[0] for g in grids) < 2:  # one image has no spread: the scorer keeps its neutral statistics
        logger.warning("the image score's statistics need at least two normal images; the score is left uncalibrated")
        return
    model.image_scorer.calibrate(
        torch.cat([g.float().to(device) for g in grids]), torch.cat([p.float().to(device) for p in positions])
    )


def _grid_parts_and_guides(
    model: URANet, rows: int, images: Iterable[torch.Tensor] | None
) -> Iterator[tuple[slice, torch.Tensor | None]]:
    """``(a chunk of the ``rows`` cached grid maps, their images or None)``: the images only where the map is guided by
    them."""
    if not model.map_generator.needs_guide:
        yield from ((slice(start, min(start + 32, rows)), None) for start in range(0, rows, 32))
        return
    if images is None:
        raise ValueError("the model's map is guided by the image: thresholds from training features need their images")
    row = 0
    device = model.map_calibration.device
    for guide in images:
        yield slice(row, row + guide.shape[0]), guide.to(device)
        row += guide.shape[0]
    if row != rows:
        raise ValueError(f"{row} training images for {rows} cached feature maps")


def test(
    checkpoint: str | Path | URANet,
    test_items: Sequence[dict],
    output_dir: str | Path | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    num_samples: int | None = None,
    amp: bool = False,
    progress: bool = True,
    image_size: int | None = None,
    image_threshold: float | None = None,
    channels: int | None = None,
    normal_scores: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint (or model) on labelled test items.

    Images are converted to the model's channel count (``channels``, else the checkpoint's, else RGB), with a
    warning naming each converted file when the count is known.

    Writes, with ``output_dir``: ``metrics.json``, ``per_image.csv`` (path, label, defect, score), ``roc_curve.png``.

    Args:
        num_samples: perception passes for the uncertainty map (default None: the model's setting); 0 is
            faster (map and score only) but the uncertainty is then zero and ``uncertainty_error_auroc`` NaN.
        image_threshold: image threshold for ``normal_fpr`` / ``anomalous_tpr``; defaults to the checkpoint's
            stored ``postprocessing["image_threshold"]`` (none when a model is given: the rates are NaN).
        normal_scores: the normal image scores thresholds come from, for ``operating_points``; defaults to the
            checkpoint's ``extra["normal_image_scores"]`` (none when a model is given, or in older checkpoints).

    Returns:
        dict with the metric values of ``ANOMALY_METRIC_NAMES`` (``image_auroc``, ``pixel_auroc``, ``aupro``,
        ``f1_max``, ``pixel_ap``, ``pixel_f1_max``, ``uncertainty_error_auroc``, ``normal_fpr``,
        ``anomalous_tpr``; NaN where undefined), ``image_threshold``, ``test_images``,
        ``test_images_per_second``, ``per_image`` and, with normal scores and both classes among the test images,
        ``operating_points`` (:func:`operating_points`).
    """
    if isinstance(checkpoint, URANet):
        model = checkpoint.eval()
    else:
        model, loaded = load_checkpoint(checkpoint, device)
        extra = loaded.get("extra", {})
        channels, normal_scores = channels or extra.get("channels"), normal_scores or extra.get("normal_image_scores")
        if image_threshold is None:
            image_threshold = (loaded.get("postprocessing") or {}).get("image_threshold")
    size = image_size or model.config["image_size"]
    start = time.perf_counter()
    # one channel count per run, so grey and colour test images batch; the network repeats grey to RGB anyway
    metrics, per_image = run_inference(
        model,
        test_items,
        size,
        batch_size,
        device,
        num_workers,
        num_samples,
        amp,
        progress,
        metric=AnomalyDetectionMetric(image_threshold=image_threshold),
        channels=channels or 3,
        warn_conversion=channels is not None,
    )
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {k: metrics.get(k, math.nan) for k in ANOMALY_METRIC_NAMES}
    result |= {"image_threshold": image_threshold, "test_images": len(per_image)}
    result["test_images_per_second"] = round(len(per_image) / seconds, 3) if seconds > 0 else math.nan
    rows = [{k: v for k, v in r.items() if not k.endswith("_map")} for r in per_image]
    labels = [int(r["label"]) for r in rows]
    if normal_scores and 0 < sum(labels) < len(labels):
        result["operating_points"] = operating_points([r["pred_score"] for r in rows], labels, normal_scores)
    if output_dir is not None:
        from ura_monai.data.writers import save_roc_curve_png, write_csv

        output_dir = mark_output_dir(output_dir, "test")
        atomic_write_text(output_dir / "metrics.json", json.dumps(result, indent=2))
        write_csv(output_dir / "per_image.csv", rows)
        if 0 < sum(labels) < len(labels):
            save_roc_curve_png(output_dir / "roc_curve.png", [r["pred_score"] for r in rows], labels, title="image ROC")
    result["per_image"] = per_image
    return result
