"""Training pieces a bundle config instantiates: the trainer, and (by their names of ``ura_monai.bundle``) the
cached-feature dataset and the LR schedule, which live in :mod:`ura_monai.engines` because ``workflow.fit`` trains
with them too."""

from __future__ import annotations

import logging

import torch

from ura_monai.engines.features import FeatureCacheDataset
from ura_monai.engines.schedule import CosineDecay
from ura_monai.engines.trainer import URANetTrainer

__all__ = ["FeatureCacheDataset", "CosineDecay", "URANetBundleTrainer"]

logger = logging.getLogger("ura_monai")


class URANetBundleTrainer(URANetTrainer):
    """``URANetTrainer`` whose ``engine.state.output`` is a one-item list ``[{"loss": ..., <terms>}]``.

    That is the shape MONAI's trainers give when they decollate (per-sample dicts with the loss replicated), which
    MONAI's stock handler settings read with ``from_engine(["loss"], first=True)``: e.g. the ``MLFlowHandler``
    that ``python -m monai.bundle run ... --tracking mlflow`` adds. ``URANetTrainer`` itself returns the dict;
    read the terms with ``out[0]`` in output transforms.
    """

    def _iteration(self, engine: URANetTrainer, batchdata: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        output = super()._iteration(engine, batchdata)
        engine.state.output = [output]
        return engine.state.output
