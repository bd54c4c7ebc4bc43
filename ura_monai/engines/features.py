"""Backbone feature caching: the backbone is frozen, so its features can be computed once per training view."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

__all__ = ["AUGMENTATIONS", "augmented_views", "extract_feature_bank"]

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
    for batch in tqdm(batches, desc="backbone features", disable=not progress, leave=False):
        images = batch["image"].to(device)
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            for view in augmented_views(images, augment):
                bank.append(extractor(view).float().cpu())
    if not bank:
        raise ValueError("no training images to extract features from")
    return torch.cat(bank)
