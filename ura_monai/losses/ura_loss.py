"""URA-Net training objective: restoration + perception + KL terms."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss
from torch import nn

__all__ = ["RestorationLoss", "URANetLoss", "gaussian_kl"]


class RestorationLoss(nn.Module):
    """Per level: ``1 - cosine`` plus ``mse_weight`` x MSE normalized by the level's mean squared activation
    (so a large-valued level does not dominate), averaged over positions and summed over levels.

    Args:
        level_channels: channels of each backbone level in the concatenated features.
        mse_weight: weight of the normalized MSE term.
    """

    def __init__(self, level_channels: Sequence[int], mse_weight: float = 1.0) -> None:
        super().__init__()
        self.level_channels = list(level_channels)
        self.mse_weight = mse_weight

    def forward(self, restored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = restored.new_zeros(())
        for r, t in zip(restored.split(self.level_channels, 1), target.split(self.level_channels, 1)):
            loss = loss + (1.0 - F.cosine_similarity(r, t, dim=1, eps=1e-6)).mean()
            if self.mse_weight:
                loss = loss + self.mse_weight * F.mse_loss(r, t) / t.pow(2).mean().clamp_min(1e-8)
        return loss


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor, prior_mean: torch.Tensor) -> torch.Tensor:
    """KL( N(mean, exp(logvar)) || N(prior_mean, I) ), summed over channels, averaged over batch and positions."""
    kl = 0.5 * (logvar.exp() + (mean - prior_mean).pow(2) - 1.0 - logvar)
    return kl.sum(dim=1).mean()


class URANetLoss(nn.Module):
    """Weighted sum of URA-Net's losses; returns every term so they can be logged.

    Terms (each only when its module is on):
    ``restored``: restoration loss of the perception-gated restored features against the clean features;
    ``restoration``: the same for the ungated restoration from normal context (teaches the RAM to restore
    every position, which the anomaly map relies on);
    ``focal`` and ``dice``: perception logits/probability against the FASM mask;
    ``kl``: latent posterior against the class-conditional prior (normal / anomalous by the FASM mask);
    ``weight_kl``: Bayes-by-backprop complexity cost of the perception head, divided by ``dataset_positions``.

    Args:
        level_channels: channels per backbone level.
        restored_weight, restoration_weight, focal_weight, dice_weight, kl_weight, weight_kl_weight: term weights.
        mse_weight: weight of MSE inside the restoration losses.
        focal_gamma: focusing parameter of the focal loss.
        dataset_positions: number of training positions (images x grid cells), scaling the weight KL as in
            Bayes-by-backprop's minibatch weighting.
    """

    def __init__(
        self,
        level_channels: Sequence[int],
        restored_weight: float = 1.0,
        restoration_weight: float = 1.0,
        focal_weight: float = 1.0,
        dice_weight: float = 1.0,
        kl_weight: float = 0.01,
        weight_kl_weight: float = 1.0,
        mse_weight: float = 1.0,
        focal_gamma: float = 2.0,
        dataset_positions: int = 100_000,
    ) -> None:
        super().__init__()
        self.restoration_loss = RestorationLoss(level_channels, mse_weight)
        self.focal = FocalLoss(gamma=focal_gamma, use_softmax=False, reduction="mean")
        self.dice = DiceLoss(sigmoid=False, batch=True, smooth_nr=1.0, smooth_dr=1.0)
        self.weights = {
            "restored": restored_weight,
            "restoration": restoration_weight,
            "focal": focal_weight,
            "dice": dice_weight,
            "kl": kl_weight,
            "weight_kl": weight_kl_weight,
        }
        self.dataset_positions = dataset_positions

    def forward(self, outputs: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """
        Args:
            outputs: ``URANet.forward_features(..., synthesize=True)`` outputs.
            model: the ``URANet`` (for the perception priors and Bayesian weights).

        Returns:
            dict of weighted terms and their sum under ``"loss"``.
        """
        terms: dict[str, torch.Tensor] = {}
        clean, mask = outputs["clean"], outputs["mask"]
        if "restored" in outputs:
            terms["restored"] = self.restoration_loss(outputs["restored"], clean)
            terms["restoration"] = self.restoration_loss(outputs["restoration"], clean)
        if "logits" in outputs:
            logits = outputs["logits"]  # (B, T, 1, h, w): each stochastic pass is a Monte-Carlo sample
            target = mask.unsqueeze(1).expand_as(logits)
            terms["focal"] = self.focal(logits.flatten(0, 1), target.flatten(0, 1))
            terms["dice"] = self.dice(outputs["probability"], mask)
            prior = model.uiapm.prior_mean(mask)
            terms["kl"] = gaussian_kl(outputs["latent_mean"], outputs["latent_logvar"], prior)
            terms["weight_kl"] = model.uiapm.weight_kl() / self.dataset_positions
        weighted = {k: self.weights[k] * v for k, v in terms.items() if self.weights[k]}
        if not weighted:  # nothing is trained in this loop (the signal perception without the RAM): a zero loss
            weighted["loss"] = outputs["clean"].new_zeros((), requires_grad=True)
            return weighted
        weighted["loss"] = torch.stack(list(weighted.values())).sum()
        return weighted
