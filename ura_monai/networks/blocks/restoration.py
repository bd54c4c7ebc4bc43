"""RAM's restoration network: a transformer that restores normal features from corrupted or masked ones.

The first author's feature-restoration detectors (AMI-Net, FSR) and UniAD restore features with a transformer
over the feature map; URA-Net's abstract says its restoration attention "uses global normal semantic information
to restore the detected anomalous regions to defect-free features". Read together (``docs/design.md``, RAM):

- the feature grid is cut into ``patch_size`` x ``patch_size`` patches, each one token (a linear embedding of
  its features), with fixed 2-D sine-cosine positions, so that aligned parts can be restored position by position;
- positions to restore are **masked**: their token is blended towards a learned mask token by the mask value, so
  the network restores them from the visible normal context (during training, a random share of patches is
  masked as well, so the network learns to inpaint);
- ``num_normal_tokens`` **learned normal tokens** join the sequence (global normal semantics the image does not
  show), and the last block **cross-attends to the normal memory** (the normal prototypes, projected);
- MONAI ``TransformerBlock`` s (self-attention, cross-attention and a feed-forward layer) and a **decoder** (an MLP
  from each token back to its patch's features), so the restoration can leave the span of the input features.

It is trained (``URANetLoss``'s restoration terms) to give the clean features back from FASM's corrupted ones;
the residual between input and restoration is one of the perception's signals.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import TransformerBlock
from torch import nn

from ura_monai.networks.blocks.ram import RestorationOutput, draw_normal_tokens, nearest_distance

__all__ = ["RestorationTransformer", "sincos_positions"]


def sincos_positions(height: int, width: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings (height * width, dim), row-major; ``dim`` a multiple of 4."""
    if dim % 4:
        raise ValueError(f"the position embedding width must be a multiple of 4, got {dim}")
    y, x = torch.meshgrid(
        torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
    )
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    angles_x, angles_y = x.reshape(-1, 1) * omega, y.reshape(-1, 1) * omega
    return torch.cat([angles_x.sin(), angles_x.cos(), angles_y.sin(), angles_y.cos()], dim=1)


