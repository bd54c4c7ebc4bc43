"""RAM: restoration attention mechanism (URA-Net, Luo et al. 2026).

Every position is restored from *other* information believed normal: the other positions of the same image,
weighted by how normal the perception module thinks they are, and a bank of learnable global normal
prototypes. The restoration is a convex combination of those (raw) features, so it stays inside the span of
normal features and cannot reproduce an anomaly; the output blends it in where an anomaly was perceived.

The attention has three modes (``attention=``, as MONAI's ``SABlock`` has its flash-attention switch), the
same maths to within float rounding:

- ``"reference"`` (default): all logits (B, heads, N, N + K) in memory, differentiable; what training and
  ``URANet.forward`` run and what the other modes are checked against;
- ``"chunked"`` (inference): blocks of queries, so the (heads, queries, N + K) logits of a block stay in cache;
  the per-key trust bias rides in the logits product as an extra query/key dimension; the excluded
  neighbourhood is a scatter of -inf at cached indices; the heads' weights are summed before the single value
  product;
- ``"sdpa"`` (inference): ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels, no logits in
  memory on the GPU), with a cached exclusion mask shared by all images and heads.

The inference modes run the norm and projections in float32 under no autocast, and the value products (and the
queries and keys of ``sdpa``) in a chosen compute dtype; they use in-place and ``out=`` products, so they do not
support autograd. :meth:`RestorationAttention.restore_tokens` is their token-layout entry point (the fast
inference path, ``ura_monai.inference.fast``, calls it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ura_monai.utils.enums import RamAttention

__all__ = [
    "RAM_ATTENTION_MODES",
    "RestorationAttention",
    "RestorationOutput",
    "default_block_elements",
    "draw_normal_tokens",
    "greedy_coreset",
    "nearest_distance",
]

RAM_ATTENTION_MODES = RamAttention.choices()

# elements of one block of attention logits (heads x queries x keys) of the chunked mode: ~8 MiB of float32 on
# the CPU keeps a block in the last-level cache; on the GPU a block is large (the kernels need work) but bounded
CPU_BLOCK_ELEMENTS = 1 << 21
GPU_BLOCK_ELEMENTS = 1 << 29
_CACHE_SIZE = 8  # cached masks and indices per module (one per grid size, dtype and device in use)
# the normal memory's coreset: distances in a random projection of this many channels, over at most this many positions
CORESET_PROJECTION_DIM = 64
CORESET_MAX_CANDIDATES = 1 << 20


def default_block_elements(device: torch.device) -> int:
    """Logits elements per block of the chunked attention (and of other blocked products) on ``device``."""
    return GPU_BLOCK_ELEMENTS if device.type == "cuda" else CPU_BLOCK_ELEMENTS


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


def draw_normal_tokens(
    features: torch.Tensor, count: int, generator: torch.Generator | None = None, coreset: bool = True
) -> torch.Tensor:
    """``count`` feature vectors (count, C) from the positions of normal ``features`` (N, C, h, w): the normal memory.

    With ``coreset`` (the default), a greedy k-center coreset as PatchCore (Roth et al., CVPR 2022) subsamples its
    memory: from a random start, each next vector is the one farthest from those already chosen, so rare normal
    appearances (another capture session, an edge) are kept instead of being outnumbered; distances are measured
    in a fixed random projection to ``CORESET_PROJECTION_DIM`` channels, and at most ``CORESET_MAX_CANDIDATES``
    positions (drawn at random) are candidates, which bounds time and memory. Without, the vectors are drawn
    uniformly at random (checkpoints before the coreset). Repeated when there are fewer positions than ``count``.
    """
    tokens = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    if coreset and tokens.shape[0] > count:
        candidates = torch.randperm(tokens.shape[0], generator=generator)[:CORESET_MAX_CANDIDATES]
        idx = candidates[greedy_coreset(tokens[candidates.to(tokens.device)], count, generator).cpu()]
    else:
        idx = torch.randperm(tokens.shape[0], generator=generator)[:count]
    if idx.numel() < count:  # fewer tokens than prototypes: repeat
        idx = idx[torch.arange(count) % idx.numel()]
    return tokens[idx.to(tokens.device)]


def greedy_coreset(tokens: torch.Tensor, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices (count,) of a greedy k-center coreset of ``tokens`` (M, C), ``count < M``: see :func:`draw_normal_tokens`."""
    dim = min(CORESET_PROJECTION_DIM, tokens.shape[1])
    projection = torch.randn(tokens.shape[1], dim, generator=generator) / dim**0.5
    z = tokens.float() @ projection.to(tokens.device)
    squared = z.pow(2).sum(1)
    chosen = [int(torch.randint(tokens.shape[0], (1,), generator=generator))]
    # squared distance of every token to its nearest chosen one, updated as the coreset grows
    nearest = torch.addmv(squared, z, z[chosen[0]], alpha=-2.0).add_(float(squared[chosen[0]]))
    for _ in range(1, count):
        chosen.append(int(nearest.argmax()))
        distance = torch.addmv(squared, z, z[chosen[-1]], alpha=-2.0).add_(float(squared[chosen[-1]]))
        torch.minimum(nearest, distance, out=nearest)
    return torch.tensor(chosen, device=tokens.device)


