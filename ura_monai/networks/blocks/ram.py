"""RAM: restoration attention mechanism (URA-Net, Luo et al. 2026).

Every position is restored from *other* information believed normal: the other positions of the same image,
weighted by how normal the perception module thinks they are, and a bank of learnable global normal
prototypes. The restoration is a convex combination of those (raw) features, so it stays inside the span of
normal features and cannot reproduce an anomaly; the output blends it in where an anomaly was perceived.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = ["RestorationAttention", "RestorationOutput", "nearest_distance"]


def nearest_distance(features: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Euclidean distance from each position of ``features`` (B, C, h, w) to its nearest row of ``bank`` (K, C),
    as (B, 1, h, w); matrix products in query chunks of ``chunk`` positions, so memory stays bounded."""
    b, c, h, w = features.shape
    tokens = features.permute(0, 2, 3, 1).reshape(-1, c)
    bank = bank.to(features.dtype)
    bank_sq = bank.pow(2).sum(-1)
    nearest = []
    for part in tokens.split(chunk):
        sq = part.pow(2).sum(-1, keepdim=True) + bank_sq - 2 * part @ bank.T
        nearest.append(sq.amin(dim=1))
    return torch.cat(nearest).clamp_min(0).sqrt().view(b, h, w).unsqueeze(1)


class RestorationOutput(NamedTuple):
    """restoration: (B, C, h, w) features restored from normal context at every position.
    restored: (B, C, h, w) ``p * restoration + (1 - p) * input``: the input with perceived anomalies restored.
    """

    restoration: torch.Tensor
    restored: torch.Tensor


