"""URA-Net evaluation iteration on MONAI's ``SupervisedEvaluator``."""

from __future__ import annotations

from typing import Any

import torch
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents

__all__ = ["URANetEvaluator"]


class URANetEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` running URA-Net inference on batches of images.

    ``engine.state.output`` holds ``pred_score`` (B,), ``anomaly_map`` and ``uncertainty_map`` (B, 1, H, W) on the
    CPU, plus the batch's ``label``, ``mask`` and ``image_path``, ready for ``AnomalyDetectionMetric`` and writers.

    Args:
        args, kwargs: as ``monai.engines.SupervisedEvaluator``.
        num_samples: perception passes for the uncertainty map (None: the model's setting; 0: none, fastest).
    """

    def __init__(self, *args: Any, num_samples: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("decollate", False)
        super().__init__(*args, **kwargs)
        self.num_samples = num_samples

    def _iteration(self, engine: URANetEvaluator, batchdata: dict[str, Any]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        device = engine.state.device
        images = batchdata["image"].to(device, non_blocking=engine.non_blocking)
        engine.network.eval()
        with (
            torch.inference_mode(),
            torch.autocast(device.type, enabled=engine.amp and device.type == "cuda", **engine.amp_kwargs),
        ):
            prediction = engine.network(images, num_samples=self.num_samples)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        output = {k: v.float().cpu() for k, v in prediction.items()}
        for key in ("label", "mask", "has_mask", "image_path", "defect_type"):
            if key in batchdata:
                output[key] = batchdata[key]
        engine.state.output = output
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return output
