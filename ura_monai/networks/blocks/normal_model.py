"""Position-aware normal model: a Gaussian of the normal features at every position of the feature grid.

Aligned parts (tiles, PCBs, screws in a fixture) have a normal appearance that depends on where one looks; a
position-free memory (nearest neighbour over all training patches) accepts a feature that is normal somewhere
but not here. The per-position Gaussian, as in PaDiM (Defard et al., ICPR 2020), scores each position by the
Mahalanobis distance to the normal features seen at that position. Features are first projected onto a fixed
random orthonormal basis of ``dim`` channels (PaDiM keeps a random subset of channels for the same reason: the
covariances, one per position, would otherwise dominate memory and time).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ura_monai.networks.blocks.ram import draw_normal_tokens, nearest_distance

__all__ = ["PositionalGaussian", "cross_fitted_normal_distances", "image_folds"]


class PositionalGaussian(nn.Module):
    """Per-position Gaussian of normal features; ``forward`` gives the Mahalanobis distance map.

    Args:
        channels: feature channels ``C``.
        grid_size: ``(h, w)`` of the feature grid (fixed by the model's image size and feature stride).
        dim: channels kept by the random orthonormal projection (``min(dim, C)``).
        regularization: added to the covariance diagonal, relative to the mean feature variance (keeps the
            covariance invertible with few training images).
        seed: seed of the projection, so that a model rebuilt from its config has the same basis.
    """

    # buffers
    projection: torch.Tensor
    mean: torch.Tensor
    whitening: torch.Tensor

    def __init__(
        self, channels: int, grid_size: tuple[int, int], dim: int = 64, regularization: float = 0.01, seed: int = 0
    ) -> None:
        super().__init__()
        self.channels, self.grid_size = channels, tuple(grid_size)
        self.dim = min(dim, channels)
        self.regularization = regularization
        generator = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(torch.randn(channels, self.dim, generator=generator))
        self.register_buffer("projection", basis)
        positions = self.grid_size[0] * self.grid_size[1]
        self.register_buffer("mean", torch.zeros(positions, self.dim))
        # inverse Cholesky factor of each position's covariance (a matrix product at inference, which TorchScript
        # and ONNX export); before ``fit``: zero mean and unit covariance (the distance is the projected feature's norm)
        self.register_buffer("whitening", torch.eye(self.dim).expand(positions, -1, -1).clone())

    def _tokens(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (h*w, B, dim) projected features, position-major."""
        b, c, h, w = features.shape
        if (h, w) != self.grid_size or c != self.channels:
            raise ValueError(
                f"features of shape {tuple(features.shape)} do not match the normal model's grid {self.grid_size} x {self.channels} channels"
            )
        projected = torch.einsum("bchw,cd->hwbd", features, self.projection.to(features.dtype))
        return projected.reshape(h * w, b, self.dim)

    @torch.no_grad()
    def fit(self, features: torch.Tensor, chunk: int = 128) -> None:
        """Fit mean and covariance per position from normal features (N, C, h, w); with a single sample the
        covariance is the regularization alone (the sample's mean feature energy times ``regularization``)."""
        tokens = self._tokens(features.float())
        mean = tokens.mean(dim=1)
        spread = tokens.var(dim=1).mean() if tokens.shape[1] > 1 else tokens.pow(2).mean()
        reg = self.regularization * spread.clamp_min(1e-8)
        eye = torch.eye(self.dim, dtype=tokens.dtype, device=tokens.device)
        factors = []
        for part, mu in zip(tokens.split(chunk), mean.split(chunk)):
            centred = part - mu.unsqueeze(1)
            cov = centred.transpose(1, 2) @ centred / max(part.shape[1] - 1, 1) + reg * eye
            factor = torch.linalg.cholesky(cov)
            factors.append(torch.linalg.solve_triangular(factor, eye.expand_as(factor), upper=False))
        self.mean.copy_(mean.to(self.mean))
        self.whitening.copy_(torch.cat(factors).to(self.whitening))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of each position's features to its normal Gaussian, (B, 1, h, w).

        Features on another grid (an image of another size or aspect than the training size) are resampled to
        the model's grid, which describes the resized image frame, and the distances back to theirs."""
        size = tuple(features.shape[-2:])
        if size != self.grid_size:
            resized = F.interpolate(features, size=self.grid_size, mode="bilinear", align_corners=False)
            return F.interpolate(self(resized), size=size, mode="bilinear", align_corners=False)
        b, _, h, w = features.shape
        centred = self._tokens(features) - self.mean.to(features.dtype).unsqueeze(1)  # (h*w, B, dim)
        whitened = torch.bmm(self.whitening.to(features.dtype), centred.transpose(1, 2))  # (h*w, dim, B)
        return whitened.pow(2).sum(dim=1).sqrt().transpose(0, 1).reshape(b, 1, h, w)


@torch.no_grad()
def cross_fitted_normal_distances(
    features: torch.Tensor,
    queries: torch.Tensor | None,
    query_rows: torch.Tensor | None,
    memory_size: int,
    position_model: PositionalGaussian | None,
    folds: int = 4,
    generator: torch.Generator | None = None,
    coreset: bool = True,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distances a *new* normal image gets, from normal training ``features`` (N, C, h, w) alone.

    The images, in their order (a datalist's sorted names), are split into ``folds`` contiguous blocks; the rows of
    one image (``groups``: its cached views) stay in its block. Each block is scored by a memory (``memory_size``
    positions of the other blocks, chosen as the model's memory is: a coreset or at random,
    :func:`~ura_monai.networks.blocks.ram.draw_normal_tokens`; none when 0) and by a copy of ``position_model``
    fitted on the other blocks (none when None). ``queries`` (M, C, h, w) made from normal images (e.g. synthetic
    defects painted into them) are scored by the fold models that did not see their image, row ``query_rows[j]``
    of ``features``. Blocks of neighbouring names, not random folds: names often follow capture sessions, so a block
    holds out whole sessions, and the perception trained on such pessimistic normal signals scored images better
    than with random folds (docs/design.md, Normal models).

    Args:
        groups: (N,) image index of each row (rows of one image share it; images numbered in their order); None:
            every row is its own image.

    Returns:
        ``(memory, position, query memory, query position)``, each (rows, 1, h, w); a missing part is zeros, the query
        parts are empty without queries.
    """
    n = features.shape[0]
    fold_of_row = image_folds(n, folds, groups).to(features.device)
    memory, position = torch.zeros_like(features[:, :1]), torch.zeros_like(features[:, :1])
    if queries is None or query_rows is None:
        queries, query_rows = features[:0], torch.zeros(0, dtype=torch.long)
    query_memory, query_position = torch.zeros_like(queries[:, :1]), torch.zeros_like(queries[:, :1])
    query_folds = fold_of_row[query_rows.to(fold_of_row.device)].to(queries.device)
    held_out_model = None if position_model is None else copy.deepcopy(position_model)
    for fold in range(int(fold_of_row.max()) + 1):
        inside = fold_of_row == fold
        others = features[~inside]
        picked = query_folds == fold
        if memory_size > 0:
            bank = draw_normal_tokens(others, memory_size, generator, coreset)
            memory[inside] = nearest_distance(features[inside], bank)
            if picked.any():
                query_memory[picked] = nearest_distance(queries[picked], bank)
        if held_out_model is not None:
            held_out_model.fit(others)
            position[inside] = held_out_model(features[inside])
            if picked.any():
                query_position[picked] = held_out_model(queries[picked])
    return memory, position, query_memory, query_position


def image_folds(rows: int, folds: int, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Fold index (rows,) of each row: the images (``groups``, see :func:`cross_fitted_normal_distances`) in their
    order, split into ``min(folds, images)`` contiguous blocks (at least 2) of equal size to within one image."""
    groups = torch.arange(rows) if groups is None else groups.detach().cpu().long()
    if groups.shape != (rows,):
        raise ValueError(f"groups must give one image index per row ({rows}), got shape {tuple(groups.shape)}")
    images, image_of_row = torch.unique(groups, return_inverse=True)  # sorted: the images' own order
    count = len(images)
    folds = max(2, min(folds, count))
    bounds = torch.linspace(0, count, folds + 1).round().long()
    fold_of_image = torch.bucketize(torch.arange(count), bounds[1:-1], right=True)
    return fold_of_image[image_of_row]
