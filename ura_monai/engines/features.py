"""Backbone feature caching: the backbone is frozen, so its features can be computed once per training view and
training runs on the cache. The one cached-feature path of ``workflow.fit`` and of the bundle's ``train.json``:

- :func:`extract_feature_bank`: the frozen extractor over every image and augmented view, once;
- :func:`fit_normal_statistics`: what the network takes from the cached normal features before training (level
  scale, restoration prototypes), rank 0's values broadcast in distributed training;
- :class:`FeatureBankDataset` (a cache as a dataset) and :class:`FeatureCacheDataset` (one built from a datalist).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from tqdm.auto import tqdm

from ura_monai.engines.loaders import image_loader
from ura_monai.utils.distributed import unwrap

if TYPE_CHECKING:
    from ura_monai.networks.nets.ura_net import URANet

__all__ = [
    "AUGMENTATIONS",
    "FeatureBankDataset",
    "FeatureCacheDataset",
    "augmented_views",
    "bank_images",
    "bank_view_images",
    "broadcast_from_rank0_",
    "extract_feature_bank",
    "first_view_rows",
    "fit_normal_statistics",
    "view_images",
]

logger = logging.getLogger("ura_monai")

AUGMENTATIONS = ("none", "hflip", "dihedral")


def augmented_views(images: torch.Tensor, mode: str = "none") -> list[torch.Tensor]:
    """Deterministic views of a batch (B, C, H, W): ``none`` (1 view), ``hflip`` (2), ``dihedral`` (8: flips x rot90).

    ``dihedral`` suits objects and textures with no fixed orientation (hazelnut, screws, textures);
    ``hflip`` suits images with a fixed up/down (OCT B-scans); ``none`` suits aligned parts.
    """
    if mode not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation '{mode}'; choose one of {AUGMENTATIONS}")
    if mode == "none":
        return [images]
    if mode == "hflip":
        return [images, images.flip(-1)]
    if images.shape[-1] != images.shape[-2]:
        raise ValueError("dihedral augmentation needs square images")
    views = []
    for k in range(4):
        rotated = torch.rot90(images, k, dims=(-2, -1))
        views += [rotated, rotated.flip(-1)]
    return views


def bank_images(num_images: int, views: int, batch_size: int) -> torch.Tensor:
    """Image index (rows,) of each row of a bank from :func:`extract_feature_bank` (which appends, batch after
    batch, every view of the batch in turn): the ``groups`` that keep an image's views in one cross-fitting block."""
    batches = torch.arange(num_images).split(batch_size)
    return torch.cat([batch.repeat(views) for batch in batches]) if batches else torch.zeros(0, dtype=torch.long)


