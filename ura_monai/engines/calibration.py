"""The fused map's weight between the position-free memory and the position model, chosen on synthetic defects.

No anomalous image is needed: FASM's image branch (:class:`ura_monai.transforms.synthesis.RandSyntheticDefect`)
paints defects into held-out normal images (which neither normal model saw), the frozen backbone turns them into
features once, and the weight whose fused map gives the best pixel average precision on them (against the clean
held-out images as negatives) is kept. Objects that move (hazelnut) favour the memory, aligned parts (tiles)
the position model; ``docs/design.md`` has the measurements.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ura_monai.metrics import average_precision
from ura_monai.transforms.synthesis import RandSyntheticDefect
from ura_monai.utils.distributed import unwrap

__all__ = ["FUSION_WEIGHTS", "synthetic_defect_batch", "select_fusion_weight"]

# candidate weights of the memory term (the position term gets 1 - w)
FUSION_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def synthetic_defect_batch(images: torch.Tensor, variants: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``variants`` synthetic defects painted into each of ``images`` (N, C, H, W) in [0, 1], other images of
    the batch lending their texture; returns ``(defect images (N*variants, C, H, W), masks (N*variants, 1, H, W))``."""
    synth = RandSyntheticDefect()
    synth.set_random_state(seed)
    painted, masks = [], []
    for _ in range(variants):
        for image in images:
            out, mask = synth(image, others=images)
            painted.append(out)
            masks.append(mask)
    return torch.stack(painted), torch.stack(masks)


@torch.no_grad()
def select_fusion_weight(
    network: torch.nn.Module,
    normal_features: torch.Tensor,
    defect_features: torch.Tensor,
    defect_masks: torch.Tensor,
    weights: Sequence[float] = FUSION_WEIGHTS,
) -> dict[float, float]:
    """Set ``network.fusion_weight`` to the candidate whose fused grid map has the best pixel average precision on
    ``defect_features`` (masks (M, 1, H, W), pooled to the grid: a cell is anomalous when half of it is) with the
    ``normal_features`` of clean held-out images as negatives. Returns ``{weight: pixel AP}``; ties keep the first
    (the position-heavier) weight."""
    model = unwrap(network)
    features = torch.cat([normal_features, defect_features]).to(next(model.buffers()).device)
    memory, position = model.standardized_distances(features)
    grid = memory.shape[-2:]
    cells = torch.nn.functional.adaptive_avg_pool2d(defect_masks.float(), grid) >= 0.5
    target = torch.cat([torch.zeros(normal_features.shape[0], 1, *grid, dtype=torch.bool), cells.cpu()])
    scores = {}
    for weight in weights:
        fused = model.fuse(memory, position, float(weight)).cpu()
        scores[float(weight)] = average_precision(fused.flatten(), target.flatten()) if target.any() else float("nan")
    best = max(scores, key=lambda w: (scores[w], -w)) if target.any() else 0.5
    model.fusion_weight.fill_(best)
    return scores


@torch.no_grad()
def fusion_weight_from_items(
    network: torch.nn.Module,
    items: Sequence[dict],
    image_size: int,
    channels: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    seed: int = 0,
    min_defects: int = 64,
) -> dict[float, float] | None:
    """:func:`select_fusion_weight` on held-out normal images ``items`` (a datalist no normal model was fitted on):
    enough synthetic variants of each to make ``min_defects`` defect images (at most 16 each). Returns the scores,
    or None (weight unchanged) for a model without the fused map's parts or no items."""
    from ura_monai.engines.loaders import image_loader

    model = unwrap(network)
    if not items or getattr(model, "position_model", None) is None or getattr(model, "ram", None) is None:
        return None
    device = torch.device(device)
    images = torch.cat([batch["image"] for batch in image_loader(items, image_size, batch_size, 0, channels)])
    variants = min(16, -(-min_defects // len(images)))
    defects, masks = synthetic_defect_batch(images, variants, seed)
    extractor = model.feature_extractor

    def features(batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([extractor(part.to(device)) for part in batch.split(batch_size)])

    return select_fusion_weight(model, features(images), features(defects), masks)
