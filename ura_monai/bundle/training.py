"""Training pieces a bundle config instantiates: the trainer, rank helpers, and (by their names of
``ura_monai.bundle``) the cached-feature dataset and the LR schedule, which live in :mod:`ura_monai.engines`
because ``workflow.fit`` trains with them too."""

from __future__ import annotations

import logging

import torch

from ura_monai.engines.features import FeatureCacheDataset
from ura_monai.engines.schedule import CosineDecay
from ura_monai.engines.trainer import URANetTrainer

__all__ = ["FeatureCacheDataset", "CosineDecay", "URANetBundleTrainer", "is_rank0", "rank", "unwrap"]

logger = logging.getLogger("ura_monai")


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (or the network itself)."""
    return getattr(network, "module", network)


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def is_rank0() -> bool:
    """Whether this process writes files (rank 0, or not distributed)."""
    return rank() == 0


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
