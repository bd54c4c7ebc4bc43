"""Training of the signal perception module (UIAPM reading the memory and position signals) on synthetic defects.

The perception module's inputs are the standardized distances of each position to the normal memory and to the
position model. A normal training image is *in* both normal models, so its own distances are too small; the
signals it trains on are therefore cross-fitted, as a new image would see them: the training images are split into
blocks, and each block (and every synthetic defect painted into one of its images) is scored by a memory and a
position model fitted on the other blocks only. FASM's image branch
(:class:`ura_monai.transforms.synthesis.RandSyntheticDefect`) paints the defects; the frozen backbone turns them
into features once. The module starts as the fused map (zero-initialised residual head) and learns, from the
clean images (target 0) and the defects (target: the fraction of each grid cell the defect covers), how to
correct it: sharper boundaries, its own balance of the two signals, where each one is trustworthy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F

from ura_monai.engines.calibration import calibrate_restoration_residual, synthetic_defect_batch, synthetic_variants
from ura_monai.engines.features import bank_images, first_view_rows
from ura_monai.engines.loaders import image_loader
from ura_monai.losses import gaussian_kl
from ura_monai.networks.blocks.uiapm import perception_heads
from ura_monai.utils.distributed import unwrap

if TYPE_CHECKING:
    from ura_monai.networks.nets.ura_net import URANet

__all__ = ["perception_training_set", "train_perception", "train_perception_from_items", "perception_loss"]

logger = logging.getLogger(__name__)

# synthetic defects the perception trains on, at the least: a small training set gets more per image (2 at the least,
# 16 at the most), so that the module sees enough of them (hazelnut's 25 images gave 50; docs/design.md)
MIN_SYNTHETIC_DEFECTS = 400


@torch.no_grad()
def perception_training_set(
    network: torch.nn.Module,
    bank: torch.Tensor,
    images: torch.Tensor,
    image_rows: torch.Tensor,
    variants: int = 2,
    batch_size: int = 16,
    seed: int = 0,
    generator: torch.Generator | None = None,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-fitted signals of the clean training features and of synthetic defects painted into the training images.

    Args:
        network: a fitted URANet (normal statistics, calibration and fusion weight set).
        bank: its cached normal training features (rows, C, h, w), under the level scale.
        images: the training images (N, C, H, W) in [0, 1] the bank was made from.
        image_rows: (N,) the bank row of each image's first view (its fold).
        variants: synthetic defects per training image.
        batch_size: backbone batch size.
        seed: seed of the synthetic defects.
        generator: generator of the cross-fitted memories' prototype draws.
        groups: (rows,) image index of each bank row (``engines.features.bank_images``); None: one row per image.

    Returns:
        ``(signals (rows + N*variants, 2 or 3, h, w), prior maps (same, 1, h, w), targets (same, 1, h, w))``; the
        third signal, with the restoration transformer, is its residual (not cross-fitted: the network trained on
        these images restores them no better than held-out normal ones, docs/design.md).
    """
    model = cast("URANet", unwrap(network))
    device = model.map_calibration.device
    defects, masks = synthetic_defect_batch(images, variants, seed)
    extractor = model.feature_extractor
    defect_features = torch.cat([extractor(part.to(device)).float() for part in defects.split(batch_size)])
    query_rows = image_rows.repeat(variants)  # synthetic_defect_batch paints every image once per variant, in order
    memory, position, query_memory, query_position = model.cross_fitted_query_distances(
        bank.to(device), defect_features, query_rows, generator=generator, groups=groups
    )
    memory, position = torch.cat([memory, query_memory]), torch.cat([position, query_position])
    residual = None
    if model.uses_residual_signal:  # the restoration transformer's residual (masked by the cross-fitted prior)
        residual = model.restoration_residual(torch.cat([bank.to(device), defect_features]), memory, position)
    signals, prior = model.signals_from_distances(memory, position, residual)
    grid = (int(bank.shape[-2]), int(bank.shape[-1]))
    targets = torch.cat([torch.zeros(bank.shape[0], 1, *grid), F.adaptive_avg_pool2d(masks.float(), grid)])
    return signals.cpu(), prior.cpu(), targets


def perception_loss(
    module: torch.nn.Module, signals: torch.Tensor, prior: torch.Tensor, target: torch.Tensor, positions: int
) -> dict[str, torch.Tensor]:
    """The perception terms on one batch: weighted binary cross-entropy (anomalous cells are rare) and soft Dice on
    one stochastic pass, the latent KL against the class prior and the head's Bayes-by-backprop cost (divided by
    the ``positions`` of the training set)."""
    out = module(signals, 1, prior)
    logits = out.logits[:, 0]
    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(4.0, device=logits.device))
    probability = torch.sigmoid(logits)
    dice = 1.0 - (2.0 * (probability * target).sum() + 1.0) / (probability.sum() + target.sum() + 1.0)
    kl = gaussian_kl(out.latent_mean, out.latent_logvar, module.prior_mean((target >= 0.5).float()))
    terms = {"bce": bce, "dice": dice, "kl": 0.01 * kl, "weight_kl": module.weight_kl() / positions}
    terms["loss"] = torch.stack(list(terms.values())).sum()
    return terms


