"""Bayes-by-backprop convolution (Blundell et al., 2015) with the local reparameterisation trick."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BayesianConv2d"]


class BayesianConv2d(nn.Module):
    """2D convolution whose weights and biases are Gaussian distributions learned by variational inference.

    Each weight has a mean and a softplus-parameterised standard deviation; the prior is ``N(0, prior_sigma^2)``.
    Sampling uses the local reparameterisation trick (Kingma et al., 2015): the pre-activation's mean and
    variance are computed from the weight moments and one Gaussian draw is made per output element, which is
    cheaper and lower-variance than drawing weights.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel size (odd; "same" padding).
        prior_sigma: standard deviation of the zero-mean Gaussian prior over weights.
        init_sigma: initial posterior standard deviation.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        prior_sigma: float = 1.0,
        init_sigma: float = 1e-2,
    ) -> None:
        super().__init__()
        self.padding = kernel_size // 2
        self.prior_sigma = prior_sigma
        self.weight_mu = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight_mu, a=math.sqrt(5))
        rho = math.log(math.expm1(init_sigma))  # softplus^-1
        self.weight_rho = nn.Parameter(torch.full_like(self.weight_mu, rho))
        self.bias_mu = nn.Parameter(torch.zeros(out_channels))
        self.bias_rho = nn.Parameter(torch.full((out_channels,), rho))

    def forward(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        mean = F.conv2d(x, self.weight_mu, self.bias_mu, padding=self.padding)
        if not sample:
            return mean
        weight_var = F.softplus(self.weight_rho) ** 2
        bias_var = F.softplus(self.bias_rho) ** 2
        var = F.conv2d(x * x, weight_var, bias_var, padding=self.padding)
        return mean + var.clamp_min(1e-12).sqrt() * torch.randn_like(mean)

    def kl_divergence(self) -> torch.Tensor:
        """KL(q(w) || p(w)) summed over all weights and biases."""
        kl = torch.zeros((), device=self.weight_mu.device)
        for mu, rho in ((self.weight_mu, self.weight_rho), (self.bias_mu, self.bias_rho)):
            sigma = F.softplus(rho)
            kl = kl + (torch.log(self.prior_sigma / sigma) + (sigma**2 + mu**2) / (2 * self.prior_sigma**2) - 0.5).sum()
        return kl