class RestorationOutput(NamedTuple):
    """restoration: (B, C, h, w) features restored from normal context at every position.
    restored: (B, C, h, w) ``p * restoration + (1 - p) * input``: the input with perceived anomalies restored.
    """

    restoration: torch.Tensor
    restored: torch.Tensor


class _AttentionInputs(NamedTuple):
    """What the inference modes share: float32 tokens (B, N, C), prototypes (K, C), queries (B, N, D) and keys
    (B, N + K, heads, d); values (B, N + K, C) in the compute dtype; the log-trust of the positions (B, N) or None."""

    tokens: torch.Tensor
    prototypes: torch.Tensor
    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    log_trust: torch.Tensor | None


def _log_trust(probability: torch.Tensor, uncertainty: torch.Tensor | None) -> torch.Tensor:
    """``log((1 - p) * (1 - u) + 1e-4)`` per position, (B, N): the attention bias of the image's own positions."""
    trust = 1.0 - probability.flatten(1)
    if uncertainty is not None:
        trust = trust * (1.0 - uncertainty.flatten(1))
    return torch.log(trust.clamp_min(0.0) + 1e-4)


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
        attention: how ``forward`` computes the attention: ``"reference"`` (default; differentiable),
            ``"chunked"`` or ``"sdpa"`` (inference only; see the module docstring). Not saved in checkpoints.
    """

    def __init__(
        self,
        channels: int,
        num_prototypes: int = 1024,
        embed_dim: int = 128,
        num_heads: int = 4,
        exclude_radius: int = 1,
        distance_attention: bool = True,
        attention: str = "reference",
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
        self.attention = self._mode(attention)
        self._exclusion_cache: dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    def init_prototypes(
        self, features: torch.Tensor, generator: torch.Generator | None = None, coreset: bool = True
    ) -> None:
        """Fill the prototypes with normal feature vectors of ``features`` (N, C, h, w): a coreset or drawn at random
        (:func:`draw_normal_tokens`). URANet keeps a coreset fixed; a random draw is a data-driven start (as
        k-means-initialised codebooks are) that training then adapts (the first design)."""
        tokens = features.permute(0, 2, 3, 1).reshape(-1, self.channels)
        memory = draw_normal_tokens(features, self.prototypes.shape[0], generator, coreset)
        self.prototypes.copy_(memory.to(self.prototypes))
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

    # ------------------------------------------------------------------ cached masks and indices
    def _cached(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        tensor = self._exclusion_cache.get(key)
        if tensor is None:
            if len(self._exclusion_cache) > _CACHE_SIZE:
                self._exclusion_cache.clear()
            tensor = self._exclusion_cache[key] = make()
        return tensor

    def _exclusion(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """(N, N) bool: True where a key position lies in the excluded neighbourhood of a query position."""

        def make() -> torch.Tensor:
            yy, xx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            yy, xx = yy.flatten(), xx.flatten()
            r = self.exclude_radius
            return ((yy[:, None] - yy[None]).abs() <= r) & ((xx[:, None] - xx[None]).abs() <= r)

        return self._cached(("near", h, w, self.exclude_radius, str(device)), make)

    def _exclusion_bias(self, h: int, w: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(N, N + k) float: -inf on the excluded neighbourhood of each query, 0 elsewhere (and on the k prototypes)."""

        def make() -> torch.Tensor:
            bias = torch.zeros(h * w, h * w + k, device=device, dtype=dtype)
            bias[:, : h * w].masked_fill_(self._exclusion(h, w, device), float("-inf"))
            return bias

        return self._cached(("bias", h, w, self.exclude_radius, k, dtype, str(device)), make)

    def _neighbours(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """(N, (2r+1)^2) indices of the excluded neighbourhood of each query (borders repeat the query itself)."""

        def make() -> torch.Tensor:
            r = self.exclude_radius
            yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            yy, xx = yy.flatten()[:, None], xx.flatten()[:, None]
            dy, dx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
            ny, nx = yy + dy.flatten()[None], xx + dx.flatten()[None]
            inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
            return torch.where(inside, ny * w + nx, yy * w + xx).to(device)

        return self._cached(("neighbours", h, w, self.exclude_radius, str(device)), make)

    def prepare(self, hw: tuple[int, int], attention: str | None, dtype: torch.dtype, device: torch.device) -> None:
        """Fill the caches that ``attention`` reads for an (h, w) grid, eagerly: ``torch.compile``d code and CUDA
        graph capture then only read them. ``dtype``: the compute dtype of the inference modes."""
        mode, (h, w) = self._mode(attention), hw
        if mode == "reference":
            self._exclusion(h, w, device)
        elif mode == "chunked":
            self._neighbours(h, w, device)
        elif self.distance_attention:  # sdpa, per-image mask: the exclusion of the image's positions
            self._exclusion_bias(h, w, 0, torch.float32, device)
        else:  # sdpa, one mask for all images: the exclusion and the prototypes' zeros
            self._exclusion_bias(h, w, self.prototypes.shape[0], dtype, device)

    # ------------------------------------------------------------------ entry points
    def _mode(self, attention: str | None) -> str:
        mode = self.attention if attention is None else attention
        if mode not in RAM_ATTENTION_MODES:
            raise ValueError(f"attention must be one of {RAM_ATTENTION_MODES}, got '{mode}'")
        return str(mode)

    def forward(
        self, features: torch.Tensor, probability: torch.Tensor | None = None, uncertainty: torch.Tensor | None = None
    ) -> RestorationOutput:
        """
        Args:
            features: (B, C, h, w) input (possibly anomalous) features.
            probability: (B, 1, h, w) perceived anomaly probability; None trusts every position equally and
                restores everywhere (the "perception off" ablation).
            uncertainty: (B, 1, h, w) in [0, 1]; None means certain.
        """
        if self.attention == "reference":
            restoration = self._reference(features, probability, uncertainty)
        else:
            b, c, h, w = features.shape
            tokens = features.flatten(2).transpose(1, 2)
            restoration = (
                self.restore_tokens(tokens, (h, w), probability, uncertainty).transpose(1, 2).reshape(b, c, h, w)
            )
        gate = torch.ones_like(features[:, :1]) if probability is None else probability
        restored = gate * restoration + (1.0 - gate) * features
        return RestorationOutput(restoration, restored)

    def restore_tokens(
        self,
        tokens: torch.Tensor,
        hw: tuple[int, int],
        probability: torch.Tensor | None = None,
        uncertainty: torch.Tensor | None = None,
        attention: str | None = None,
        compute_dtype: torch.dtype | None = None,
        block_elements: int | None = None,
    ) -> torch.Tensor:
        """The ``restoration`` of token features (B, N, C), ``N = h * w`` in row-major order, as (B, N, C).

        Args:
            tokens: (B, N, C) features.
            hw: the grid ``(h, w)``.
            probability, uncertainty: (B, 1, h, w) or None, as for ``forward``.
            attention: the mode (None: the module's ``attention``).
            compute_dtype: inference modes: dtype of the value products (and of the queries and keys of ``sdpa``);
                None: the tokens' dtype. The norm and projections run in float32, and so do the logits, bias and
                softmax of ``chunked``; the fused kernels of ``sdpa`` keep their logits in float32 internally.
            block_elements: logits elements per block of ``chunked`` (default :func:`default_block_elements`).
        """
        mode = self._mode(attention)
        if mode == "reference":
            b, n, c = tokens.shape
            restoration = self._reference(tokens.transpose(1, 2).reshape(b, c, *hw), probability, uncertainty)
            return restoration.flatten(2).transpose(1, 2)
        if torch.is_grad_enabled() and self.prototypes.requires_grad:
            raise RuntimeError(
                f"attention '{mode}' is for inference (no autograd): run it under torch.no_grad() or use 'reference'"
            )
        blocks = block_elements or default_block_elements(tokens.device)
        with torch.autocast(tokens.device.type, enabled=False):  # dtypes are chosen explicitly
            inputs = self._attention_inputs(tokens, probability, uncertainty, compute_dtype or tokens.dtype)
            if mode == "sdpa":
                return self._sdpa(inputs, hw, blocks)
            return self._chunked(inputs, hw, blocks)

    # ------------------------------------------------------------------ reference
    def _reference(
        self, features: torch.Tensor, probability: torch.Tensor | None, uncertainty: torch.Tensor | None
    ) -> torch.Tensor:
        """The restoration (B, C, h, w) with all logits (B, heads, N, N + K) in memory; differentiable."""
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
            bias[:, :, :n] = _log_trust(probability, uncertainty).unsqueeze(1)
        bias[:, :, :n].masked_fill_(self._exclusion(h, w, features.device), float("-inf"))

        heads, d = self.num_heads, q.shape[-1] // self.num_heads
        q = q.view(b, n, heads, d).transpose(1, 2)
        keys = keys.view(b, -1, heads, d).transpose(1, 2)
        if self.distance_attention:
            # prototypes only: an anomalous region is always close to itself in feature space, so a distance
            # term on the image's own positions would let it copy its anomalous neighbours whatever p says
            protos_b = values[:, n:]
            sq = (
                tokens.pow(2).sum(-1, keepdim=True)
                + protos_b.pow(2).sum(-1).unsqueeze(1)
                - 2 * torch.bmm(tokens, protos_b.transpose(1, 2))
            )
            # relative to each query's nearest prototype: the term ranks prototypes among themselves and does not
            # shift the prototypes as a group against the image's context, however far the query is from normal
            sq = sq - sq.amin(dim=-1, keepdim=True)
            bias = torch.cat([bias[:, :, :n], bias[:, :, n:] - sq / (c * self.log_temperature.exp())], dim=2)
        logits = torch.matmul(q, keys.transpose(-1, -2)) * d**-0.5 + bias.unsqueeze(1)  # (B, H, N, N + K)
        # averaging the heads' weights first equals averaging their outputs (the values are shared), keeps a
        # convex combination, and multiplies the C-channel values once instead of once per head
        weights = torch.softmax(logits, dim=-1).mean(dim=1)
        return torch.bmm(weights, values).transpose(1, 2).reshape(b, c, h, w)

    # ------------------------------------------------------------------ inference modes
    def _attention_inputs(
        self,
        tokens: torch.Tensor,
        probability: torch.Tensor | None,
        uncertainty: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> _AttentionInputs:
        b, n, _ = tokens.shape
        protos = self.prototypes.to(tokens.dtype).float()  # as the reference: prototypes in the features' dtype
        # norm and projections in float32 (a few GFLOP even at batch 256; keeps the logits accurate)
        tokens_f = tokens.float()
        normed = self.norm(tokens_f)
        q = self.query(normed)
        k_img = self.key(normed)
        k_pro = self.key(self.norm(protos))
        heads = self.num_heads
        d = q.shape[-1] // heads
        values = torch.cat([tokens.to(dtype), protos.to(dtype).unsqueeze(0).expand(b, -1, -1)], dim=1)
        keys = torch.cat([k_img, k_pro.unsqueeze(0).expand(b, -1, -1)], dim=1).view(b, n + protos.shape[0], heads, d)
        log_trust = None
        if probability is not None:
            log_trust = _log_trust(probability.float(), None if uncertainty is None else uncertainty.float())
        return _AttentionInputs(tokens_f, protos, q, keys, values, log_trust)

    def _prototype_bias(self, x: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
        """The distance term of the prototypes' logits, (..., Q, C) -> (..., Q, K) float32:
        ``-(|x - p|^2 - min_p |x - p|^2) / (C tau) = (s - max_p s) / (C tau)`` with ``s = 2 x.p - |p|^2`` (``|x|^2``
        cancels), per query and prototype, shared by the heads."""
        inv_temperature = 1.0 / (x.shape[-1] * self.log_temperature.float().exp())
        s = torch.matmul(x, protos.t()).mul_(2.0).sub_(protos.pow(2).sum(-1))
        return s.sub_(s.amax(dim=-1, keepdim=True)).mul_(inv_temperature)

    def _sdpa_distance_mask(
        self, inputs: _AttentionInputs, hw: tuple[int, int], dtype: torch.dtype, block_elements: int
    ) -> torch.Tensor:
        """Per-image mask (B, 1, N, N + K): exclusion and trust on the image's positions, distances on the prototypes."""
        tokens, log_trust = inputs.tokens, inputs.log_trust
        b, n, _ = tokens.shape
        m = inputs.keys.shape[1]
        mask = torch.empty(b, 1, n, m, device=tokens.device, dtype=dtype)
        exclusion = self._exclusion_bias(hw[0], hw[1], 0, torch.float32, tokens.device)  # (N, N)
        step = max(1, block_elements // (n * m))
        for b0 in range(0, b, step):
            b1 = min(b, b0 + step)
            mask[b0:b1, 0, :, :n] = exclusion if log_trust is None else exclusion + log_trust[b0:b1, None, :]
            mask[b0:b1, 0, :, n:] = self._prototype_bias(tokens[b0:b1], inputs.prototypes)
        return mask

    def _sdpa(self, inputs: _AttentionInputs, hw: tuple[int, int], block_elements: int) -> torch.Tensor:
        """``scaled_dot_product_attention`` per head, outputs averaged (the same convex combination)."""
        b, n, c = inputs.tokens.shape
        _, m, heads, d = inputs.keys.shape
        dtype, device, scale = inputs.values.dtype, inputs.tokens.device, d**-0.5
        qh, kh = inputs.queries.view(b, n, heads, d), inputs.keys
        if self.distance_attention:
            mask = self._sdpa_distance_mask(inputs, hw, dtype, block_elements)
        else:
            # the per-key trust bias rides in 8 extra query/key dimensions (query 1, key log-trust / scale; 8 keeps
            # the head size a multiple of 8 for the fused kernels): the mask is the exclusion alone, (1, 1, N, N + K)
            if inputs.log_trust is not None:
                q_extra = qh.new_zeros(b, n, heads, 8)
                q_extra[..., 0] = 1.0
                k_extra = kh.new_zeros(b, m, heads, 8)
                k_extra[:, :n, :, 0] = (inputs.log_trust / scale).unsqueeze(-1)
                qh, kh = torch.cat([qh, q_extra], dim=-1), torch.cat([kh, k_extra], dim=-1)
            mask = self._exclusion_bias(hw[0], hw[1], m - n, dtype, device)[None, None]
        qh, kh = qh.to(dtype).transpose(1, 2), kh.to(dtype).transpose(1, 2)
        vh = inputs.values.unsqueeze(1).expand(b, heads, m, c)
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale).mean(dim=1)  # (B, N, C)

    def _chunked_queries_keys(self, inputs: _AttentionInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled queries (B, H, N, d [+ 1]) and transposed keys (B, H, d [+ 1], N + K): the per-key trust bias rides
        in the product as an extra query/key dimension (query 1, key log-trust; 0 for prototypes)."""
        b, n, _ = inputs.tokens.shape
        _, m, heads, d = inputs.keys.shape
        extra = 0 if inputs.log_trust is None else 1
        q = (inputs.queries * d**-0.5).view(b, n, heads, d).transpose(1, 2)
        keys_t = inputs.keys.new_zeros(b, heads, d + extra, m)
        keys_t[:, :, :d] = inputs.keys.permute(0, 2, 3, 1)
        if inputs.log_trust is not None:
            q = torch.cat([q, q.new_ones(b, heads, n, 1)], dim=-1)
            keys_t[:, :, d, :n] = inputs.log_trust.unsqueeze(1)
        return q, keys_t

    def _chunked(self, inputs: _AttentionInputs, hw: tuple[int, int], block_elements: int) -> torch.Tensor:
        """Logits (b', H, Q, N + K) per block of images and queries, float32; the exclusion is a scatter of -inf at
        the (2r+1)^2 neighbours of each query; the 1/H of the head average is applied to the (B, N, C) output."""
        tokens, values = inputs.tokens, inputs.values
        b, n, c = tokens.shape
        _, m, heads, _ = inputs.keys.shape
        q, keys_t = self._chunked_queries_keys(inputs)
        neighbours = self._neighbours(hw[0], hw[1], tokens.device)  # (N, (2r+1)^2)
        per_image = heads * n * m
        if per_image <= block_elements:
            batch_block, query_block = max(1, block_elements // per_image), n
        else:
            batch_block, query_block = 1, max(1, min(n, block_elements // (heads * m)))
        restoration = torch.empty(b, n, c, device=tokens.device, dtype=values.dtype)
        for b0 in range(0, b, batch_block):
            b1 = min(b, b0 + batch_block)
            for q0 in range(0, n, query_block):
                q1 = min(n, q0 + query_block)
                logits = torch.matmul(q[b0:b1, :, q0:q1], keys_t[b0:b1])  # (b', H, Q, N + K), trust bias included
                logits.scatter_(-1, neighbours[q0:q1].expand(b1 - b0, heads, -1, -1), float("-inf"))
                if self.distance_attention:
                    logits[..., n:] += self._prototype_bias(tokens[b0:b1, q0:q1], inputs.prototypes).unsqueeze(1)
                weights = torch.softmax(logits, dim=-1).sum(dim=1)  # (b', Q, N + K): heads summed
                torch.bmm(weights.to(values.dtype), values[b0:b1], out=restoration[b0:b1, q0:q1])
        return restoration.mul_(1.0 / heads)
