"""URA-Net checkpoints: one file that both the project and MONAI's bundle tools read.

A checkpoint (format ``ura_monai.uranet/2``) is the plain ``state_dict`` of the bundle's ``network_def``,
:class:`ura_monai.networks.nets.export.URANetExport` around a :class:`URANet`:

- ``network.<key>``: the network's trainable weights and the feature extractor's ``level_scale`` (the frozen
  backbone is not stored: it is rebuilt from its weights file, which keeps checkpoints small);
- ``image_threshold``, ``image_min``, ``image_max``, ``pixel_threshold``, ``pixel_min``, ``pixel_max``: the
  post-processing statistics as float64 scalars (NaN when absent), buffers of the export wrapper, so exported
  models carry them;
- ``_extra_state``: ``{"format", "config" (URANet's arguments), "postprocessing" (other statistics), "extra"}``,
  the wrapper's ``get_extra_state``.

So ``python -m monai.bundle ckpt_export network_def --ckpt_file models/model.pt`` loads it with the zoo's standard
command, and :func:`load_checkpoint` rebuilds the URANet from it. Everything is plain tensors, numbers and strings:
checkpoints load with ``torch.load(..., weights_only=True)``. :func:`read_checkpoint` is the one reader; it also
reads the first format (``ura_monai.uranet/1``: ``{"format", "config", "state_dict", "postprocessing", "extra"}``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ura_monai.networks.nets.ura_net import URANet
from ura_monai.utils.distributed import unwrap
from ura_monai.utils.fileio import atomic_path

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "checkpoint_state_dict",
    "load_into",
    "check_checkpoint_config",
    "CHECKPOINT_FORMAT",
    "LEGACY_CHECKPOINT_FORMAT",
    "POSTPROCESSING_KEYS",
    "ARCHITECTURE_KEYS",
]

CHECKPOINT_FORMAT = "ura_monai.uranet/2"
LEGACY_CHECKPOINT_FORMAT = "ura_monai.uranet/1"
NETWORK_PREFIX = "network."
EXTRA_STATE_KEY = "_extra_state"
# post-processing statistics stored as tensors (buffers of the export wrapper)
POSTPROCESSING_KEYS = ("image_threshold", "image_min", "image_max", "pixel_threshold", "pixel_min", "pixel_max")

# config keys that change the weights' shapes or what the map or score measures (so what the thresholds mean); the others
# (num_samples, score_mode, sigma, ...) are inference options that may differ between the checkpoint and a config
ARCHITECTURE_KEYS = (
    "backbone", "levels", "image_size", "feature_stride", "smooth_kernel", "equalize_levels", "use_fasm", "use_uiapm",
    "use_ram", "perception_hidden", "latent_channels", "num_prototypes", "embed_dim", "num_heads", "exclude_radius",
    "distance_attention", "anomaly_map_source", "residual", "position_model", "position_dim", "perception_input",
    "ram_network", "ram_depth", "ram_patch_size", "num_normal_tokens", "score_map", "perception_members",
)  # fmt: skip


def check_checkpoint_config(
    checkpoint_config: Mapping[str, Any], network_config: Mapping[str, Any], source: str = "checkpoint"
) -> None:
    """Raise ``ValueError`` naming every architecture setting in which a checkpoint and a network differ.

    Args:
        checkpoint_config: the ``config`` stored in a checkpoint.
        network_config: ``URANet.config`` of the network about to receive the weights.
        source: the checkpoint's name (a path), for the message.
    """

    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, (list, tuple)) else value

    differing = [
        (key, checkpoint_config[key], network_config[key])
        for key in ARCHITECTURE_KEYS
        if key in checkpoint_config and key in network_config
        and plain(checkpoint_config[key]) != plain(network_config[key])
    ]  # fmt: skip
    if differing:
        detail = "; ".join(f"{k}: checkpoint {s!r}, config {b!r}" for k, s, b in differing)
        hint = " ".join(
            f"--network_def#{k} {s!r}" if k != "image_size" else f"--image_size {s!r}" for k, s, _ in differing
        )
        raise ValueError(f"{source} was trained with other network settings than the config ({detail}); pass {hint}")


def checkpoint_state_dict(
    model: torch.nn.Module, postprocessing: Mapping[str, float] | None = None, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The checkpoint of ``model`` (a URANet, DDP-wrapped or not): the state dict ``URANetExport`` loads."""
    model = unwrap(model)
    post = dict(postprocessing or {})
    state: dict[str, Any] = {NETWORK_PREFIX + k: v.detach().cpu() for k, v in model.trainable_state_dict().items()}
    for key in POSTPROCESSING_KEYS:
        value = post.pop(key, None)
        state[key] = torch.tensor(math.nan if value is None else float(value), dtype=torch.float64)
    state[EXTRA_STATE_KEY] = {
        "format": CHECKPOINT_FORMAT,
        "config": model.config,
        "postprocessing": post,
        "extra": dict(extra or {}),
    }
    return state


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    postprocessing: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (config + trainable state) and post-processing statistics atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(checkpoint_state_dict(model, postprocessing, extra), tmp)
    return path