def first_view_rows(num_images: int, views: int, batch_size: int) -> torch.Tensor:
    """Row of each image's first view in a bank from :func:`extract_feature_bank` (which appends, batch after
    batch, every view of the batch in turn)."""
    index = torch.arange(num_images)
    return (index // batch_size) * batch_size * views + index % batch_size


def view_images(
    batches: Iterable[dict], augment: str = "none", device: torch.device | str = "cpu"
) -> Iterator[torch.Tensor]:
    """The images of every batch and view (B, C, H, W) on ``device`` (each batch moved once, its views made there),
    in the order :func:`extract_feature_bank` stacks their features: the rows of a feature bank and these images
    correspond one to one."""
    for batch in batches:
        yield from augmented_views(batch["image"].to(device), augment)


def bank_view_images(
    items: Sequence[dict],
    image_size: int,
    augment: str,
    channels: int | None,
    batch_size: int,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
) -> Iterator[torch.Tensor]:
    """The images behind the rows of the feature bank that :class:`FeatureCacheDataset` caches with the same
    arguments (its loader, its views, in its order), read again: the guides of the bank's pixel maps."""
    return view_images(image_loader(items, image_size, batch_size, num_workers, channels), augment, device)


@torch.no_grad()
def extract_feature_bank(
    extractor: torch.nn.Module,
    batches: Iterable[dict],
    device: torch.device | str = "cpu",
    augment: str = "none",
    amp: bool = False,
    progress: bool = True,
) -> torch.Tensor:
    """Run the frozen extractor over every image (and each augmented view) once.

    Args:
        extractor: the feature extractor (in eval mode).
        batches: iterable of dicts with an ``"image"`` tensor (B, C, H, W) in [0, 1] (a DataLoader).
        device: where the extractor runs.
        augment: one of ``AUGMENTATIONS``.
        amp: bf16/fp16 autocast on CUDA.
        progress: show a progress bar.

    Returns:
        float32 CPU tensor (N x views, C, h, w).
    """
    device = torch.device(device)
    extractor = extractor.to(device).eval()
    bank = []
    for view in view_images(
        tqdm(batches, desc="backbone features", disable=not progress, leave=False), augment, device
    ):
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            bank.append(extractor(view).float().cpu())
    if not bank:
        raise ValueError("no training images to extract features from")
    return torch.cat(bank)


def broadcast_from_rank0_(tensor: torch.Tensor) -> None:
    """Copy rank 0's values of ``tensor`` into every rank's (in place); a no-op when not distributed. NCCL needs
    the data on the GPU."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_backend() == "nccl":
        buffer = tensor.detach().to(torch.device("cuda", torch.cuda.current_device())).contiguous()
    else:
        buffer = tensor.detach().cpu().contiguous()
    torch.distributed.broadcast(buffer, src=0)
    with torch.no_grad():
        tensor.copy_(buffer.to(tensor.device))


def fit_normal_statistics(
    network: torch.nn.Module,
    bank: torch.Tensor,
    generator: torch.Generator | None = None,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """``URANet.fit_normal_statistics`` on a feature cache (level scale, prototypes, position model, cross-fitted
    calibration), then rank 0's fitted values broadcast to every rank, so that all ranks train the same network.

    Args:
        network: the URANet (or a DDP / DataParallel wrapper of it).
        bank: cached normal features (N, C, h, w), on the device the statistics are fitted on.
        generator: the prototype draw's generator.
        groups: (N,) image index of each row (:func:`bank_images`), so that an image's views share a block.

    Returns:
        ``bank`` under the fitted level scale (the cache to train on).
    """
    model = cast("URANet", unwrap(network))
    bank = model.fit_normal_statistics(bank, generator, groups)
    broadcast_from_rank0_(model.feature_extractor.level_scale)
    ram = getattr(model, "ram", None)
    if ram is not None:
        broadcast_from_rank0_(ram.prototypes)
    if getattr(model, "position_model", None) is not None:
        for buffer in (*model.position_model.buffers(), model.map_calibration):
            broadcast_from_rank0_(buffer)
    return bank


class FeatureBankDataset(torch.utils.data.Dataset):
    """Cached backbone features as ``{"features": (C, h, w)}`` items, for ``URANetTrainer``.

    Attributes:
        bank: float32 tensor (N x views, C, h, w).
        groups: (N x views,) image index of each row (None: one row per image), for cross-fitting.
    """

    def __init__(self, bank: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        self.bank = bank
        self.groups = groups

    @property
    def positions(self) -> int:
        """Number of cached feature positions (``URANetLoss``'s ``dataset_positions``)."""
        return int(self.bank.shape[0] * self.bank.shape[-2] * self.bank.shape[-1])

    def __len__(self) -> int:
        return self.bank.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"features": self.bank[index]}


class FeatureCacheDataset(FeatureBankDataset):
    """The cached backbone features of a datalist, as ``{"features": (C, h, w)}`` items, for ``URANetTrainer``.

    URA-Net's backbone is frozen, so its features are computed once per image and training view (``augment``)
    when the dataset is built, and training runs on the cache. Building the dataset also fits what the network
    takes from the cached normal features (:func:`fit_normal_statistics`: level scale and restoration
    prototypes), which must happen before training; in distributed training every rank caches every image (the
    feature sampler then shards the cache) and rank 0's statistics are broadcast.

    Memory: ``len(data) x views x C x (image_size / 8)^2 x 4`` bytes (C = 176 for EfficientNet-Lite0: about
    0.7 MB per image and view at 256 x 256).

    Args:
        network: the URANet (or a DDP wrapper of it).
        data: datalist of normal training images (``{"image": path, ...}``).
        image_size: square size images are resized to.
        augment: cached views, ``none``, ``hflip`` or ``dihedral`` (see :func:`augmented_views`).
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
        model = cast("URANet", unwrap(network))
        loader = image_loader(data, image_size, batch_size, num_workers, channels)
        bank = extract_feature_bank(model.feature_extractor, loader, device, augment, amp, progress)
        super().__init__(bank, bank_images(len(data), bank.shape[0] // len(data), batch_size))
        if init_prototypes:
            self.bank = fit_normal_statistics(model, self.bank, torch.Generator().manual_seed(seed), self.groups)
        logger.info(
            "cached features of %d images (%d views): %s",
            len(data),
            self.bank.shape[0] // len(data),
            tuple(self.bank.shape),
        )
