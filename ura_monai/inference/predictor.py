"""Predict anomaly maps and scores with a trained URA-Net checkpoint.

:class:`URANetPredictor` wraps a checkpoint written by :func:`ura_monai.networks.checkpoint.save_checkpoint`:
called on a batch ``(N, C, H, W)`` in [0, 1] of any size, it resizes to the network's size, runs it and resizes
the maps back, returning ``anomaly_map`` / ``uncertainty_map`` ``(N, H, W)`` and ``pred_score`` /
``pred_score_normalized`` / ``pred_label`` ``(N,)``. With its ``image_threshold`` and ``pixel_threshold``
attributes this is the :class:`ura_monai.inference.dicom_inference.SlicePredictor` protocol.

The drivers over inputs take a predictor and live above it: :func:`ura_monai.inference.image_inference.
predict_files` (image files) and :func:`ura_monai.inference.dicom_inference.predict_dicom_folder` (DICOM series);
their writers in :mod:`ura_monai.data.writers` and :mod:`ura_monai.inference.dicom_writers`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ura_monai.networks.checkpoint import load_checkpoint
from ura_monai.transforms.thresholds import normal_postprocessing_stats, normalize_score

__all__ = ["URANetPredictor", "resize_maps"]

logger = logging.getLogger("ura_monai")


def resize_maps(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) to ``size``; anti-aliased when shrinking, as the training preprocessing does."""
    size = (int(size[0]), int(size[1]))
    if tuple(maps.shape[-2:]) == size:
        return maps
    shrinking = maps.shape[-2] > size[0] or maps.shape[-1] > size[1]
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


