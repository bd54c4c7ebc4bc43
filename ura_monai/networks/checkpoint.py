"""URA-Net checkpoints: the network's config, its trainable weights and the post-processing statistics.

The frozen backbone is not stored: it is rebuilt from its weights file (the offline Lite0 package by default),
which keeps checkpoints small. Everything is plain tensors, numbers and strings, so checkpoints load with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ura_monai.utils.fileio import atomic_path
from ura_monai.networks.nets.ura_net import URANet

__all__ = ["save_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "ura_monai.uranet/1"


def save_checkpoint(path: str | os.PathLike, model: URANet, postprocessing: dict[str, float] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (config + trainable state) and post-processing statistics atomically to ``path``."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": model.config,
        "state_dict": {k: v.detach().cpu() for k, v in model.trainable_state_dict().items()},
        "postprocessing": dict(postprocessing or {}),
        "extra": dict(extra or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu", **overrides: Any) -> tuple[URANet, dict[str, Any]]:
    """Rebuild a URA-Net from a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: checkpoint file.
        device: where to put the model.
        overrides: config values to change at load time (inference options such as ``num_samples``,
            ``score_mode`` or ``backbone_weights``; not the architecture).

    Returns:
        ``(model in eval mode, checkpoint dict)``; ``checkpoint["postprocessing"]`` holds thresholds.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a readable URA-Net checkpoint: {err}") from err
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a URA-Net checkpoint (expected format {CHECKPOINT_FORMAT})")
    config = {**checkpoint["config"], **overrides}
    model = URANet(**config)
    missing, unexpected = model.load_trainable_state_dict(checkpoint["state_dict"])
    if missing or unexpected:
        raise ValueError(f"{path} does not match the network: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval(), checkpoint