def _from_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    meta = state[EXTRA_STATE_KEY]
    post = dict(meta.get("postprocessing") or {})
    for key in POSTPROCESSING_KEYS:
        if key in state and not math.isnan(float(state[key])):
            post[key] = float(state[key])
    return {
        "format": CHECKPOINT_FORMAT,
        "config": dict(meta["config"]),
        "state_dict": {k[len(NETWORK_PREFIX) :]: v for k, v in state.items() if k.startswith(NETWORK_PREFIX)},
        "postprocessing": post,
        "extra": dict(meta.get("extra") or {}),
    }


def _upgrade_config(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Settings added since a checkpoint was written take the value that reproduces it: a config without
    ``position_model`` was trained without the position model, one without ``perception_input`` with the
    perception module on features, one without ``ram_network`` with the restoration attention, one without
    ``score_map`` scored images on the smoothed pixel map (its stored image threshold is on that scale), one without
    ``memory_coreset`` drew its normal memory at random (and so do the cross-fitted memories of its thresholds), one
    without ``fusion_weight`` chose it on synthetic defects (the chosen value is its stored buffer), one without
    ``perception_members`` had one perception head."""
    defaults = {
        "position_model": False,
        "perception_input": "features",
        "ram_network": "attention",
        "score_map": "pixel",
        "memory_coreset": False,
        "fusion_weight": None,
        "perception_members": 1,
        "guided_radius": 0,
        "sigma": 4.0,
    }
    checkpoint["config"] = {**defaults, **checkpoint["config"]}
    return checkpoint


def read_checkpoint(checkpoint: str | os.PathLike | Mapping[str, Any], map_location: Any = "cpu") -> dict[str, Any]:
    """Read a URA-Net checkpoint of either format: the one reader every loader calls.

    Args:
        checkpoint: a checkpoint file (loaded with ``weights_only=True``) or its already-loaded contents.
        map_location: where the tensors of a file are loaded.

    Returns:
        ``{"format", "config", "state_dict" (URANet keys: trainable weights and level scale), "postprocessing"
        (thresholds and normalization statistics, floats), "extra"}``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is unreadable or not a URA-Net checkpoint (one line naming it).
    """
    source = "checkpoint"
    if not isinstance(checkpoint, Mapping):
        path = Path(checkpoint)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:
            raise ValueError(f"{path} is not a readable URA-Net checkpoint: {err}") from err
    if isinstance(checkpoint, Mapping):
        meta = checkpoint.get(EXTRA_STATE_KEY)
        if isinstance(meta, Mapping) and meta.get("format") == CHECKPOINT_FORMAT:
            return _upgrade_config(_from_state_dict(checkpoint))
        if checkpoint.get("format") == LEGACY_CHECKPOINT_FORMAT:
            return _upgrade_config(
                {
                    "format": LEGACY_CHECKPOINT_FORMAT,
                    "config": dict(checkpoint["config"]),
                    "state_dict": dict(checkpoint["state_dict"]),
                    "postprocessing": dict(checkpoint.get("postprocessing") or {}),
                    "extra": dict(checkpoint.get("extra") or {}),
                }
            )
    raise ValueError(
        f"{source} is not a URA-Net checkpoint (expected format {CHECKPOINT_FORMAT} or {LEGACY_CHECKPOINT_FORMAT})"
    )


def load_into(network: torch.nn.Module, checkpoint: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Load a :func:`read_checkpoint` result into ``network`` (a URANet, DDP-wrapped or not), after checking that
    its architecture settings match (:func:`check_checkpoint_config`); the frozen backbone keeps its weights."""
    model: Any = unwrap(network)
    check_checkpoint_config(checkpoint["config"], model.config, source)
    missing, unexpected = model.load_trainable_state_dict(checkpoint["state_dict"])
    if missing or unexpected:
        raise ValueError(f"{source} does not match the network: missing {missing}, unexpected {unexpected}")


def load_checkpoint(
    path: str | os.PathLike, device: torch.device | str = "cpu", **overrides: Any
) -> tuple[URANet, dict[str, Any]]:
    """Rebuild a URA-Net from a checkpoint written by :func:`save_checkpoint` (or the first format).

    Args:
        path: checkpoint file.
        device: where to put the model.
        overrides: config values to change at load time (inference options such as ``num_samples``,
            ``score_mode`` or ``backbone_weights``; not the architecture).

    Returns:
        ``(model in eval mode, read_checkpoint(path))``; ``checkpoint["postprocessing"]`` holds thresholds.
    """
    checkpoint = read_checkpoint(path)
    config = {**checkpoint["config"], **overrides}
    model = URANet(**config)
    # what the caller changes on purpose (e.g. another anomaly_map_source) is not a mismatch, nor what follows from it
    # (another map is scored on the grid: checked_score_map)
    if config.get("score_map") == "grid_and_position":
        config["score_map"] = model.score_map
    load_into(model, {**checkpoint, "config": config}, str(path))
    return model.to(device).eval(), checkpoint