class URANetPredictor:
    """Inference with a URA-Net checkpoint on batches of images or on image files.

    Args:
        checkpoint: file written by :func:`ura_monai.networks.checkpoint.save_checkpoint` (e.g. ``model.pt``).
        device: ``"cpu"``, ``"cuda"`` or a ``torch.device``.
        num_samples: stochastic perception passes for the uncertainty map; ``None`` keeps the checkpoint's
            setting, 0 skips them (zero uncertainty, fastest). The anomaly map and score do not depend on it.
        batch_size: images per forward pass.
        seed: seed of the uncertainty sampling, forked from the global RNG so that the same inputs give the same
            uncertainty maps; ``None`` draws from the global RNG.
        fast: run the fast inference path (:class:`ura_monai.inference.fast.FastURANet`, the same maps within
            float rounding): ``True`` for its defaults, or a dict of its options, e.g.
            ``{"dtype": "bf16", "channels_last": True}`` on a GPU. Default: the reference path.
        false_alarm_rate: another operating point for the image threshold than the one fit stored: the
            ``1 - false_alarm_rate`` quantile of the normal image scores the checkpoint keeps (``extra
            ["normal_image_scores"]``, written since ura_monai 0.9.1 / bundle 0.9.1; ValueError for an older
            checkpoint). None: the stored threshold.

    Attributes:
        model: the network (eval mode) on ``device``.
        checkpoint: the loaded checkpoint dict.
        image_size: the square size the network runs at.
        image_threshold, image_min, image_max: image score statistics (``None`` when the checkpoint has none).
        false_alarm_rate: the image threshold's operating point (``None`` for checkpoints that do not record it).
        pixel_threshold, pixel_min, pixel_max: anomaly-map statistics (``None`` when the checkpoint has none).

    Example::

        predictor = URANetPredictor("runs/bottle/model.pt")
        out = predictor(torch.rand(2, 3, 300, 400))   # out["anomaly_map"].shape == (2, 300, 400)
        rows = predict_files(["a.png", "b.jpg"], "predictions/", predictor)  # inference.image_inference
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        device: str | torch.device = "cpu",
        num_samples: int | None = None,
        batch_size: int = 8,
        seed: int | None = 0,
        fast: bool | dict[str, Any] = False,
        false_alarm_rate: float | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_samples is not None and num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.device = torch.device(device)
        self.model, self.checkpoint = load_checkpoint(checkpoint, self.device)
        self.checkpoint_path = Path(checkpoint)
        self.num_samples = num_samples
        self.batch_size = int(batch_size)
        self.seed = seed
        self.network: nn.Module = self.model  # the reference URANet, or its fast path (same outputs)
        if fast:
            from ura_monai.inference.fast import FastURANet

            self.network = FastURANet(self.model, **({} if fast is True else dict(fast)))
        size = self.checkpoint.get("extra", {}).get("image_size") or self.model.config["image_size"]
        self.image_size = int(size)
        # the channel count of the training images (None for checkpoints written before it was stored)
        channels = self.checkpoint.get("extra", {}).get("channels")
        self.channels = None if channels is None else int(channels)
        post = self.checkpoint.get("postprocessing") or {}
        self.image_threshold = _optional_float(post.get("image_threshold"))
        self.image_min = _optional_float(post.get("image_min"))
        self.image_max = _optional_float(post.get("image_max"))
        self.pixel_threshold = _optional_float(post.get("pixel_threshold"))
        self.pixel_min = _optional_float(post.get("pixel_min"))
        self.pixel_max = _optional_float(post.get("pixel_max"))
        self.false_alarm_rate = _optional_float(post.get("image_false_alarm_rate"))
        if false_alarm_rate is not None:
            self.set_operating_point(float(false_alarm_rate))

    def threshold_at(self, false_alarm_rate: float) -> dict[str, float]:
        """``image_threshold``, ``image_min``, ``image_max`` at ``false_alarm_rate`` on the normal image scores the
        checkpoint keeps (``normal_postprocessing_stats``); ValueError when it keeps none or the rate is not in (0, 1).
        """
        scores = self.checkpoint.get("extra", {}).get("normal_image_scores")
        if not scores:
            raise ValueError(
                f"{self.checkpoint_path} keeps no normal image scores (it was written before ura_monai 0.9.1), so "
                f"no other operating point can be taken from it: refit with 'ura-monai fit --false-alarm-rate "
                f"{false_alarm_rate}', or use its stored threshold"
            )
        stats = normal_postprocessing_stats(scores, false_alarm_rate=false_alarm_rate)
        return {k: stats[k] for k in ("image_threshold", "image_min", "image_max")}

    def set_operating_point(self, false_alarm_rate: float) -> None:
        """Move the image threshold (and its normalization range) to :meth:`threshold_at` ``false_alarm_rate``."""
        stats = self.threshold_at(false_alarm_rate)
        self.image_threshold, self.image_min, self.image_max = (
            stats["image_threshold"],
            stats["image_min"],
            stats["image_max"],
        )
        self.false_alarm_rate = float(false_alarm_rate)

    # ------------------------------------------------------------------ tensors
    def run_network(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The network on (N, C, S, S) images at its own size; (N, 1, S, S) maps and (N,) scores, on the CPU."""
        outputs: dict[str, list[torch.Tensor]] = {"anomaly_map": [], "uncertainty_map": [], "pred_score": []}
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=self.seed is not None), torch.inference_mode():
            if self.seed is not None:
                torch.manual_seed(self.seed)
            for start in range(0, images.shape[0], self.batch_size):
                batch = images[start : start + self.batch_size].to(self.device, torch.float32)
                out = self.network(batch, num_samples=self.num_samples)
                for key in outputs:
                    outputs[key].append(out[key].float().cpu())
        return {key: torch.cat(values) for key, values in outputs.items()}

    def decisions(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized scores (threshold at 0.5) and boolean labels; NaN / False without thresholds."""
        if self.image_threshold is None:
            return torch.full_like(scores, float("nan")), torch.zeros_like(scores, dtype=torch.bool)
        low = self.image_min if self.image_min is not None else self.image_threshold
        high = self.image_max if self.image_max is not None else self.image_threshold
        return normalize_score(scores, self.image_threshold, low, high), scores >= self.image_threshold

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """
        Args:
            images: (N, C, H, W) with C 1 or 3, intensities in [0, 1], any H and W, any device.

        Returns:
            CPU tensors: ``anomaly_map`` and ``uncertainty_map`` (N, H, W) float32 at the input size,
            ``pred_score`` (N,) raw scores, ``pred_score_normalized`` (N,) in [0, 1] with the image threshold
            at 0.5 (NaN when the checkpoint has no thresholds) and ``pred_label`` (N,) bool
            (``pred_score >= image_threshold``).
        """
        if images.ndim != 4:
            raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
        size = tuple(images.shape[-2:])
        # resize on the CPU in float32: the same operation as the training preprocessing (ResizeAnomaly)
        model_input = resize_maps(images.detach().to("cpu", torch.float32), (self.image_size, self.image_size))
        out = self.run_network(model_input)
        normalized, labels = self.decisions(out["pred_score"])
        return {
            "anomaly_map": resize_maps(out["anomaly_map"], size)[:, 0],
            "uncertainty_map": resize_maps(out["uncertainty_map"], size)[:, 0],
            "pred_score": out["pred_score"],
            "pred_score_normalized": normalized,
            "pred_label": labels,
        }

    def to_model_channels(self, image: torch.Tensor, path: Path) -> torch.Tensor:
        """``image`` (C, H, W) with the channel count the model was trained on, with a warning when it is converted."""
        if self.channels is None or image.shape[0] == self.channels:
            return image
        if self.channels == 3:
            logger.warning("%s is a grey image; the model was trained on RGB images: grey repeated to RGB", path)
            return image.expand(3, -1, -1)
        logger.warning("%s is an RGB image; the model was trained on grey images: converted to grey (luma)", path)
        return torch.tensordot(torch.tensor([0.299, 0.587, 0.114]), image, dims=1)[None]
