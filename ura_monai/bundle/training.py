"""Training pieces a bundle config instantiates: the cached-feature dataset, the LR schedule."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.data import DataLoader, Dataset

from ura_monai.data import anomaly_transforms
from ura_monai.engines.features import extract_feature_bank
from ura_monai.engines.trainer import URANetTrainer
from ura_monai.utils.distributed import unwrap

__all__ = ["FeatureCacheDataset", "CosineDecay", "URANetBundleTrainer"]

logger = logging.getLogger("ura_monai")


def _broadcast_(tensor: torch.Tensor) -> None:
    """Copy rank 0's values of ``tensor`` into every rank's (in place); NCCL needs the data on the GPU."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_backend() == "nccl":
        buffer = tensor.detach().to(torch.device("cuda", torch.cuda.current_device())).contiguous()
    else:
        buffer = tensor.detach().cpu().contiguous()
    torch.distributed.broadcast(buffer, src=0)
    with torch.no_grad():
        tensor.copy_(buffer.to(tensor.device))


class FeatureCacheDataset(torch.utils.data.Dataset):
    """Cached backbone features of a datalist, as ``{"features": (C, h, w)}`` items, for ``URANetTrainer``.

    URA-Net's backbone is frozen, so its features are computed once per image and training view (``augment``)
    when the dataset is built (the same caching as ``ura_monai.engines.workflow.fit``), and training runs on the
    cache. Building the dataset also fits what the network takes from the cached normal features (level scale
    and restoration prototypes, ``URANet.fit_normal_statistics``), which must happen before training; in
    distributed training every rank caches every image (the feature sampler then shards the cache) and rank 0's
    statistics are broadcast.

    Memory: ``len(data) x views x C x (image_size / 8)^2 x 4`` bytes (C = 176 for EfficientNet-Lite0: about
    0.7 MB per image and view at 256 x 256).

    Args:
        network: the URANet (or a DDP wrapper of it).
        data: datalist of normal training images (``{"image": path, ...}``).
        image_size: square size images are resized to.
        augment: cached views, ``none``, ``hflip`` or ``dihedral`` (see ``ura_monai.engines.features``).
        channels: how images are loaded (None as stored, 1 grey, 3 RGB).
        batch_size: images per backbone pass.
        device: where the backbone runs.
        num_workers: image-decoding workers.
        amp: autocast on CUDA.
        init_prototypes: fit the level scale and the prototypes from the cache (``False``: keep the network's).
        seed: seed of the prototype draw.
        progress: show a progress bar.

    Attributes:
        bank: float32 CPU tensor (N x views, C, h, w).
        positions: number of cached feature positions (``URANetLoss``'s ``dataset_positions``).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        data: Sequence[dict[str, Any]],
        image_size: int = 256,
        augment: str = "none",
        channels: int | None = None,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        num_workers: int = 0,
        amp: bool = False,
        init_prototypes: bool = True,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        if not data:
            raise ValueError("no training images to cache features of")
        model: Any = unwrap(network)
        loader = DataLoader(
            Dataset(list(data), transform=anomaly_transforms(image_size, augment=False, channels=channels)),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
        )
        self.bank = extract_feature_bank(model.feature_extractor, loader, device, augment, amp, progress)
        self.positions = int(self.bank.shape[0] * self.bank.shape[-2] * self.bank.shape[-1])
        if init_prototypes:
            self.bank = model.fit_normal_statistics(self.bank, torch.Generator().manual_seed(seed))
            _broadcast_(model.feature_extractor.level_scale)
            ram = getattr(model, "ram", None)
            if ram is not None:
                _broadcast_(ram.prototypes)
        logger.info("cached features of %d images (%d views): %s", len(data), self.bank.shape[0] // len(data), tuple(self.bank.shape))

    def __len__(self) -> int:
        return self.bank.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"features": self.bank[index]}


class CosineDecay:
    """LR multiplier for ``torch.optim.lr_scheduler.LambdaLR``: cosine decay from 1 to 0 over ``total_steps``
    iterations (as ``workflow.fit``), then 0.

    Args:
        total_steps: number of optimizer steps (epochs x iterations per epoch).
    """

    def __init__(self, total_steps: int) -> None:
        self.total_steps = max(1, int(total_steps))

    def __call__(self, step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))


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
