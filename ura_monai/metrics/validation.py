"""Metrics for bundle workflows: the validation key metric and a scalar-only form of ``AnomalyDetectionMetric``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric

from ura_monai.metrics.anomaly_metrics import AnomalyDetectionMetric, batch_tensor
from ura_monai.metrics.functional import image_auroc

__all__ = ["ValidationScore", "ScalarAnomalyMetrics", "scores_and_labels"]


def scores_and_labels(output: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``output_transform`` giving ``AnomalyDetectionMetric`` the image scores and labels only (no maps kept)."""
    return output["pred_score"], output["label"]


class ValidationScore(Metric):
    """Key metric of validation during training, higher is better.

    - When the validation images include abnormal ones: the image AUROC.
    - Otherwise (normal images only): minus the mean anomaly map of the normal images, i.e. minus their mean
      restoration residual (how far the restoration of normal features is from the features).

    On ``completed`` it also writes ``<name>_image_auroc`` (NaN without abnormal images) and
    ``<name>_normal_residual`` to ``engine.state.metrics``, so loggers show what the score is made of.
    """

    # ignite picks these from the engine's output dict and hands them to ``update`` as a tuple
    required_output_keys = ("pred_score", "label", "anomaly_map")

    def __init__(self, output_transform=lambda x: x, device: str | torch.device = "cpu") -> None:
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._map_means: list[torch.Tensor] = []

    def update(self, output: tuple[Any, Any, Any]) -> None:
        """
        Args:
            output: ``(pred_score [B], label [B], anomaly_map [B, 1, H, W])``.
        """
        scores = batch_tensor(output[0]).reshape(-1).double()
        labels = batch_tensor(output[1]).reshape(-1).double()
        maps = batch_tensor(output[2]).float()
        self._scores.append(scores)
        self._labels.append(labels)
        self._map_means.append(maps.flatten(1).mean(1).double())

    def _compute_all(self) -> dict[str, float]:
        if not self._scores:
            raise NotComputableError("ValidationScore needs at least one batch")
        scores, labels, means = torch.cat(self._scores), torch.cat(self._labels), torch.cat(self._map_means)
        normal = labels < 0.5
        residual = float(means[normal].mean()) if bool(normal.any()) else math.nan
        both = bool(normal.any()) and not bool(normal.all())
        auroc = image_auroc(scores.numpy(), labels.numpy()) if both else math.nan
        return {"score": auroc if both else -residual, "image_auroc": auroc, "normal_residual": residual}

    def compute(self) -> float:
        return self._compute_all()["score"]

    def completed(self, engine, name: str) -> None:
        values = self._compute_all()
        engine.state.metrics[name] = values["score"]
        engine.state.metrics[f"{name}_image_auroc"] = values["image_auroc"]
        engine.state.metrics[f"{name}_normal_residual"] = values["normal_residual"]


class ScalarAnomalyMetrics(AnomalyDetectionMetric):
    """``AnomalyDetectionMetric`` that puts only its scalar results into ``engine.state.metrics``.

    Ignite stores a dict-valued metric both flattened (``image_auroc``, ...) and as the dict under its own name;
    the dict trips loggers that expect numbers (``StatsHandler``, MLflow). This keeps the flattened values only.
    """

    def completed(self, engine, name: str) -> None:
        result = self.compute()
        if isinstance(result, Mapping):
            for key, value in result.items():
                engine.state.metrics[key] = value
        else:
            engine.state.metrics[name] = result
