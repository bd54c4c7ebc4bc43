"""Ignite handlers that write and read the project's URA-Net checkpoints from MONAI workflows (bundle configs).

The checkpoint format is :func:`ura_monai.networks.checkpoint.save_checkpoint`'s: the state dict of the bundle's
``network_def`` (the network's trainable weights, the post-processing statistics as buffers, its config as extra
state), so a bundle's ``models/model.pt`` loads with the zoo's ``ckpt_export network_def``, ``ura-monai predict``,
:class:`ura_monai.inference.predictor.URANetPredictor` and ``load_checkpoint``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from ura_monai.engines.evaluation import compute_thresholds, normal_scores_and_maps
from ura_monai.networks.checkpoint import load_into, read_checkpoint, save_checkpoint
from ura_monai.transforms.thresholds import DEFAULT_FALSE_ALARM_RATE, normal_postprocessing_stats, stored_normal_scores
from ura_monai.utils.distributed import is_rank0, unwrap

__all__ = ["URANetCheckpointSaver", "URANetCheckpointLoader", "compute_thresholds"]

logger = logging.getLogger("ura_monai")


class URANetCheckpointSaver:
    """Save URA-Net checkpoints with thresholds: the last one when training completes and, with a validator, the
    best one whenever the validator's key metric improves.

    Only rank 0 writes (in distributed training the other ranks skip). Thresholds come from ``threshold_data``,
    normal images held out from training (see :func:`ura_monai.bundle.training_splits`), through
    :func:`normal_scores_and_maps` and ``normal_postprocessing_stats``. The checkpoint's ``extra`` records ``extra``
    plus those normal images' scores (``normal_image_scores``, for other operating points at inference), the epoch,
    the key metric and the time it was written.

    Args:
        save_dir: folder of the checkpoints (created when missing), e.g. ``<bundle_root>/models``.
        network: the URANet being trained (a DDP wrapper is unwrapped).
        threshold_data: datalist of held-out normal images.
        image_size: the network's input size (the transforms' resize).
        channels: how images are loaded (None as stored, 1 grey, 3 RGB).
        batch_size, device, num_workers, amp: of the threshold pass.
        validator: the validation evaluator; None writes the final checkpoint only.
        final_filename: file name of the checkpoint written when training completes (``model.pt``).
        best_filename: file name of the best-validation checkpoint (``model_best.pt``); None: not written.
        extra: values recorded in the checkpoint's ``extra`` (dataset, preset, seed, ...).
        false_alarm_rate: the image threshold's operating point, the fraction of normal images above it (None: 0.01,
            ``DEFAULT_FALSE_ALARM_RATE``).
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        network: torch.nn.Module,
        threshold_data: Sequence[dict[str, Any]],
        image_size: int,
        channels: int | None = None,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        num_workers: int = 0,
        amp: bool = False,
        validator: Engine | None = None,
        final_filename: str = "model.pt",
        best_filename: str | None = "model_best.pt",
        extra: Mapping[str, Any] | None = None,
        false_alarm_rate: float | None = None,
    ) -> None:
        if not threshold_data:
            raise ValueError("URANetCheckpointSaver needs held-out normal images (threshold_data) to set thresholds")
        self.save_dir = Path(save_dir)
        self.network = network
        self.threshold_data = list(threshold_data)
        self.image_size = int(image_size)
        self.channels = channels
        self.batch_size = int(batch_size)
        self.device = device
        self.num_workers = int(num_workers)
        self.amp = bool(amp)
        self.validator = validator
        self.final_filename = final_filename
        self.best_filename = best_filename
        self.extra = dict(extra or {})
        self.false_alarm_rate = DEFAULT_FALSE_ALARM_RATE if false_alarm_rate is None else float(false_alarm_rate)
        self.trainer: Engine | None = None

    def attach(self, engine: Engine) -> None:
        """Attach to the trainer (and, for the best checkpoint, to the validator)."""
        self.trainer = engine
        engine.add_event_handler(Events.COMPLETED, self.save_final)
        if self.validator is not None and self.best_filename:
            # after the validator's own EPOCH_COMPLETED handlers, which include MONAI's best-metric bookkeeping
            self.validator.add_event_handler(Events.EPOCH_COMPLETED, self.save_best)

    def _save(self, filename: str, info: Mapping[str, Any]) -> Path | None:
        if not is_rank0():
            return None
        scores, maps = normal_scores_and_maps(
            self.network,
            self.threshold_data,
            self.image_size,
            channels=self.channels,
            batch_size=self.batch_size,
            device=self.device,
            num_workers=self.num_workers,
            amp=self.amp,
        )
        stats = normal_postprocessing_stats(scores, maps, false_alarm_rate=self.false_alarm_rate)
        extra = {
            **self.extra,
            "normal_image_scores": stored_normal_scores(scores),
            "image_size": self.image_size,
            "threshold_images": len(self.threshold_data),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **info,
        }
        path = save_checkpoint(self.save_dir / filename, unwrap(self.network), stats, extra)
        logger.info("wrote %s (%s)", path, ", ".join(f"{k}={v}" for k, v in info.items()))
        return path

    def save_final(self, engine: Engine) -> Path | None:
        """Write ``final_filename`` (called when training completes, also after early stopping)."""
        return self._save(
            self.final_filename, {"epoch": int(engine.state.epoch), "max_epochs": int(engine.state.max_epochs or 0)}
        )

    def save_best(self, validator: Engine) -> Path | None:
        """Write ``best_filename`` when this validation set a new best key metric."""
        state = validator.state
        if not self.best_filename or state.key_metric_name is None or state.best_metric_epoch != state.epoch:
            return None
        epoch = int(self.trainer.state.epoch) if self.trainer is not None else int(state.epoch)
        return self._save(
            self.best_filename,
            {"epoch": epoch, "key_metric": state.key_metric_name, "key_metric_value": float(state.best_metric)},
        )


class URANetCheckpointLoader:
    """Load a project checkpoint into a workflow's URANet when the workflow starts (MONAI's ``CheckpointLoader``
    reads ignite checkpoints, not this format).

    The checkpoint's architecture settings must match the network's (:func:`check_checkpoint_config`: the error
    names the settings and the command-line overrides that fix them); the frozen backbone, which the checkpoint
    does not store, keeps its pretrained weights. The checkpoint's thresholds are put in
    ``engine.state.postprocessing``.

    Args:
        load_path: the checkpoint (``models/model.pt``).
        network: the URANet (a DDP wrapper is unwrapped).
        map_location: where tensors are loaded before being copied into the network.
    """

    def __init__(
        self, load_path: str | os.PathLike, network: torch.nn.Module, map_location: str | torch.device = "cpu"
    ) -> None:
        self.load_path = Path(load_path)
        self.network = network
        self.map_location = map_location
        self.postprocessing: dict[str, float] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def load(self) -> dict[str, Any]:
        """Load the weights now; returns the checkpoint (:func:`~ura_monai.networks.checkpoint.read_checkpoint`)."""
        checkpoint = read_checkpoint(self.load_path, self.map_location)
        load_into(self.network, checkpoint, str(self.load_path))
        self.postprocessing = dict(checkpoint["postprocessing"])
        logger.info("loaded %s", self.load_path)
        return checkpoint

    def __call__(self, engine: Engine) -> None:
        self.load()
        engine.state.postprocessing = self.postprocessing
