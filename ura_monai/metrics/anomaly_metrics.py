"""
An Ignite metric that gathers anomaly scores (and optionally anomaly maps with masks) over an evaluation run
and reports image AUROC, F1-max, pixel AUROC, AUPRO, pixel AP, pixel F1-max, the uncertainty's error AUROC and the
decision rates at a stored image threshold, usable from MONAI workflows (``key_val_metric`` /
``additional_metrics`` of ``monai.engines.SupervisedEvaluator``) or any ``ignite.engine.Engine``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric

from ura_monai.metrics.functional import (
    anomalous_tpr,
    aupro,
    f1_max,
    image_auroc,
    normal_fpr,
    pixel_ap,
    pixel_auroc,
    pixel_f1_max,
    uncertainty_error_auroc,
)

__all__ = ["ANOMALY_METRIC_NAMES", "AnomalyDetectionMetric", "batch_tensor", "from_anomaly_output"]

ANOMALY_METRIC_NAMES: tuple[str, ...] = (
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "f1_max",
    "pixel_ap",
    "pixel_f1_max",
    "uncertainty_error_auroc",
    "normal_fpr",
    "anomalous_tpr",
)


def batch_tensor(data: Any) -> torch.Tensor:
    """Convert one batch item (tensor, MetaTensor, array, number or list of those) to a plain CPU tensor."""
    if isinstance(data, torch.Tensor):
        tensor = data.as_tensor() if hasattr(data, "as_tensor") else data  # drop MONAI MetaTensor metadata
        return tensor.detach().cpu()
    if isinstance(data, (list, tuple)):
        return torch.stack([batch_tensor(item) for item in data])
    return torch.as_tensor(data)


def from_anomaly_output(
    output: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    score_key: str = "pred_score",
    label_key: str = "label",
    map_key: str = "anomaly_map",
    mask_key: str = "mask",
    uncertainty_key: str = "uncertainty_map",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """
    Default ``output_transform`` of :class:`AnomalyDetectionMetric`: pick the batch items from an engine output.

    Accepts the batch dict of an engine (``{"pred_score": [B], "label": [B], "anomaly_map": [B,1,H,W],
    "mask": [B,1,H,W]}``) or the list of per-sample dicts that MONAI evaluators produce with ``decollate=True``.
    Use ``functools.partial(from_anomaly_output, score_key=...)`` for other keys.

    Args:
        output: ``engine.state.output``.
        score_key: key of the per-image anomaly scores.
        label_key: key of the per-image 0/1 labels.
        map_key: key of the anomaly maps; may be absent.
        mask_key: key of the ground-truth masks; may be absent.
        uncertainty_key: key of the uncertainty maps; may be absent.

    Returns:
        ``(scores, labels, maps, masks, uncertainty)`` as CPU tensors, maps/masks/uncertainty ``None`` when absent.
    """
    if isinstance(output, Mapping):
        items: Sequence[Mapping[str, Any]] | None = None
        batch = output
    elif isinstance(output, Sequence) and len(output) > 0 and all(isinstance(item, Mapping) for item in output):
        items = output
        batch = output[0]
    else:
        raise TypeError(f"expected the engine output to be a dict or a list of dicts, got {type(output).__name__}.")
    for key in (score_key, label_key):
        if key not in batch:
            raise KeyError(f"engine output has no '{key}' key (keys: {list(batch.keys())}).")

    def pick(key: str) -> torch.Tensor | None:
        if key not in batch or batch[key] is None:
            return None
        if items is None:
            return batch_tensor(batch[key])
        return torch.stack([batch_tensor(item[key]) for item in items])  # re-collate per-sample dicts

    scores, labels = pick(score_key), pick(label_key)
    return scores, labels, pick(map_key), pick(mask_key), pick(uncertainty_key)  # type: ignore[return-value]


class AnomalyDetectionMetric(Metric):
    """
    Accumulate per-batch anomaly scores, labels and (optionally) anomaly maps with ground-truth masks, and
    compute ``ANOMALY_METRIC_NAMES`` at the end of the run (see :mod:`ura_monai.metrics.functional`):
    ``image_auroc``, ``pixel_auroc``, ``aupro``, ``f1_max`` (image level), ``pixel_ap``, ``pixel_f1_max``,
    ``uncertainty_error_auroc`` and, at ``image_threshold``, ``normal_fpr`` / ``anomalous_tpr``.

    Undefined values are NaN rather than errors: image metrics when only one class of image label was seen;
    pixel metrics when no masks, no anomalous pixel or no normal pixel were seen; ``uncertainty_error_auroc``
    also without uncertainty maps, when every pixel is right at the F1-optimal threshold, or when the
    uncertainty is constant (no stochastic passes); ``normal_fpr`` / ``anomalous_tpr`` without
    ``image_threshold`` or without images of that class.
    Maps (and uncertainty maps, kept only when ``uncertainty_error_auroc`` is requested) are kept on the CPU in
    ``map_dtype`` (float16 by default: half the memory of float32; values must stay below 65504) and masks as bool.

    Attached with ``metric.attach(engine, "anomaly")``, ``engine.state.metrics["anomaly"]`` holds the dict and,
    because Ignite flattens mapping results, ``engine.state.metrics["image_auroc"]`` etc. hold each value
    (so ``name`` must not be one of the keys). With a single name in ``metric_names`` the result is a plain
    float, which MONAI workflows can use as ``key_val_metric`` to pick the best checkpoint.

    Example::

        metric = AnomalyDetectionMetric()
        metric.attach(evaluator, "anomaly")
        evaluator.run()
        evaluator.state.metrics["image_auroc"], evaluator.state.metrics["aupro"]

    Args:
        output_transform: maps ``engine.state.output`` to ``(scores [B], labels [B])``,
            ``(scores, labels, maps [B,1,H,W] | None, masks [B,1,H,W] | None)`` or the same with
            ``uncertainty [B,1,H,W] | None`` last. Defaults to :func:`from_anomaly_output` (keys "pred_score",
            "label", "anomaly_map", "mask", "uncertainty_map").
        metric_names: the metrics to compute, among ``ANOMALY_METRIC_NAMES``; a single string makes
            ``compute()`` return that float instead of a dict. Defaults to all of them.
        image_threshold: image score threshold (``score >= threshold`` is flagged anomalous, as the predictor
            does), e.g. the checkpoint's ``postprocessing["image_threshold"]``; ``None`` makes ``normal_fpr``
            and ``anomalous_tpr`` NaN.
        fpr_limit: FPR integration limit of AUPRO. Defaults to 0.3.
        num_thresholds: FPR sampling points of AUPRO. Defaults to 2000.
        map_dtype: dtype the anomaly maps are stored in while accumulating. Defaults to ``torch.float16``.
        device: Ignite's metric device; accumulation is always on the CPU.

    Note:
        Values are gathered on the local process only (no distributed all-gather).
    """

    required_output_keys = None  # the default output_transform already unpacks the engine's dict

    def __init__(
        self,
        output_transform: Callable[[Any], Any] = from_anomaly_output,
        metric_names: str | Sequence[str] = ANOMALY_METRIC_NAMES,
        fpr_limit: float = 0.3,
        num_thresholds: int = 2000,
        map_dtype: torch.dtype = torch.float16,
        device: str | torch.device = "cpu",
        image_threshold: float | None = None,
    ) -> None:
        self.return_single = isinstance(metric_names, str)
        self.metric_names: tuple[str, ...] = (metric_names,) if isinstance(metric_names, str) else tuple(metric_names)
        unknown = set(self.metric_names) - set(ANOMALY_METRIC_NAMES)
        if unknown or not self.metric_names:
            raise ValueError(f"metric_names must be among {ANOMALY_METRIC_NAMES}, got {self.metric_names}.")
        self.fpr_limit = fpr_limit
        self.num_thresholds = num_thresholds
        self.map_dtype = map_dtype
        self.image_threshold = None if image_threshold is None else float(image_threshold)
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        """Forget everything accumulated (called by Ignite at each epoch start)."""
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._maps: list[torch.Tensor] = []
        self._masks: list[torch.Tensor] = []
        self._uncertainty: list[torch.Tensor] = []

    def update(self, output: Sequence[Any]) -> None:
        """
        Add one batch.

        Args:
            output: ``(scores, labels)``, ``(scores, labels, maps, masks)`` or
                ``(scores, labels, maps, masks, uncertainty)``; maps/masks/uncertainty may be ``None`` (maps and
                masks are needed for pixel metrics, all three for ``uncertainty_error_auroc``). Tensors, arrays
                or lists are accepted.
        """
        if not isinstance(output, Sequence) or len(output) not in (2, 4, 5):
            raise ValueError(
                "output must be (scores, labels), (scores, labels, maps, masks) or (scores, labels, maps, masks, uncertainty)."
            )
        scores, labels = output[0], output[1]
        maps, masks = (output[2], output[3]) if len(output) >= 4 else (None, None)
        uncertainty = output[4] if len(output) == 5 else None
        scores_cpu = batch_tensor(scores).reshape(-1).to(torch.float64)
        labels_cpu = batch_tensor(labels).reshape(-1)
        if scores_cpu.numel() != labels_cpu.numel():
            raise ValueError(f"got {scores_cpu.numel()} scores but {labels_cpu.numel()} labels in a batch.")
        self._scores.append(scores_cpu)
        self._labels.append(labels_cpu.to(torch.float64))
        if maps is not None and masks is not None:
            maps_cpu = batch_tensor(maps).to(self.map_dtype)
            masks_cpu = batch_tensor(masks) > 0.5  # bool: 1 byte per pixel
            if maps_cpu.shape != masks_cpu.shape:
                raise ValueError(
                    f"anomaly map shape {tuple(maps_cpu.shape)} differs from mask shape {tuple(masks_cpu.shape)}."
                )
            # one entry per image, so batches of different spatial sizes can be mixed
            self._maps.extend(maps_cpu.unbind(0))
            self._masks.extend(masks_cpu.unbind(0))
            if uncertainty is not None and "uncertainty_error_auroc" in self.metric_names:
                uncertainty_cpu = batch_tensor(uncertainty).to(self.map_dtype)
                if uncertainty_cpu.shape != maps_cpu.shape:
                    raise ValueError(
                        f"uncertainty map shape {tuple(uncertainty_cpu.shape)} differs from anomaly map shape {tuple(maps_cpu.shape)}."
                    )
                self._uncertainty.extend(uncertainty_cpu.unbind(0))

    def compute(self) -> dict[str, float] | float:
        """
        Compute the requested metrics on everything accumulated since the last reset.

        Returns:
            ``{name: value}`` for ``metric_names``, or a single float when ``metric_names`` was a string.

        Raises:
            NotComputableError: when no batch was seen.
        """
        if not self._scores:
            raise NotComputableError("AnomalyDetectionMetric must have at least one batch before it can be computed.")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                warnings.warn("AnomalyDetectionMetric computes on this process's samples only.", stacklevel=2)

        results: dict[str, float] = {}
        scores = torch.cat(self._scores).numpy()
        labels = torch.cat(self._labels).numpy()
        num_anomalous = int((labels > 0.5).sum())
        both_image_classes = 0 < num_anomalous < labels.size
        if "image_auroc" in self.metric_names:
            results["image_auroc"] = image_auroc(scores, labels) if both_image_classes else math.nan
        if "f1_max" in self.metric_names:
            results["f1_max"] = f1_max(scores, labels) if both_image_classes else math.nan
        for name, rate in (("normal_fpr", normal_fpr), ("anomalous_tpr", anomalous_tpr)):
            if name in self.metric_names:
                results[name] = math.nan if self.image_threshold is None else rate(scores, labels, self.image_threshold)

        anomalous_pixels = sum(int(mask.sum()) for mask in self._masks)
        total_pixels = sum(mask.numel() for mask in self._masks)
        both_pixel_classes = 0 < anomalous_pixels < total_pixels
        # per-image numpy views (no copy); the functions convert each to float32 as needed
        maps = [image_map.numpy() for image_map in self._maps]
        masks = [mask.numpy() for mask in self._masks]
        if "pixel_auroc" in self.metric_names:
            results["pixel_auroc"] = pixel_auroc(maps, masks) if both_pixel_classes else math.nan
        if "aupro" in self.metric_names:
            results["aupro"] = (
                aupro(maps, masks, fpr_limit=self.fpr_limit, num_thresholds=self.num_thresholds)
                if both_pixel_classes
                else math.nan
            )
        if "pixel_ap" in self.metric_names:
            results["pixel_ap"] = pixel_ap(maps, masks) if both_pixel_classes else math.nan
        if "pixel_f1_max" in self.metric_names:
            results["pixel_f1_max"] = pixel_f1_max(maps, masks) if both_pixel_classes else math.nan
        if "uncertainty_error_auroc" in self.metric_names:
            # every image that has a map must have an uncertainty map too, else the pixels would not line up
            have_uncertainty = both_pixel_classes and len(self._uncertainty) == len(self._maps)
            results["uncertainty_error_auroc"] = (
                uncertainty_error_auroc(maps, [u.numpy() for u in self._uncertainty], masks)
                if have_uncertainty
                else math.nan
            )

        ordered = {name: results[name] for name in self.metric_names}
        return ordered[self.metric_names[0]] if self.return_single else ordered
