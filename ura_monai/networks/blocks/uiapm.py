"""UIAPM: uncertainty-integrated anomaly perception module (URA-Net, Luo et al. 2026).

Its input is either the discrepancy signals of each position (the standardized distances to the normal memory and
to the position model: ``URANet(perception_input="signals")``, the default) or the backbone features themselves
(``"features"``, the first design). With signals, the module adds its learned correction to a given prior map
(the fused normal-model map) with a zero-initialised head, so that it starts exactly at that map and training can
only move it from there; ``docs/design.md`` has the measurements behind this choice.

A Bayesian network that learns the distributions of normal and anomalous features: a convolutional encoder
gives, per position, the mean and log-variance of a latent Gaussian; the KL term pulls it towards a normal
or an anomalous prior (chosen by the synthetic-anomaly mask), and a Bayes-by-backprop head turns latent samples
into anomaly logits. ``T`` stochastic passes give the anomaly probability (their mean) and the uncertainty
(their variance), which is high where the evidence is ambiguous, e.g. at anomaly boundaries.
"""

from __future__ import annotations

import math
from typing import NamedTuple, cast

import torch
from torch import nn

from ura_monai.networks.blocks.bayesian import BayesianConv2d

__all__ = ["UncertaintyAnomalyPerception", "PerceptionEnsemble", "PerceptionOutput", "perception_heads"]


class PerceptionOutput(NamedTuple):
    """What the perception module returns.

    logits: (B, T, 1, h, w) anomaly logits of T stochastic passes.
    probability: (B, 1, h, w) mean anomaly probability over the passes.
    uncertainty: (B, 1, h, w) variance of the pass probabilities scaled to [0, 1] (x4, since a variable in
        [0, 1] has variance at most 1/4).
    latent_mean, latent_logvar: (B, D, h, w) posterior of the latent, for the KL term.
    """

    logits: torch.Tensor
    probability: torch.Tensor
    uncertainty: torch.Tensor
    latent_mean: torch.Tensor
    latent_logvar: torch.Tensor


class UncertaintyAnomalyPerception(nn.Module):
    """Per-position anomaly probability and uncertainty from (possibly corrupted) features.

    Args:
        in_channels: feature channels.
        hidden_channels: width of the convolutional encoder.
        latent_channels: size of the per-position latent Gaussian.
        num_samples: stochastic passes ``T`` (latent and head weights resampled each pass); 0 makes the module
            deterministic (posterior means only, zero uncertainty), the fast path when no uncertainty is wanted.
        prior_distance: distance between the normal and the anomalous prior means in latent space; the priors
            are ``N(-m, I)`` and ``N(+m, I)`` along the diagonal direction, with ``|2m| = prior_distance``.
        normalize_input: group-normalize the input (for features of any scale); ``False`` for discrepancy signals,
            whose level (already standardized on normal data) is the evidence.
        residual_head: the logits are ``scale * prior_map + bias + head(latent)``, with the head's posterior mean
            initialised to zero (``forward`` then needs ``prior_map``); ``False``: ``head(latent)`` alone.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int = 128,
        latent_channels: int = 16,
        num_samples: int = 8,
        prior_distance: float = 6.0,
        normalize_input: bool = True,
        residual_head: bool = False,
    ) -> None:
        super().__init__()
        self.num_samples = num_samples
        self.encoder = nn.Sequential(
            nn.GroupNorm(1, in_channels) if normalize_input else nn.Identity(),
            nn.Conv2d(in_channels, hidden_channels, 1),
            nn.GELU(),
            nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1),
            nn.GELU(),
        )
        self.mean_head = nn.Conv2d(hidden_channels, latent_channels, 1)
        self.logvar_head = nn.Conv2d(hidden_channels, latent_channels, 1)
        self.classifier = BayesianConv2d(latent_channels, 1, kernel_size=1)
        self.residual_head = residual_head
        if residual_head:
            # start at the prior map: zero head, and an affine map of the prior (a z-score 3 is a logit 0)
            nn.init.zeros_(self.classifier.weight_mu)
            self.prior_scale = nn.Parameter(torch.tensor(1.0))
            self.prior_bias = nn.Parameter(torch.tensor(-3.0))
        direction = torch.ones(1, latent_channels, 1, 1) / latent_channels**0.5
        self.register_buffer("prior_anomalous_mean", direction * prior_distance / 2)

    def prior_mean(self, mask: torch.Tensor) -> torch.Tensor:
        """Prior mean per position: ``-m`` where ``mask`` is 0 (normal), ``+m`` where it is 1 (anomalous)."""
        return (2.0 * mask - 1.0) * self.prior_anomalous_mean

    def forward(
        self, features: torch.Tensor, num_samples: int | None = None, prior_map: torch.Tensor | None = None
    ) -> PerceptionOutput:
        """
        Args:
            features: (B, C, h, w) features or discrepancy signals.
            num_samples: overrides ``self.num_samples`` for this call.
            prior_map: (B, 1, h, w) map the residual head corrects (needed with ``residual_head``).
        """
        t = self.num_samples if num_samples is None else num_samples
        hidden = self.encoder(features)
        mean = self.mean_head(hidden)
        logvar = self.logvar_head(hidden).clamp(-8.0, 4.0)
        b, d, h, w = mean.shape
        offset: torch.Tensor | float = 0.0
        if self.residual_head:
            if prior_map is None:
                raise ValueError("a residual perception head needs the prior map it corrects")
            offset = self.prior_scale * prior_map + self.prior_bias
        if t <= 0:
            logits = (self.classifier(mean, sample=False) + offset).unsqueeze(1)
            probability = torch.sigmoid(logits[:, 0])
            return PerceptionOutput(logits, probability, torch.zeros_like(probability), mean, logvar)
        # all T passes in one batched call: (B, T, D, h, w) -> (B*T, D, h, w)
        eps = torch.randn(b, t, d, h, w, device=mean.device, dtype=mean.dtype)
        latent = mean.unsqueeze(1) + (0.5 * logvar).exp().unsqueeze(1) * eps
        logits = self.classifier(latent.reshape(b * t, d, h, w), sample=True).view(b, t, 1, h, w)
        logits = logits + (offset.unsqueeze(1) if isinstance(offset, torch.Tensor) else offset)
        probs = torch.sigmoid(logits)
        probability = probs.mean(dim=1)
        uncertainty = (
            (4.0 * probs.var(dim=1, unbiased=False)).clamp(0.0, 1.0) if t > 1 else torch.zeros_like(probability)
        )
        return PerceptionOutput(logits, probability, uncertainty, mean, logvar)

    def weight_kl(self) -> torch.Tensor:
        """KL of the Bayesian head's weights against their prior (Bayes-by-backprop complexity cost)."""
        return self.classifier.kl_divergence()