class RestorationTransformer(nn.Module):
    """Masked feature restoration from normal context, learned normal tokens and the normal memory.

    Args:
        channels: feature channels ``C`` (input and output).
        grid_size: ``(h, w)`` of the feature grid (multiples of ``patch_size``); features of another grid are
            resampled to it and the restoration back.
        num_prototypes: size of the normal memory (filled by ``init_prototypes`` from normal training features;
            a statistic of the data, not trained: the ``memory`` map is the distance to its nearest entry).
        hidden_size: token width.
        depth: transformer blocks.
        num_heads: attention heads (``hidden_size`` must be divisible by it).
        patch_size: feature-grid cells per token side.
        num_normal_tokens: learned normal tokens added to the sequence.
        mlp_ratio: feed-forward width over ``hidden_size``.
        mask_ratio: share of patches masked at random in training mode (inpainting practice); 0 disables it.
        memory_attention: the last block cross-attends to the normal memory.
    """

    prototypes: torch.Tensor  # parameter without gradient: the normal memory

    def __init__(
        self,
        channels: int,
        grid_size: tuple[int, int],
        num_prototypes: int = 1024,
        hidden_size: int = 128,
        depth: int = 3,
        num_heads: int = 4,
        patch_size: int = 2,
        num_normal_tokens: int = 16,
        mlp_ratio: float = 2.0,
        mask_ratio: float = 0.25,
        memory_attention: bool = True,
    ) -> None:
        super().__init__()
        h, w = grid_size
        if h % patch_size or w % patch_size:
            raise ValueError(f"the feature grid {grid_size} must be a multiple of patch_size {patch_size}")
        self.channels, self.grid_size, self.patch_size = channels, (h, w), patch_size
        self.mask_ratio = mask_ratio
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, channels) * 0.1, requires_grad=False)
        self.embed = nn.Linear(channels * patch_size**2, hidden_size)
        self.register_buffer("positions", sincos_positions(h // patch_size, w // patch_size, hidden_size)[None])
        self.mask_token = nn.Parameter(torch.zeros(hidden_size))
        self.normal_tokens = nn.Parameter(torch.randn(1, num_normal_tokens, hidden_size) * 0.02)
        self.memory_projection = nn.Linear(channels, hidden_size) if memory_attention else None
        # the last block cross-attends to the normal memory (in every block it tripled the CPU training time)
        self.blocks = nn.ModuleList(
            [
                TransformerBlock(
                    hidden_size,
                    int(hidden_size * mlp_ratio),
                    num_heads,
                    with_cross_attention=memory_attention and i == depth - 1,
                )
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.decoder = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, channels * patch_size**2)
        )

    @torch.no_grad()
    def init_prototypes(
        self, features: torch.Tensor, generator: torch.Generator | None = None, coreset: bool = True
    ) -> None:
        """Fill the normal memory from normal ``features`` (N, C, h, w): a coreset or drawn at random
        (:func:`~ura_monai.networks.blocks.ram.draw_normal_tokens`)."""
        memory = draw_normal_tokens(features, self.prototypes.shape[0], generator, coreset)
        self.prototypes.copy_(memory.to(self.prototypes))

    def prototype_distance(self, features: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Euclidean distance of each position's features to the nearest entry of the normal memory, (B, 1, h, w)."""
        return nearest_distance(features, self.prototypes, chunk)

    def _tokens(self, features: torch.Tensor) -> torch.Tensor:
        b, c, h, w = features.shape
        p = self.patch_size
        patches = features.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(b, (h // p) * (w // p), c * p * p)

    def _features(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, p, c = tokens.shape[0], self.patch_size, self.channels
        patches = tokens.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return patches.reshape(b, c, h, w)

    def restore(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The restoration (B, C, h, w) of ``features`` with the positions in ``mask`` (B, 1, h, w; in [0, 1],
        soft) masked; in training mode ``mask_ratio`` of the patches are masked as well."""
        size = tuple(features.shape[-2:])
        if size != self.grid_size:
            resized = F.interpolate(features, size=self.grid_size, mode="bilinear", align_corners=False)
            mask = (
                None if mask is None else F.interpolate(mask, size=self.grid_size, mode="bilinear", align_corners=False)
            )
            return F.interpolate(self.restore(resized, mask), size=size, mode="bilinear", align_corners=False)
        b = features.shape[0]
        h, w = self.grid_size
        tokens = self.embed(self._tokens(features))
        patch_mask = None if mask is None else F.avg_pool2d(mask.to(tokens.dtype), self.patch_size).flatten(1)
        if self.training and self.mask_ratio > 0:
            random = (torch.rand(tokens.shape[:2], device=tokens.device) < self.mask_ratio).to(tokens.dtype)
            patch_mask = random if patch_mask is None else torch.maximum(patch_mask, random)
        if patch_mask is not None:
            m = patch_mask.unsqueeze(-1)
            tokens = (1.0 - m) * tokens + m * self.mask_token.to(tokens.dtype)
        tokens = torch.cat([self.normal_tokens.expand(b, -1, -1).to(tokens.dtype), tokens + self.positions], dim=1)
        context = None
        if self.memory_projection is not None:
            context = self.memory_projection(self.prototypes.to(tokens.dtype)).unsqueeze(0).expand(b, -1, -1)
        for block in self.blocks:
            tokens = block(tokens, context=context if block.with_cross_attention else None)
        tokens = self.decoder(self.norm(tokens[:, self.normal_tokens.shape[1] :]))
        return self._features(tokens, h, w)

    def forward(
        self, features: torch.Tensor, probability: torch.Tensor | None = None, uncertainty: torch.Tensor | None = None
    ) -> RestorationOutput:
        """
        Args:
            features: (B, C, h, w) input (possibly anomalous) features.
            probability: (B, 1, h, w) perceived anomaly probability: positions are masked by it and restored from
                normal context; None masks nothing.
            uncertainty: (B, 1, h, w) in [0, 1]: uncertain positions are masked too (``1 - (1 - p)(1 - u)``).

        Returns:
            ``restoration`` (the network's output everywhere) and ``restored`` (``m * restoration + (1 - m) *
            features`` with the mask ``m``; all restoration when nothing is masked, as the attention RAM does
            without a perception).
        """
        mask = probability
        if probability is not None and uncertainty is not None:
            mask = 1.0 - (1.0 - probability) * (1.0 - uncertainty)
        restoration = self.restore(features, mask)
        gate = torch.ones_like(features[:, :1]) if mask is None else mask
        return RestorationOutput(restoration, gate * restoration + (1.0 - gate) * features)
