"""URA-Net training iteration on MONAI's ``SupervisedTrainer``."""

from __future__ import annotations

from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents

from ura_monai.utils.distributed import unwrap

__all__ = ["URANetTrainer"]


class URANetTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` whose iteration is URA-Net's self-supervised step.

    A batch is a dict holding either cached backbone ``"features"`` (B, C, h, w) or ``"image"`` (B, C, H, W)
    intensities in [0, 1], whose features are then computed by the frozen extractor on the fly (needed when
    augmentations are random). Labels are not used: FASM makes the targets. ``engine.state.output`` holds
    ``"loss"`` and every weighted loss term, so MONAI's ``StatsHandler`` and ``TensorBoardStatsHandler`` log them.

    Args:
        args, kwargs: as ``monai.engines.SupervisedTrainer``; ``loss_function`` is a ``URANetLoss``.
        generator: optional generator for repeatable FASM draws (seed it).
    """

    def __init__(self, *args: Any, generator: torch.Generator | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("decollate", False)
        super().__init__(*args, **kwargs)
        self.fasm_generator = generator

    def _iteration(self, engine: URANetTrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        model = unwrap(engine.network)
        device = engine.state.device
        if "features" in batchdata:
            features = batchdata["features"].to(device, non_blocking=engine.non_blocking)
        else:
            with torch.no_grad():
                features = model.feature_extractor(batchdata["image"].to(device, non_blocking=engine.non_blocking))
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with torch.autocast(device.type, enabled=engine.amp and device.type == "cuda", **engine.amp_kwargs):
            # through the (possibly DDP-wrapped) network, so that gradients are synchronised across ranks
            outputs = engine.network(features=features, synthesize=True, generator=self.fasm_generator)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            losses = engine.loss_function(outputs, model)
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if engine.amp and engine.scaler is not None:
            engine.scaler.scale(losses["loss"]).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            losses["loss"].backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        engine.state.output = {k: v.detach() for k, v in losses.items()}
        return engine.state.output