class RestorationAttention(nn.Module):
    """Attention from every position to normal context and global normal prototypes.

    Attention logits get a bias ``log((1 - p) * (1 - u) + eps)`` for the image's own positions, so positions
    perceived as anomalous (``p``) or uncertain (``u``) are hardly used as context; prototypes always are.
    A square neighbourhood of ``exclude_radius`` around each query is masked out, so that a position (and
    its immediate, overlapping neighbours, which share its receptive field) cannot copy itself.

    Args:
        channels: feature channels ``C`` (values are the raw features; outputs have ``C`` channels).
        num_prototypes: number of learnable normal prototypes (``init_prototypes`` fills them from normal data).
        embed_dim: width of the query/key projections.
        num_heads: attention heads; their attention-weighted features are averaged (still a convex combination).
        exclude_radius: Chebyshev radius of the masked neighbourhood around each query (0 masks only itself).
        distance_attention: add ``-||x_i - p_k||^2 / (C * tau)`` to the logits of the prototypes, with a learned
            temperature ``tau`` (set from the data by ``init_prototypes``): a soft nearest-neighbour term in
            feature space, so a position is restored mostly from the normal prototypes closest to it. Without
            it the learned projections alone decide, and the restoration blurs towards an average.
    """

    def __init__(
        self,
        channels: int,
        num_prototypes: int = 1024,
        embed_dim: int = 128,
        num_heads: int = 4,
        exclude_radius: int = 1,
        distance_attention: bool = True,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.channels = channels
        self.num_heads = num_heads
        self.exclude_radius = exclude_radius
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, channels) * 0.1)
        self.norm = nn.LayerNorm(channels)
        self.query = nn.Linear(channels, embed_dim)
        self.key = nn.Linear(channels, embed_dim)
        self.distance_attention = distance_attention
        self.log_temperature = nn.Parameter(torch.zeros(()))
        self._exclusion_cache: dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    def init_prototypes(self, features: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Fill the prototypes with normal feature vectors drawn at random from ``features`` (N, C, h, w).

        A data-driven start (as k-means-initialised codebooks are); training then adapts them.
        """
        tokens = features.permute(0, 2, 3, 1).reshape(-1, self.channels)
        k = self.prototypes.shape[0]
        idx = torch.randperm(tokens.shape[0], generator=generator)[:k]
        if idx.numel() < k:  # fewer tokens than prototypes: repeat
            idx = idx[torch.arange(k) % idx.numel()]
        self.prototypes.copy_(tokens[idx.to(tokens.device)].to(self.prototypes))
        # temperature start: the median squared distance (per channel) from a token to its nearest prototype
        sample = tokens[torch.randperm(tokens.shape[0], generator=generator)[:2048].to(tokens.device)]
        nearest = torch.cdist(sample, self.prototypes.to(sample)).amin(dim=1).pow(2) / self.channels
        self.log_temperature.fill_(torch.log(nearest.median().clamp_min(1e-6)).item())

    def prototype_distance(self, features: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Euclidean distance from each position's features to the nearest normal prototype, (B, 1, h, w).

        The restoration from the global normal memory in its hard form (the nearest prototype as the restored
        feature); see :func:`nearest_distance`.
        """
        return nearest_distance(features, self.prototypes, chunk)

    def _exclusion(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        key = (h, w, self.exclude_radius, str(device))
        if key not in self._exclusion_cache:
            yy, xx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            yy, xx = yy.flatten(), xx.flatten()
            near = ((yy[:, None] - yy[None]).abs() <= self.exclude_radius) & ((xx[:, None] - xx[None]).abs() <= self.exclude_radius)
            self._exclusion_cache[key] = near
        return self._exclusion_cache[key]

    def forward(self, features: torch.Tensor, probability: torch.Tensor | None = None, uncertainty: torch.Tensor | None = None) -> RestorationOutput:
        """
        Args:
            features: (B, C, h, w) input (possibly anomalous) features.
            probability: (B, 1, h, w) perceived anomaly probability; None trusts every position equally and
                restores everywhere (the "perception off" ablation).
            uncertainty: (B, 1, h, w) in [0, 1]; None means certain.
        """
        b, c, h, w = features.shape
        n = h * w
        tokens = features.flatten(2).transpose(1, 2)  # (B, N, C)
        protos = self.prototypes.to(features.dtype)
        normed_tokens = self.norm(tokens)
        q = self.query(normed_tokens)
        k_img = self.key(normed_tokens)
        k_pro = self.key(self.norm(protos)).unsqueeze(0).expand(b, -1, -1)
        keys = torch.cat([k_img, k_pro], dim=1)  # (B, N + K, D)
        values = torch.cat([tokens, protos.unsqueeze(0).expand(b, -1, -1)], dim=1)  # (B, N + K, C)

        # additive bias: trust of image positions, -inf on the excluded neighbourhood, 0 for prototypes
        bias = torch.zeros(b, n, n + protos.shape[0], device=features.device, dtype=features.dtype)
        if probability is not None:
            trust = 1.0 - probability.flatten(1)
            if uncertainty is not None:
                trust = trust * (1.0 - uncertainty.flatten(1))
            bias[:, :, :n] = torch.log(trust.clamp_min(0.0) + 1e-4).unsqueeze(1)
        bias[:, :, :n].masked_fill_(self._exclusion(h, w, features.device), float("-inf"))

        heads, d = self.num_heads, q.shape[-1] // self.num_heads
        q = q.view(b, n, heads, d).transpose(1, 2)
        keys = keys.view(b, -1, heads, d).transpose(1, 2)
        if self.distance_attention:
            # prototypes only: an anomalous region is always close to itself in feature space, so a distance
            # term on the image's own positions would let it copy its anomalous neighbours whatever p says
            protos_b = values[:, n:]
            sq = tokens.pow(2).sum(-1, keepdim=True) + protos_b.pow(2).sum(-1).unsqueeze(1) - 2 * torch.bmm(tokens, protos_b.transpose(1, 2))
            # relative to each query's nearest prototype: the term ranks prototypes among themselves and does not
            # shift the prototypes as a group against the image's context, however far the query is from normal
            sq = sq - sq.amin(dim=-1, keepdim=True)
            bias = torch.cat([bias[:, :, :n], bias[:, :, n:] - sq / (c * self.log_temperature.exp())], dim=2)
        logits = torch.matmul(q, keys.transpose(-1, -2)) * d**-0.5 + bias.unsqueeze(1)  # (B, H, N, N + K)
        # averaging the heads' weights first equals averaging their outputs (the values are shared), keeps a
        # convex combination, and multiplies the C-channel values once instead of once per head
        weights = torch.softmax(logits, dim=-1).mean(dim=1)
        restoration = torch.bmm(weights, values).transpose(1, 2).reshape(b, c, h, w)
        gate = torch.ones_like(features[:, :1]) if probability is None else probability
        restored = gate * restoration + (1.0 - gate) * features
        return RestorationOutput(restoration, restored)
