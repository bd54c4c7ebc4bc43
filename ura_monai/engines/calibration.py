"""The fused map's weight between the position-free memory and the position model, chosen on synthetic defects.

No anomalous image is needed: FASM's image branch (:class:`ura_monai.transforms.synthesis.RandSyntheticDefect`)
paints defects into held-out normal images (which neither normal model saw), the frozen backbone turns them into
features once, and the weight whose fused map gives the best pixel average precision on them (against the clean
held-out images as negatives) is kept. Objects that move (hazelnut) favour the memory, aligned parts (tiles)
the position model; ``docs/design.md`` has the measurements.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

import torch

from ura_monai.metrics import average_precision
from ura_monai.transforms.synthesis import RandSyntheticDefect
from ura_monai.utils.distributed import unwrap

if TYPE_CHECKING:
    from ura_monai.networks.nets.ura_net import URANet

__all__ = [
    "FUSION_WEIGHTS",
    "RESIDUAL_WEIGHTS",
    "calibrate_restoration_residual",
    "select_fusion_weight",
    "select_residual_weight",
    "synthetic_defect_batch",
]

# candidate weights of the memory term (the position term gets 1 - w)
FUSION_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
# candidate weights of the restoration residual in the perception's prior map (the fused map gets 1 - v)
RESIDUAL_WEIGHTS = (0.0, 0.25, 0.5)


def synthetic_variants(images: int, min_defects: int, fewest: int = 1, most: int = 16) -> int:
    """Synthetic defects to paint into each of ``images`` images: enough for ``min_defects`` in all, from ``fewest`` to
    ``most`` (which bounds the memory of a very small set: the defect images are held at once)."""
    return max(fewest, min(most, -(-min_defects // max(1, images))))


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
def calibrate_restoration_residual(network: torch.nn.Module, features: torch.Tensor, batch_size: int = 32) -> None:
    """Set the network's ``residual_calibration`` (mean, std) from the restoration transformer's residual on the
    normal training ``features``, after the RAM's training (no-op without the residual signal). Not cross-fitted:
    measured, the residual on the training images matches that on held-out normal images (docs/design.md, RAM)."""
    model = cast("URANet", unwrap(network))
    if not model.uses_residual_signal:
        return
    was_training = model.training
    model.eval()
    residual = model.restoration_residual(features, *model.raw_distances(features), batch_size=batch_size)
    model.train(was_training)
    spread = residual.std() if residual.numel() > 1 else residual.new_tensor(1.0)
    stats = torch.stack([residual.mean(), spread]).clamp_min(1e-6)
    model.residual_calibration.copy_(stats.to(model.residual_calibration))


def _grid_targets(normal_count: int, defect_masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Grid targets: zeros for the clean images, then the defect masks pooled to the grid (half a cell counts)."""
    cells = torch.nn.functional.adaptive_avg_pool2d(defect_masks.float(), grid) >= 0.5
    return torch.cat([torch.zeros(normal_count, 1, *grid, dtype=torch.bool), cells.cpu()])


def _pick(
    make_map: Callable[[float], torch.Tensor], target: torch.Tensor, weights: Sequence[float], default: float
) -> tuple[float, dict[float, float]]:
    """``(chosen weight, {weight: pixel AP of make_map(weight) against target})``: the best (ties: the smallest
    weight), or ``default`` (scores NaN) without any positive cell."""
    if not target.any():
        return default, {float(w): float("nan") for w in weights}
    scores = {float(w): average_precision(make_map(float(w)).cpu().flatten(), target.flatten()) for w in weights}
    return max(scores, key=lambda w: (scores[w], -w)), scores