def _train_member(
    module: torch.nn.Module,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    epochs: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    progress: str | None,
) -> float:
    """Train one perception head on ``data`` = (signals, prior maps, targets); the last iterate is kept. ``progress``
    labels a progress bar (none if ``None``). Returns the last epoch's mean loss."""
    signals, prior, targets = data
    device = next(module.parameters()).device
    positions = int(targets.numel())
    mean_loss = float("nan")
    epoch_range: Any = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        epoch_range = tqdm(epoch_range, desc=progress, leave=False)
    for _ in epoch_range:
        order = torch.randperm(signals.shape[0], generator=generator)
        total = 0.0
        for batch in order.split(batch_size):
            terms = perception_loss(
                module, signals[batch].to(device), prior[batch].to(device), targets[batch].to(device), positions
            )
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            total += terms["loss"].detach().item() * len(batch)
        mean_loss = total / signals.shape[0]
    return mean_loss


def train_perception(
    network: torch.nn.Module,
    bank: torch.Tensor,
    images: torch.Tensor,
    image_rows: torch.Tensor,
    epochs: int = 10,
    variants: int = 2,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    progress: bool = False,
    groups: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Train the signal perception module of ``network`` (see the module docstring): each head of its ensemble
    (:class:`~ura_monai.networks.blocks.uiapm.PerceptionEnsemble`) on the same training set with its own batch
    order (seed ``seed + k``); the last iterates are kept, no checkpoint is picked.

    Returns ``{"samples", "defects", "epochs", "members", "loss"}`` (the last epoch's mean loss, averaged over the
    heads), or ``{}`` when the model has no signal perception (UIAPM off, or reading features) or no FASM (no
    synthetic defects to learn from: the module then stays the fused map it starts as).
    """
    model = cast("URANet", unwrap(network))
    if not model.has_signal_perception or model.fasm is None or epochs <= 0:
        return {}
    generator = torch.Generator().manual_seed(seed)
    data = perception_training_set(model, bank, images, image_rows, variants, batch_size, seed, generator, groups)
    module = model.uiapm.requires_grad_(True)  # frozen outside this stage (see URANet)
    heads = perception_heads(module)
    was_training = module.training
    module.train()
    losses = []
    for k, head in enumerate(heads):
        # the first head keeps the generator of the memory draws, as a single head always did
        order = generator if k == 0 else torch.Generator().manual_seed(seed + k)
        optimizer = torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=weight_decay)
        label = ("perception" if len(heads) == 1 else f"perception head {k + 1}/{len(heads)}") if progress else None
        losses.append(_train_member(head, data, epochs, batch_size, optimizer, order, label))
    module.train(was_training)
    module.requires_grad_(False)
    mean_loss = sum(losses) / len(losses)
    samples = int(data[0].shape[0])
    logger.info("perception (%d heads) trained on %d signal maps (%d synthetic defects): loss %.4f", len(heads),
                samples, samples - bank.shape[0], mean_loss)  # fmt: skip
    return {"samples": samples, "defects": samples - int(bank.shape[0]), "epochs": epochs, "members": len(heads),
            "loss": round(mean_loss, 4)}  # fmt: skip


def train_perception_from_items(
    network: torch.nn.Module,
    items: Sequence[dict],
    bank: torch.Tensor,
    image_size: int,
    channels: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
    calibrate_residual: bool = True,
) -> dict[str, Any]:
    """:func:`train_perception`, with ``synthetic_variants(images, MIN_SYNTHETIC_DEFECTS, 2)`` defects per image
    (:func:`ura_monai.engines.calibration.synthetic_variants`), on the training datalist ``items``
    whose cached features are ``bank`` (made by
    :func:`ura_monai.engines.features.extract_feature_bank` with the same ``batch_size``, any number of views),
    after the restoration residual's calibration on ``bank`` (:func:`calibrate_restoration_residual`; skipped
    with ``calibrate_residual=False`` when the caller has done it, as ``fusion_weight_from_items`` does).
    Returns its summary, or ``{}`` when the model has no signal perception or FASM, or the cache does not match."""
    model = cast("URANet", unwrap(network))
    if calibrate_residual:
        calibrate_restoration_residual(model, bank.to(model.residual_calibration.device), batch_size)
    if not model.has_signal_perception or model.fasm is None or not items:
        return {}
    images = torch.cat([b["image"] for b in image_loader(items, image_size, batch_size, 0, channels)])
    views = bank.shape[0] // max(1, len(images))
    if views < 1 or bank.shape[0] != views * len(images):
        logger.warning("the feature cache does not match the training images; the perception stays untrained")
        return {}
    rows = first_view_rows(len(images), views, batch_size)
    groups = bank_images(len(images), views, batch_size)
    variants = synthetic_variants(len(images), MIN_SYNTHETIC_DEFECTS, fewest=2)
    return train_perception(model, bank, images, rows, variants=variants, seed=seed, progress=progress, groups=groups)
