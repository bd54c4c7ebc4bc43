"""URA-Net: uncertainty-integrated anomaly perception and restoration attention network."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from ura_monai.networks.blocks.anomaly_map import AnomalyMapGenerator, ImageScorer, feature_residual
from ura_monai.networks.blocks.fasm import CORRUPTIONS, MASK_TYPES, FeatureAnomalySynthesis
from ura_monai.networks.blocks.feature_extractor import PretrainedFeatureExtractor
from ura_monai.networks.blocks.normal_model import PositionalGaussian, cross_fitted_normal_distances
from ura_monai.networks.blocks.restoration import RestorationTransformer
from ura_monai.networks.blocks.uiapm import PerceptionOutput
from ura_monai.networks.nets.ura_net_options import (
    NORMAL_MODEL_SOURCES,
    RAM_NETWORKS,
    RESIDUALS,
    checked_choice,
    checked_map_source,
    checked_score_map,
    perception_module,
    restoration_module,
)

LEVEL_SCALE_KEY = "feature_extractor.level_scale"
# buffers newer than some checkpoints, whose defaults reproduce those checkpoints (no restoration residual signal; the
# image scorer's statistics are read only by score_map='grid_and_position', which such checkpoints do not have)
OPTIONAL_BUFFERS = ("residual_calibration", "residual_weight", "image_scorer.calibration")

__all__ = ["URANet"]

# a fused prior z-score of 3 masks a position half for the restoration transformer (as the perception's logit starts)
RESTORATION_MASK_OFFSET = 3.0


class URANet(nn.Module):
    """URA-Net for unsupervised anomaly detection, following
    `URA-Net: Uncertainty-Integrated Anomaly Perception and Restoration Attention Network for Unsupervised
    Anomaly Detection <https://arxiv.org/abs/2603.22840>`_ (Luo, Xing, Cao, Yao, Shen, Li, 2026).

    Only the paper's abstract is public; ``docs/design.md`` records how each part is read here. Data flow::

        image -> frozen CNN features F -> [FASM, training only] -> F'
              -> discrepancy signals: z(distance to the nearest normal prototype of the RAM's memory),
                 z(Mahalanobis distance to the normal Gaussian at the same position), z = standardized on
                 cross-fitted normal distances; their fusion w * z_mem + (1 - w) * z_pos is the prior map
              -> UIAPM(signals) -> anomaly logit = prior map + learned correction (default map), probability p and
                 uncertainty u from T stochastic passes
              -> RAM(F', p, u) -> restoration R (from normal context and prototypes), restored p*R + (1-p)*F'
                 (``ram_network="transformer"``: a masked-restoration transformer; z(||F' - R||) is a third signal)
                 (other map sources: the residual to R, the restored features, the memory, position or fused map)
              -> upsampled map, refined by the guided filter with the image as guide (edges follow the image's);
                 image score = mean of the grid map's peak and the position distance's peak, each standardized on
                 normal images (``score_map``)

    Args:
        backbone: ``"efficientnet_lite0"`` (offline ImageNet weights) or ``"wide_resnet50_2"`` (torchvision).
        levels: backbone levels used, by stride (see ``PretrainedFeatureExtractor``).
        image_size: square input size (a multiple of 32).
        feature_stride: stride of the common feature grid (8: a 32x32 grid for 256x256 images).
        smooth_kernel: average-pool size applied to each level (neighbourhood aggregation); 1 (default) disables it.
        equalize_levels: scale each level so that its total variance over the normal training features is 1
            (set by ``fit_normal_statistics``), so that no level dominates distances; ``False`` keeps raw features.
        backbone_weights, pretrained: an optional local weights file of the backbone; ``pretrained=False``: none (tests).
        use_fasm, use_uiapm, use_ram: FASM, the perception module and the restoration (ablation switches).
        fasm_mask_types, fasm_corruptions, fasm_area_range, fasm_noise_scale, fasm_probability: FASM options.
        perception_input: what UIAPM reads: ``"signals"`` (default: the standardized memory and position distances
            of each position, the head correcting their fused map; trained by
            :func:`ura_monai.engines.perception.train_perception` on image-level synthetic defects) or
            ``"features"`` (the backbone features, trained with FASM's feature corruptions in the main loop).
        perception_hidden: width of the perception encoder.
        latent_channels: size of the perception module's per-position latent Gaussian.
        num_samples: stochastic passes of the perception module at inference (uncertainty); 0 for none.
        perception_members: signal perception only: heads in its deep ensemble (:class:`PerceptionEnsemble`), each
            trained on its own; their mean logit is the map, their pooled passes the uncertainty. 1: one head.
        num_prototypes: size of the RAM's global normal memory (normal training features).
        memory_coreset: fill the normal memory with a greedy k-center coreset of the normal training features, kept
            fixed (default, as PatchCore's memory: rare normal appearances are kept, and the memory distances at test
            time are those the cross-fitted calibration measured), instead of drawing them at random (the attention
            RAM then trains them with its restoration, the first design).
        embed_dim: RAM width (the transformer's token width; the attention's query/key width).
        num_heads: RAM attention heads.
        exclude_radius: attention RAM only: masks this Chebyshev neighbourhood around each query (no self-copying).
        distance_attention: attention RAM only: adds a learned-temperature feature-distance term to its logits.
        ram_network: the RAM's restoration network: ``"attention"`` (default: :class:`RestorationAttention`, one
            attention layer, a convex combination of normal context and prototypes) or ``"transformer"``
            (:class:`RestorationTransformer`: masked restoration with feed-forward blocks, a decoder, learned normal
            tokens and cross-attention to the normal memory; its residual is the signal perception's third signal;
            docs/benchmarks.md has why it is not the default).
        ram_depth: transformer blocks of the restoration transformer.
        ram_patch_size: feature-grid cells per side of one restoration token.
        num_normal_tokens: learned normal tokens of the restoration transformer.
        ram_mask_ratio: share of patches the restoration transformer masks at random in training.
        residual: ``"l2"`` (Euclidean distance of the concatenated features, as nearest-neighbour detectors use)
            or ``"cosine"`` (``1 - cos`` per level, summed) between input and restored features.
        position_model: fit a position-aware normal model (a Gaussian of the normal features at every grid
            position, :class:`PositionalGaussian`) beside the RAM's position-free prototypes; needed by the
            ``position`` and ``fused`` maps.
        position_dim: channels of the position model's random orthonormal projection.
        fusion_weight: memory weight ``w`` of the fused map, the perception's prior (the position distance gets
            ``1 - w``): 0.5 by default; None: chosen at fit time on synthetic defects in the held-out normal images
            (the first design; on magnetic tiles they chose memory-heavy weights the real defects punish).
        anomaly_map_source: what the map is made of: ``"perception"`` (default with ``perception_input="signals"``:
            the perception module's posterior-mean anomaly logit, which starts as the ``fused`` map and is trained
            to correct it; with features: the anomaly probability), ``"fused"`` (the memory and position distances,
            standardized by their cross-fitted normal statistics and weighted by ``fusion_weight``), ``"memory"``
            (distance to the nearest entry of the RAM's normal memory, the fastest; ``"prototype"`` is its older name),
            ``"position"`` (Mahalanobis distance to the normal Gaussian of the same position), ``"restoration"``
            (residual to the RAM's restoration) or ``"restored"`` (residual to the gated restored features); the
            measurements behind the default: docs/design.md.
        guided_radius: radius in pixels of the guided filter (He et al., ECCV 2010) that refines the upsampled map with
            the input image as guide, so that its edges follow the image's (8: one feature cell); 0: off (before 0.8.0).
        guided_eps: its ridge term, intensities in [0, 1] (edges of contrast well above its square root shape the map).
        sigma: Gaussian smoothing of the map in pixels, after the guided filter; None (default): 0 with the filter, 4
            without it (the map of versions before 0.8.0). The config stores the number used.
        score_mode: image score from the map: ``max``, ``topk_mean``, ``std`` or ``mean``.
        top_k: fraction of the map's values averaged by ``topk_mean``.
        score_map: what the image score reads (:class:`ImageScorer`): ``"grid"`` (the map on the feature grid, before
            upsampling and smoothing, as PatchCore scores patches), ``"pixel"`` (the smoothed map; checkpoints before
            0.6.0) or ``"grid_and_position"`` (the mean of the grid map's peak and the position model's peak, each
            standardized on normal images no normal model saw: set with the thresholds); None (default):
            ``"grid_and_position"`` for the signal perception's map with the position model, else ``"grid"``.
    """

    map_calibration: torch.Tensor  # buffers
    residual_calibration: torch.Tensor

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        levels: Sequence[str] = ("reduction_4", "reduction_8", "reduction_16"),
        image_size: int = 256,
        feature_stride: int = 8,
        smooth_kernel: int = 1,
        equalize_levels: bool = True,
        backbone_weights: str | os.PathLike | None = None,
        pretrained: bool = True,
        use_fasm: bool = True,
        use_uiapm: bool = True,
        use_ram: bool = True,
        fasm_mask_types: Sequence[str] = MASK_TYPES,
        fasm_corruptions: Sequence[str] = CORRUPTIONS,
        fasm_area_range: Sequence[float] = (0.01, 0.2),
        fasm_noise_scale: Sequence[float] = (0.3, 1.5),
        fasm_probability: float = 0.8,
        perception_input: str = "signals",
        perception_hidden: int = 16,
        latent_channels: int = 8,
        num_samples: int = 8,
        perception_members: int = 4,
        num_prototypes: int = 1024,
        memory_coreset: bool = True,
        embed_dim: int = 128,
        num_heads: int = 4,
        exclude_radius: int = 1,
        distance_attention: bool = True,
        ram_network: str = "attention",
        ram_depth: int = 3,
        ram_patch_size: int = 2,
        num_normal_tokens: int = 16,
        ram_mask_ratio: float = 0.25,
        residual: str = "l2",
        position_model: bool = True,
        position_dim: int = 64,
        fusion_weight: float | None = 0.5,
        anomaly_map_source: str = "perception",
        guided_radius: int = 8,
        guided_eps: float = 1e-3,
        sigma: float | None = None,
        score_mode: str = "max",
        top_k: float = 0.01,
        score_map: str | None = None,
    ) -> None:
        super().__init__()
        # everything needed to rebuild the network from a checkpoint
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.config: dict[str, Any] = {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in arguments.items()}
        self.config["backbone_weights"] = None if backbone_weights is None else str(backbone_weights)
        self.anomaly_map_source = checked_map_source(
            anomaly_map_source, use_uiapm, use_ram, position_model, perception_input
        )
        self.perception_input, self.residual = perception_input, checked_choice("residual", residual, RESIDUALS)
        checked_choice("ram_network", ram_network, RAM_NETWORKS)
        self.score_mode, self.top_k = score_mode, top_k
        self.memory_coreset, self.equalize_levels = memory_coreset, equalize_levels
        self.feature_extractor = PretrainedFeatureExtractor(
            backbone, levels, image_size, feature_stride, smooth_kernel, backbone_weights, pretrained
        )
        channels = self.feature_extractor.out_channels
        self.level_channels = self.feature_extractor.level_channels
        fasm_options = (fasm_mask_types, fasm_corruptions, tuple(fasm_area_range), tuple(fasm_noise_scale))
        self.fasm = FeatureAnomalySynthesis(*fasm_options, fasm_probability) if use_fasm else None
        grid = (image_size // feature_stride, image_size // feature_stride)
        signals = 3 if use_ram and ram_network == "transformer" else 2  # the transformer's residual is the third
        self.uiapm = perception_module(self.config, channels, signals) if use_uiapm else None
        self.ram = restoration_module(self.config, channels, grid)
        if self.ram is not None and memory_coreset:  # a coreset memory stays the normal features it was drawn from
            self.ram.prototypes.requires_grad_(False)
        self.position_model = PositionalGaussian(channels, grid, position_dim) if position_model else None
        self._register_calibration_buffers(fusion_weight)
        self.map_generator = AnomalyMapGenerator(sigma, guided_radius, guided_eps)
        self.config["sigma"] = self.map_generator.sigma
        self.image_scorer = ImageScorer(
            checked_score_map(score_map, self.uses_signal_map, position_model), score_mode, top_k
        )
        self.score_map = self.config["score_map"] = self.image_scorer.score_map

    def _register_calibration_buffers(self, fusion_weight: float | None) -> None:
        """The statistics that fit sets and checkpoints keep, at their neutral starts."""
        # mean and std of the memory and position distances on normal features no statistic saw (cross-fitted)
        self.register_buffer("map_calibration", torch.tensor([0.0, 1.0, 0.0, 1.0]))
        # weight of the memory term in the fused map (the position term gets 1 - w); with None, chosen at fit time
        self.register_buffer("fusion_weight", torch.tensor(0.5 if fusion_weight is None else float(fusion_weight)))
        # the residual's mean and std on normal training features, and its share in the perception's prior map
        self.register_buffer("residual_calibration", torch.tensor([0.0, 1.0]))
        self.register_buffer("residual_weight", torch.tensor(0.0))

    # ------------------------------------------------------------------ features -> URA-Net
    def forward_features(
        self,
        features: torch.Tensor,
        synthesize: bool = False,
        num_samples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run FASM (when ``synthesize``), UIAPM and RAM on backbone features.

        Returns a dict with ``clean`` and ``input`` features, the FASM ``mask`` (zeros without synthesis),
        the perception outputs (``logits``, ``probability``, ``uncertainty``, ``latent_mean``, ``latent_logvar``)
        and the restoration outputs (``restoration``, ``restored``) of whichever modules are on.
        """
        out: dict[str, torch.Tensor] = {"clean": features}
        if synthesize and self.fasm is not None:
            corrupted, mask = self.fasm(features, generator=generator)
        else:
            corrupted, mask = features, torch.zeros_like(features[:, :1])
        out["input"], out["mask"] = corrupted, mask
        if self.masks_by_prior:
            # the restoration transformer masks what the normal models' prior flags (no perception needed), and its
            # residual joins the perception's signals
            with torch.no_grad():
                memory, position = self.raw_distances(corrupted)
            restoration = cast(RestorationTransformer, self.ram)(corrupted, self.restoration_mask(memory, position))
            out.update(restoration._asdict())
            if self.has_signal_perception:
                with torch.no_grad():  # trained in its own stage; here for the outputs only (no loss)
                    residual = (corrupted - restoration.restoration).norm(dim=1, keepdim=True)
                    out["perception_logit"], perception = self.perceive_distances(
                        memory, position, num_samples, residual
                    )
                out["probability"], out["uncertainty"] = perception.probability, perception.uncertainty
            return out
        probability = uncertainty = None
        if self.has_signal_perception:
            # trained in its own stage on cross-fitted signals (engines/perception.py); here it only gates the RAM,
            # so it returns no logits for the loss
            with torch.no_grad():
                out["perception_logit"], perception, _ = self.signal_perception(corrupted, num_samples)
            out["probability"], out["uncertainty"] = perception.probability, perception.uncertainty
            probability, uncertainty = perception.probability, perception.uncertainty
        elif self.uiapm is not None:
            perception = self.uiapm(corrupted, num_samples)
            out.update(perception._asdict())
            probability, uncertainty = perception.probability, perception.uncertainty
        if self.ram is not None:
            out.update(self.ram(corrupted, probability, uncertainty)._asdict())
        return out

    def grid_anomaly_map(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Anomaly map on the feature grid (B, 1, h, w), from ``forward_features`` outputs."""
        if self.anomaly_map_source == "perception":
            return outputs["perception_logit"] if self.perception_input == "signals" else outputs["probability"]
        if self.anomaly_map_source in NORMAL_MODEL_SOURCES:
            return self.normal_model_map(outputs["input"])
        restored = outputs[self.anomaly_map_source]
        if self.residual == "l2":
            return (outputs["input"] - restored).norm(dim=1, keepdim=True)
        return feature_residual(outputs["input"], restored, self.level_channels)

    def normal_model_map(self, features: torch.Tensor, source: str | None = None) -> torch.Tensor:
        """Grid map (B, 1, h, w) of a normal-model source (``memory``, ``position`` or ``fused``; default: the
        model's) from backbone features."""
        source = source or self.anomaly_map_source
        if source in ("memory", "prototype"):
            return self.ram.prototype_distance(features)
        if source not in ("position", "fused"):
            raise ValueError(f"'{source}' is not a normal-model map source {NORMAL_MODEL_SOURCES}")
        if self.position_model is None:
            raise ValueError(f"the '{source}' map needs the position model (position_model=True)")
        if source == "position":
            return self.position_model(features)
        return self.fuse(*self.standardized_distances(features))

    def standardized_distances(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory and position distances (B, 1, h, w) each standardized by its cross-fitted normal statistics."""
        if self.position_model is None or self.ram is None:
            raise ValueError("standardized distances need the RAM's memory and the position model")
        return self.standardize(self.ram.prototype_distance(features), self.position_model(features))

    def standardize(self, memory: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory and position distances standardized by their cross-fitted normal statistics (``map_calibration``)."""
        mem_mean, mem_std, pos_mean, pos_std = self.map_calibration.to(memory.dtype)
        return (memory - mem_mean) / mem_std, (position - pos_mean) / pos_std

    def fuse(self, memory: torch.Tensor, position: torch.Tensor, weight: float | None = None) -> torch.Tensor:
        """The fused map from standardized distances: ``w * memory + (1 - w) * position``, ``w = weight`` or, by
        default, the model's ``fusion_weight``."""
        w = self.fusion_weight.to(memory.dtype) if weight is None else weight
        return w * memory + (1.0 - w) * position

    # ------------------------------------------------------------------ the perception of discrepancy signals
    def signals_from_distances(
        self, memory: torch.Tensor, position: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(signals (B, 2 or 3, h, w), prior map (B, 1, h, w))`` from raw memory and position distances (and the
        restoration transformer's ``residual``, the third signal, which a model with that RAM needs): the
        standardized distances (a part the model lacks is zeros and left out of the prior map) and their fusion."""
        z_memory, z_position = self.standardize(memory, position)
        if self.ram is None:
            z_memory, prior = torch.zeros_like(z_position), z_position
        elif self.position_model is None:
            z_position, prior = torch.zeros_like(z_memory), z_memory
        else:
            prior = self.fuse(z_memory, z_position)
        if not self.uses_residual_signal:
            return torch.cat([z_memory, z_position], 1), prior
        if residual is None:
            raise ValueError("the signal perception of a model with the restoration transformer needs its residual")
        res_mean, res_std = self.residual_calibration.to(residual.dtype)
        z_residual = (residual - res_mean) / res_std
        v = self.residual_weight.to(residual.dtype)
        return torch.cat([z_memory, z_position, z_residual], 1), (1.0 - v) * prior + v * z_residual

    def prior_map(self, memory: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The fused map (B, 1, h, w) of raw distances (or the one normal model's standardized distance)."""
        z_memory, z_position = self.standardize(memory, position)
        if self.ram is None:
            return z_position
        return z_memory if self.position_model is None else self.fuse(z_memory, z_position)

    def restoration_mask(self, memory: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """What the restoration transformer masks (B, 1, h, w): ``sigmoid(prior - 3)`` of raw distances."""
        return torch.sigmoid(self.prior_map(memory, position) - RESTORATION_MASK_OFFSET)

    @torch.no_grad()
    def restoration_residual(
        self, features: torch.Tensor, memory: torch.Tensor, position: torch.Tensor, batch_size: int = 32
    ) -> torch.Tensor:
        """L2 residual (B, 1, h, w) of the restoration transformer, masked by the prior of the raw distances."""
        if not isinstance(self.ram, RestorationTransformer):
            raise ValueError("the restoration residual needs the restoration transformer (ram_network='transformer')")
        if torch.jit.is_tracing() or features.shape[0] <= batch_size:  # exported: any batch, no loop in the graph
            restoration = self.ram.restore(features, self.restoration_mask(memory, position))
            return (features - restoration).norm(dim=1, keepdim=True)
        batches = zip(features.split(batch_size), memory.split(batch_size), position.split(batch_size))
        return torch.cat([self.restoration_residual(x, m, p, batch_size) for x, m, p in batches])

    @torch.no_grad()
    def raw_distances(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory and position distances (B, 1, h, w) of ``features``; zeros for a part the model lacks."""
        zeros = torch.zeros_like(features[:, :1])
        memory = zeros if self.ram is None else self.ram.prototype_distance(features)
        position = zeros if self.position_model is None else self.position_model(features)
        return memory, position

    @property
    def has_signal_perception(self) -> bool:
        """Whether UIAPM is on and reads the discrepancy signals (``perception_input="signals"``)."""
        return self.uiapm is not None and self.perception_input == "signals"

    @property
    def masks_by_prior(self) -> bool:
        """Whether the RAM is the restoration transformer masked by the normal models' prior (not the feature perception)."""
        return isinstance(self.ram, RestorationTransformer) and (self.uiapm is None or self.has_signal_perception)

    @property
    def uses_residual_signal(self) -> bool:
        """Whether the signal perception reads the restoration transformer's residual as its third signal."""
        return self.has_signal_perception and isinstance(self.ram, RestorationTransformer)

    @property
    def uses_signal_map(self) -> bool:
        """Whether the anomaly map is the signal perception's logit (the default)."""
        return self.anomaly_map_source == "perception" and self.has_signal_perception

    def perceive_distances(
        self,
        memory: torch.Tensor,
        position: torch.Tensor,
        num_samples: int | None = None,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, PerceptionOutput]:
        """The signal perception of raw memory and position distances (and the restoration ``residual``, see
        :meth:`signals_from_distances`): ``(anomaly logit of the posterior-mean pass (B, 1, h, w), the outputs of
        ``num_samples`` stochastic passes (the same deterministic pass when that is 0))``."""
        if self.uiapm is None:
            raise ValueError("the signal perception needs UIAPM (use_uiapm=True)")
        signals, prior = self.signals_from_distances(memory, position, residual)
        deterministic = self.uiapm(signals, 0, prior)
        t = self.uiapm.num_samples if num_samples is None else num_samples
        passes = self.uiapm(signals, t, prior) if t > 0 else deterministic
        return deterministic.logits[:, 0], passes

    def signal_perception(
        self, features: torch.Tensor, num_samples: int | None = None
    ) -> tuple[torch.Tensor, PerceptionOutput, torch.Tensor]:
        """:meth:`perceive_distances` of the distances of ``features`` to the normal models (and their residual), and
        the raw position distances it read (B, 1, h, w; what ``score_map="grid_and_position"`` also reads)."""
        memory, position = self.raw_distances(features)
        residual = self.restoration_residual(features, memory, position) if self.uses_residual_signal else None
        return (*self.perceive_distances(memory, position, num_samples, residual), position)

    # ------------------------------------------------------------------ images -> maps and scores
    def forward(
        self,
        images: torch.Tensor | None = None,
        num_samples: int | None = None,
        features: torch.Tensor | None = None,
        synthesize: bool = False,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Inference on images; or, given ``features``, the training forward (``forward_features``).

        The training forward goes through ``forward`` so that a ``DistributedDataParallel`` wrapper sees it
        and synchronises gradients.

        Args:
            images: (B, 1 or 3, H, W) intensities in [0, 1].
            num_samples: perception passes for the uncertainty map (default: the configured ``num_samples``;
                0 skips them and returns a zero uncertainty map, the fastest path).
            features: backbone features (B, C, h, w) instead of images: returns ``forward_features`` outputs.
            synthesize, generator: passed to ``forward_features`` with ``features``.

        Returns:
            ``anomaly_map`` (B, 1, H, W), ``uncertainty_map`` (B, 1, H, W; zeros when the perception module did
            not run), ``pred_score`` (B,) and, when the perception module ran, ``perception_map`` (B, 1, H, W),
            the anomaly probability. With the default ``prototype`` map the perception module runs only for
            ``num_samples > 0``: ``num_samples=0`` is the fast path (map and score only).
        """
        if features is not None:
            return self.forward_features(features, synthesize, num_samples, generator)
        if images is None:
            raise ValueError("URANet.forward needs images or features")
        size = images.shape[-2:]
        features = self.feature_extractor(images)
        t = (self.uiapm.num_samples if self.uiapm is not None else 0) if num_samples is None else num_samples
        position = None  # the raw position distances, read by the image score with the signal perception's map
        if self.uses_signal_map:
            # the map needs no attention: the perception of the normal models' signals
            grid_map, perception, position = self.signal_perception(features, t)
            outputs = {"input": features, **(perception._asdict() if t > 0 else {})}
        elif self.anomaly_map_source in NORMAL_MODEL_SOURCES:
            # the map needs no attention; the perception module runs only when its maps are asked for
            outputs = {"input": features}
            if self.uiapm is not None and t > 0:
                passes = (
                    self.signal_perception(features, t)[1] if self.has_signal_perception else self.uiapm(features, t)
                )
                outputs.update(passes._asdict())
            grid_map = self.normal_model_map(features)
        else:
            outputs = self.forward_features(features, synthesize=False, num_samples=num_samples)
            grid_map = self.grid_anomaly_map(outputs)
        anomaly_map = self.map_generator(grid_map, size, guide=images)
        result = {"anomaly_map": anomaly_map, "pred_score": self.score_images(grid_map, anomaly_map, position)}
        if "probability" in outputs:
            up = torch.nn.functional.interpolate
            result["uncertainty_map"] = up(outputs["uncertainty"], size=size, mode="bilinear", align_corners=False)
            result["perception_map"] = up(outputs["probability"], size=size, mode="bilinear", align_corners=False)
        else:
            result["uncertainty_map"] = torch.zeros_like(anomaly_map)
        return result

    def score_images(
        self, grid_map: torch.Tensor, anomaly_map: torch.Tensor, position: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Image scores (B,) from the grid map (B, 1, h, w), its pixel map (B, 1, H, W) and the raw position distances
        (B, 1, h, w; needed by ``score_map="grid_and_position"``), as ``score_map`` says (:class:`ImageScorer`)."""
        return self.image_scorer(grid_map, anomaly_map, position)

    # ------------------------------------------------------------------ checkpoints
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict without the frozen backbone (rebuilt from its weights file on load); the extractor's
        ``level_scale``, a statistic of the training data, is kept."""
        return {
            k: v for k, v in self.state_dict().items() if not k.startswith("feature_extractor.") or k == LEVEL_SCALE_KEY
        }

    def load_trainable_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Load a ``trainable_state_dict`` (non-strict) and return its ``(missing, unexpected)`` keys, where the
        extractor's keys never count as missing: the frozen backbone is rebuilt from its weights file, and
        checkpoints older than the level scale keep its unit default (raw levels, as they were trained)."""
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not k.startswith("feature_extractor.") and k not in OPTIONAL_BUFFERS]
        return missing, list(unexpected)

    @torch.no_grad()
    def fit_normal_statistics(
        self, features: torch.Tensor, generator: torch.Generator | None = None, groups: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Fit what the model takes from normal training features before training: the level scale (when
        ``equalize_levels``), the RAM's prototypes, the position model and the cross-fitted calibration (``groups``:
        see :meth:`cross_fitted_distances`). Returns ``features`` under the fitted scale (the cache to train on)."""
        if self.equalize_levels:
            features = self.feature_extractor.fit_level_scale(features)
        self.init_prototypes(features, generator)
        if self.position_model is not None:
            self.position_model.fit(features)
        if (self.position_model is not None and self.ram is not None) or self.has_signal_perception:
            memory, position = self.cross_fitted_distances(features, generator=generator, groups=groups)
            self.map_calibration.copy_(
                torch.stack([memory.mean(), memory.std(), position.mean(), position.std()])
                .clamp_min(1e-6)
                .to(self.map_calibration)
            )
        return features

    @torch.no_grad()
    def cross_fitted_grid_maps(
        self, features: torch.Tensor, generator: torch.Generator | None = None, groups: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(grid maps, position distances)`` of normal training ``features``, cross-fitted (see
        :meth:`cross_fitted_distances`): what a new normal image would get, for the thresholds and the image scorer. The
        map is the model's normal-model map (``memory``, ``position`` or ``fused``), or the perception of cross-fitted
        signals. None for other map sources or without the position model."""
        source = self.anomaly_map_source
        if not self.uses_signal_map and (
            source not in NORMAL_MODEL_SOURCES or self.position_model is None or self.ram is None
        ):
            return None
        memory, position = self.cross_fitted_distances(features, generator=generator, groups=groups)
        if self.uses_signal_map:
            residual = self.restoration_residual(features, memory, position) if self.uses_residual_signal else None
            return self.perceive_distances(memory, position, 0, residual)[0], position
        if source == "memory":
            return memory, position
        if source == "position":
            return position, position
        return self.fuse(*self.standardize(memory, position)), position

    @torch.no_grad()
    def cross_fitted_distances(
        self,
        features: torch.Tensor,
        folds: int = 4,
        generator: torch.Generator | None = None,
        groups: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory and position distances (each (N, 1, h, w)) a new normal image gets, of normal ``features`` (N, C,
        h, w) split into ``folds`` blocks of images, each scored by normal models fitted on the others
        (:func:`~ura_monai.networks.blocks.normal_model.cross_fitted_normal_distances`; ``groups`` (N,): the image
        of each row, None: one row per image). They calibrate the fused map and the thresholds."""
        return self.cross_fitted_query_distances(features, None, None, folds, generator, groups)[:2]

    @torch.no_grad()
    def cross_fitted_query_distances(
        self,
        features: torch.Tensor,
        queries: torch.Tensor | None,
        query_rows: torch.Tensor | None,
        folds: int = 4,
        generator: torch.Generator | None = None,
        groups: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`cross_fitted_distances` of ``features``, plus those of ``queries`` (M, C, h, w) made from normal
        images (e.g. synthetic defects): query ``j`` is scored by the fold models that did not see row
        ``query_rows[j]`` (its image). Returns ``(memory, position, query memory, query position)``."""
        if self.ram is None and self.position_model is None:
            raise ValueError("cross-fitted distances need the RAM's memory or the position model")
        memory_size = 0 if self.ram is None else self.ram.prototypes.shape[0]
        return cross_fitted_normal_distances(
            features, queries, query_rows, memory_size, self.position_model, folds, generator, self.memory_coreset,
            groups,
        )  # fmt: skip

    @torch.no_grad()
    def init_prototypes(self, features: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Fill the RAM's normal memory from normal training features (no-op without RAM)."""
        if self.ram is not None:
            self.ram.init_prototypes(features, generator, self.memory_coreset)
