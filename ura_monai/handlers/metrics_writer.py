"""Write an evaluation's anomaly-detection metrics and per-image scores to a folder."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from ura_monai.utils.distributed import is_rank0
from ura_monai.utils.fileio import atomic_write_text

__all__ = ["AnomalyMetricsWriter"]

logger = logging.getLogger("ura_monai")


class AnomalyMetricsWriter:
    """At the end of an evaluation, write ``metrics.json``, ``per_image.csv`` and ``roc_curve.png`` to ``output_dir``.

    ``metrics.json`` holds every metric of ``metric_names`` found in ``engine.state.metrics`` that is defined
    (finite); undefined ones (pixel AUROC and AUPRO without masks, image metrics with one class) are listed under
    ``"undefined"`` instead. It also records the number of images and of abnormal images. ``per_image.csv`` has
    the path, label, defect type and score of every image. Only rank 0 writes.

    Args:
        output_dir: folder (created when missing), e.g. ``<bundle_root>/eval``.
        metric_names: metrics to report, in order.
        extra: more values for ``metrics.json`` (e.g. the checkpoint path).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        metric_names: Sequence[str] = ("image_auroc", "pixel_auroc", "aupro", "f1_max"),
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.metric_names = tuple(metric_names)
        self.extra = dict(extra or {})
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def _reset(self, engine: Engine) -> None:
        self.rows = []

    def _collect(self, engine: Engine) -> None:
        out: Any = engine.state.output
        scores = out["pred_score"].reshape(-1)
        for i in range(scores.shape[0]):
            self.rows.append(
                {
                    "image_path": out["image_path"][i] if "image_path" in out else "",
                    "label": int(out["label"][i]) if "label" in out else "",
                    "defect_type": out["defect_type"][i] if "defect_type" in out else "",
                    "pred_score": float(scores[i]),
                }
            )

    def write(self, engine: Engine) -> Path | None:
        """Write the files; returns the path of ``metrics.json`` (None on ranks other than 0)."""
        if not is_rank0():
            return None
        from ura_monai.data.writers import save_roc_curve_png, write_csv

        metrics: dict[str, Any] = {}
        undefined = []
        for name in self.metric_names:
            value = engine.state.metrics.get(name)
            if value is None or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
                undefined.append(name)
            else:
                metrics[name] = float(value)
        labels = [r["label"] for r in self.rows if r["label"] != ""]
        report = {
            **metrics,
            "undefined": undefined,
            "images": len(self.rows),
            "abnormal_images": int(sum(labels)),
            **self.extra,
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = atomic_write_text(self.output_dir / "metrics.json", json.dumps(report, indent=2))
        write_csv(self.output_dir / "per_image.csv", self.rows)
        if labels and 0 < sum(labels) < len(labels):
            save_roc_curve_png(
                self.output_dir / "roc_curve.png", [r["pred_score"] for r in self.rows], labels, title="image ROC"
            )
        logger.info("wrote %s: %s", path, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()) or "no defined metric")
        return path
