"""The DataLoader of a datalist as the networks see it: loaded, converted to one channel count, resized, no
augmentation. Feeds the backbone feature cache (:mod:`ura_monai.engines.features`) and the evaluator
(:func:`ura_monai.engines.workflow.run_inference`)."""

from __future__ import annotations

from collections.abc import Sequence

from monai.data import DataLoader, Dataset

from ura_monai.data import anomaly_transforms

__all__ = ["image_loader"]


def image_loader(
    items: Sequence[dict],
    image_size: int,
    batch_size: int,
    num_workers: int,
    channels: int | None = None,
    warn_conversion: bool = False,
) -> DataLoader:
    """A DataLoader over ``items`` (in order, no shuffling) with :func:`ura_monai.data.anomaly_transforms`.

    Args:
        items: datalist (``{"image": path, ...}``).
        image_size: square size images are resized to.
        batch_size: images per batch.
        num_workers: image-decoding workers.
        channels: how images are loaded (None as stored, 1 grey, 3 RGB).
        warn_conversion: warn, naming the file, when an image is converted to ``channels``.
    """
    transform = anomaly_transforms(image_size, augment=False, channels=channels, warn_conversion=warn_conversion)
    dataset = Dataset(list(items), transform=transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
