"""Ignite handler that runs URA-Net's perception stage when training completes (the bundle's path to
:func:`ura_monai.engines.perception.train_perception_from_items`, which ``fit`` calls directly)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events

from ura_monai.engines.perception import train_perception_from_items
from ura_monai.utils.distributed import is_rank0

__all__ = ["URANetPerceptionStage"]

logger = logging.getLogger(__name__)


class URANetPerceptionStage:
    """Train the signal perception on synthetic defects painted into the training images when the trainer
    completes; list it before ``URANetCheckpointSaver`` so that the final checkpoint and its thresholds include it.

    Args:
        network: the URANet being trained (a DDP wrapper is unwrapped).
        dataset: the training ``FeatureCacheDataset`` (its ``bank``: features under the fitted level scale).
        data: the training datalist the cache was made from.
        image_size: the network's input size.
        channels: how images are loaded (None as stored, 1 grey, 3 RGB).
        batch_size: the batch size the cache was extracted with.
        seed: seed of the synthetic defects and the stage's draws.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        dataset: Any,
        data: Sequence[dict[str, Any]],
        image_size: int,
        channels: int | None = None,
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        self.network, self.dataset, self.data = network, dataset, list(data)
        self.image_size, self.channels, self.batch_size, self.seed = int(image_size), channels, int(batch_size), seed
        self.summary: dict[str, Any] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not is_rank0():  # only rank 0 writes the checkpoint
            return
        was_training = self.network.training
        self.network.eval()
        self.summary = train_perception_from_items(
            self.network, self.data, self.dataset.bank, self.image_size, self.channels, self.batch_size, self.seed
        )
        self.network.train(was_training)
        if self.summary:
            logger.info("perception stage: %s", self.summary)