@torch.no_grad()
def select_fusion_weight(
    network: torch.nn.Module,
    normal_features: torch.Tensor,
    defect_features: torch.Tensor,
    defect_masks: torch.Tensor,
    weights: Sequence[float] = FUSION_WEIGHTS,
    apply: bool = True,
) -> dict[float, float]:
    """Set ``network.fusion_weight`` to the candidate whose fused grid map has the best pixel average precision on
    ``defect_features`` (masks (M, 1, H, W), pooled to the grid: a cell is anomalous when half of it is) with the
    ``normal_features`` of clean held-out images as negatives (``apply=False``: score only, the weight stays).
    Returns ``{weight: pixel AP}``; ties keep the first (the position-heavier) weight."""
    model = unwrap(network)
    features = torch.cat([normal_features, defect_features]).to(next(model.buffers()).device)
    memory, position = model.standardized_distances(features)
    target = _grid_targets(normal_features.shape[0], defect_masks, (memory.shape[-2], memory.shape[-1]))
    best, scores = _pick(lambda w: model.fuse(memory, position, w), target, weights, 0.5)
    if apply:
        model.fusion_weight.fill_(best)
    return scores


@torch.no_grad()
def select_residual_weight(
    network: torch.nn.Module,
    normal_features: torch.Tensor,
    defect_features: torch.Tensor,
    defect_masks: torch.Tensor,
    weights: Sequence[float] = RESIDUAL_WEIGHTS,
) -> dict[float, float]:
    """Set ``network.residual_weight``, the share of the restoration residual in the perception's prior map, as
    :func:`select_fusion_weight` sets the fused map's weight (same synthetic defects, after it and after
    :func:`calibrate_restoration_residual`). Returns ``{weight: pixel AP}``; ties keep the smaller weight."""
    model = cast("URANet", unwrap(network))
    features = torch.cat([normal_features, defect_features]).to(model.residual_calibration.device)
    memory, position = model.raw_distances(features)
    residual = model.restoration_residual(features, memory, position)
    z_residual = model.signals_from_distances(memory, position, residual)[0][:, 2:]  # the third signal
    fused = model.prior_map(memory, position)
    target = _grid_targets(normal_features.shape[0], defect_masks, (memory.shape[-2], memory.shape[-1]))
    best, scores = _pick(lambda v: (1.0 - v) * fused + v * z_residual, target, weights, 0.0)
    model.residual_weight.fill_(best)
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
    bank: torch.Tensor | None = None,
) -> dict[str, float] | None:
    """:func:`select_fusion_weight` on held-out normal images ``items`` (a datalist no normal model was fitted on):
    enough synthetic variants of each to make ``min_defects`` defect images (at most 16 each); applied only to a
    model configured with ``fusion_weight=None`` (the others keep theirs; the scores are recorded); then, for a model
    whose perception reads the restoration residual and given its training ``bank``,
    :func:`calibrate_restoration_residual` and :func:`select_residual_weight` on the same defects. Returns the
    scores by weight (``"<w>"``, and the residual's ``"residual <v>"``), or None (weights unchanged) for a model
    without the fused map's parts or no items."""
    from ura_monai.engines.loaders import image_loader

    model = unwrap(network)
    if not items or getattr(model, "position_model", None) is None or getattr(model, "ram", None) is None:
        return None
    device = torch.device(device)
    images = torch.cat([batch["image"] for batch in image_loader(items, image_size, batch_size, 0, channels)])
    variants = synthetic_variants(len(images), min_defects)
    defects, masks = synthetic_defect_batch(images, variants, seed)
    extractor = model.feature_extractor

    def features(batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([extractor(part.to(device)) for part in batch.split(batch_size)])

    normal_features, defect_features = features(images), features(defects)
    choose = model.config.get("fusion_weight", 0.5) is None
    fusion_scores = select_fusion_weight(model, normal_features, defect_features, masks, apply=choose)
    scores = {f"{k:g}": v for k, v in fusion_scores.items()}
    if bank is not None and model.uses_residual_signal:
        calibrate_restoration_residual(model, bank.to(device), batch_size)
        residual_scores = select_residual_weight(model, normal_features, defect_features, masks)
        scores.update({f"residual {k:g}": v for k, v in residual_scores.items()})
    return scores