class PerceptionEnsemble(nn.Module):
    """A deep ensemble of perception modules (Lakshminarayanan et al., NeurIPS 2017), used as one module.

    Each member is trained on its own (another initialisation and batch order). The members' disagreement is the
    epistemic part of the uncertainty that one Bayesian head's passes underestimate, and their mean logit varies
    less from one training run to the next than any member's (docs/design.md, UIAPM).

    Args:
        members: the perception modules (same input, residual head and sampling settings).
        num_samples: stochastic passes ``T`` in all; each member runs ``ceil(T / len(members))`` of them.
    """

    def __init__(self, members: list[UncertaintyAnomalyPerception], num_samples: int) -> None:
        super().__init__()
        if not members:
            raise ValueError("a perception ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.num_samples = num_samples

    def prior_mean(self, mask: torch.Tensor) -> torch.Tensor:
        """The members' (shared) latent prior mean, see :meth:`UncertaintyAnomalyPerception.prior_mean`."""
        return self.members[0].prior_mean(mask)

    def forward(
        self, features: torch.Tensor, num_samples: int | None = None, prior_map: torch.Tensor | None = None
    ) -> PerceptionOutput:
        """As :meth:`UncertaintyAnomalyPerception.forward`; with ``T = 0`` the logit is the members' mean, otherwise
        the passes of all members are pooled (their variance includes the members' disagreement)."""
        t = self.num_samples if num_samples is None else num_samples
        per_member = 0 if t <= 0 else math.ceil(t / len(self.members))
        outs = [member(features, per_member, prior_map) for member in self.members]
        latent_mean = torch.stack([o.latent_mean for o in outs]).mean(0)
        latent_logvar = torch.stack([o.latent_logvar for o in outs]).mean(0)
        if t <= 0:
            logits = torch.stack([o.logits for o in outs]).mean(0)
            probability = torch.sigmoid(logits[:, 0])
            return PerceptionOutput(logits, probability, torch.zeros_like(probability), latent_mean, latent_logvar)
        logits = torch.cat([o.logits for o in outs], dim=1)
        probs = torch.sigmoid(logits)
        uncertainty = (4.0 * probs.var(dim=1, unbiased=False)).clamp(0.0, 1.0)
        return PerceptionOutput(logits, probs.mean(dim=1), uncertainty, latent_mean, latent_logvar)

    def weight_kl(self) -> torch.Tensor:
        """Sum of the members' Bayes-by-backprop complexity costs."""
        return torch.stack([member.weight_kl() for member in self.members]).sum()


def perception_heads(module: nn.Module) -> list[UncertaintyAnomalyPerception]:
    """The perception heads of ``module``: an ensemble's members, or the module itself."""
    if isinstance(module, PerceptionEnsemble):
        return [cast(UncertaintyAnomalyPerception, member) for member in module.members]
    return [cast(UncertaintyAnomalyPerception, module)]
