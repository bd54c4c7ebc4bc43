"""A tensor-in, tensors-out URA-Net for TorchScript and ONNX export (``monai.bundle ckpt_export`` / ``onnx_export``).

:class:`URANet` returns a dict and draws fresh Gaussian noise for every uncertainty pass, so an exported graph
would neither have a fixed output signature nor give repeatable maps. :class:`URANetExport` wraps a URANet and

- returns a tuple ``(anomaly_map, uncertainty_map, pred_score)`` (or, with ``as_tuple=False``, the two maps
  stacked as one ``(B, 2, H, W)`` tensor, the form ``monai.bundle verify_net_in_out`` checks);
- fixes the uncertainty passes: the number of passes is set at construction and the noise of every pass is
  drawn once, from ``seed``, and stored as buffers, so the exported model and the eager wrapper give the same
  maps for the same image, whatever the batch it comes in (every image of a batch gets the same noise);
- loads the project's checkpoints (:func:`ura_monai.networks.checkpoint.save_checkpoint`) through
  ``load_state_dict``, which is what ``monai.bundle ckpt_export`` / ``onnx_export`` call (through ignite's
  ``Checkpoint.load_objects``) with ``--ckpt_file models/model.pt``; the checkpoint's thresholds are kept as
  buffers (``image_threshold``, ``pixel_threshold``; NaN when absent) and travel with the exported model.

The wrapper runs the network's own forward; only the two noise sources of the perception module
(``torch.randn`` for the latent samples and ``torch.randn_like`` in the Bayesian head) are served from the
stored buffers, through a ``TorchFunctionMode`` active during the wrapper's forward; tracing records those
buffers as constants of the graph. Export by tracing: TorchScript with ``torch.jit.trace``
(``ckpt_export --use_trace True``), ONNX with the ``torch.export``-based exporter (``torch.onnx.export(...,
dynamo=True)``, the default of torch >= 2.9; it needs ``onnxscript``). ``torch.jit.script`` is not supported, nor
is the TorchScript-based ONNX exporter (``dynamo=False``: the Gaussian smoothing's kernel shape is not static
there). The exported graph has the batch size and image size it was traced with (``--input_shape``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ura_monai.networks.nets.ura_net import URANet

__all__ = ["URANetExport", "ARCHITECTURE_KEYS", "check_checkpoint_config"]


# config keys that change the weights' shapes or what the map measures (and so what the thresholds mean); the others
# (num_samples, score_mode, sigma, ...) are inference options that may differ between the checkpoint and a config
ARCHITECTURE_KEYS = (
    "backbone", "levels", "image_size", "feature_stride", "smooth_kernel", "equalize_levels", "use_fasm", "use_uiapm", "use_ram",
    "perception_hidden", "latent_channels", "num_prototypes", "embed_dim", "num_heads", "exclude_radius",
    "distance_attention", "anomaly_map_source", "residual",
)


def check_checkpoint_config(checkpoint_config: Mapping[str, Any], network_config: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Raise ``ValueError`` naming every architecture setting in which a checkpoint and a network differ.

    Args:
        checkpoint_config: the ``config`` stored in a checkpoint.
        network_config: ``URANet.config`` of the network about to receive the weights.
        source: the checkpoint's name (a path), for the message.
    """
    differing = []
    for key in ARCHITECTURE_KEYS:
        if key in checkpoint_config and key in network_config:
            saved, built = checkpoint_config[key], network_config[key]
            if (list(saved) if isinstance(saved, (list, tuple)) else saved) != (list(built) if isinstance(built, (list, tuple)) else built):
                differing.append((key, saved, built))
    if differing:
        detail = "; ".join(f"{k}: checkpoint {s!r}, config {b!r}" for k, s, b in differing)
        hint = " ".join(f"--network_def#{k} {s!r}" if k != "image_size" else f"--image_size {s!r}" for k, s, _ in differing)
        raise ValueError(f"{source} was trained with other network settings than the config ({detail}); pass {hint}")


class _FixedNoise(TorchFunctionMode):
    """Serve ``torch.randn`` / ``torch.randn_like`` calls, in order, from stored per-image noise tensors.

    A request of shape ``(B * n, ...)`` for a stored tensor of shape ``(n, ...)`` gets it repeated ``B`` times
    along the first axis (batch-major, as the perception module lays its passes out).
    """

    def __init__(self, noise: list[torch.Tensor]) -> None:
        super().__init__()
        self.noise = noise
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.randn or func is torch.randn_like:
            if self.calls >= len(self.noise):
                raise RuntimeError(
                    f"the network drew noise {self.calls + 1} times, but URANetExport stored {len(self.noise)} noise "
                    "tensors; rebuild the wrapper after changing the network"
                )
            stored = self.noise[self.calls]
            self.calls += 1
            if func is torch.randn_like:
                # (B * n, ...) from (n, ...), batch-major
                reference = args[0]
                blocks = torch.zeros_like(reference).view(-1, *stored.shape) + stored.to(reference.dtype)
                return blocks.view_as(reference)
            shape = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
            return stored.to(kwargs.get("dtype") or stored.dtype).expand(*[int(s) for s in shape])
        return func(*args, **kwargs)


class _RecordNoise(TorchFunctionMode):
    """Record the per-image shape of every ``torch.randn`` / ``randn_like`` call of a batch-of-one forward."""

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.generator = generator
        self.noise: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.randn or func is torch.randn_like:
            if func is torch.randn_like:
                shape = tuple(args[0].shape)
            else:
                shape = tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else tuple(args)
            sample = torch.randn(shape, generator=self.generator, dtype=torch.float32)
            self.noise.append(sample)
            return sample.to(kwargs.get("device") or "cpu")
        return func(*args, **kwargs)


class URANetExport(nn.Module):
    """URA-Net as a traceable module: images in, ``(anomaly_map, uncertainty_map, pred_score)`` out.

    Args:
        network: the :class:`URANet` to wrap (its weights are loaded through this wrapper's ``load_state_dict``).
        num_samples: uncertainty passes baked into the export; ``None`` takes the network's ``num_samples``,
            0 gives a zero uncertainty map and the deterministic anomaly map of ``URANet(x, num_samples=0)``.
        seed: seed of the stored noise.
        as_tuple: return ``(anomaly_map (B,1,H,W), uncertainty_map (B,1,H,W), pred_score (B,))``; ``False``
            returns ``cat([anomaly_map, uncertainty_map], 1)``, one ``(B, 2, H, W)`` tensor.
        image_size: size of the dry run that records the noise shapes (default the network's ``image_size``);
            the exported model then takes images of this size.

    Example::

        net = URANetExport(URANet(image_size=256), num_samples=8)
        net.load_state_dict(torch.load("models/model.pt", weights_only=True))   # project checkpoint
        anomaly_map, uncertainty_map, score = torch.jit.trace(net, torch.rand(1, 3, 256, 256))(images)
    """

    def __init__(
        self,
        network: URANet,
        num_samples: int | None = None,
        seed: int = 0,
        as_tuple: bool = True,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        network = getattr(network, "module", network)
        if not isinstance(network, URANet):
            raise TypeError(f"URANetExport wraps a URANet, got {type(network).__name__}")
        self.network = network.eval()
        self.num_samples = int(network.config.get("num_samples", 0) if num_samples is None else num_samples)
        if self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {self.num_samples}")
        self.seed = int(seed)
        self.as_tuple = bool(as_tuple)
        self.image_size = int(image_size or network.config["image_size"])
        self.register_buffer("image_threshold", torch.tensor(math.nan))
        self.register_buffer("pixel_threshold", torch.tensor(math.nan))
        self._noise_names: list[str] = []
        self._record_noise()

    # ------------------------------------------------------------------ noise
    def _record_noise(self) -> None:
        """Draw the noise of one image's uncertainty passes (a batch-of-one dry run) and store it as buffers."""
        for name in self._noise_names:
            delattr(self, name)
        self._noise_names = []
        if self.num_samples == 0:
            return
        device = next(self.network.parameters()).device
        recorder = _RecordNoise(torch.Generator().manual_seed(self.seed))
        with torch.no_grad(), recorder:
            self.network(torch.zeros(1, 3, self.image_size, self.image_size, device=device), num_samples=self.num_samples)
        for index, sample in enumerate(recorder.noise):
            name = f"noise_{index}"
            self.register_buffer(name, sample.to(device))
            self._noise_names.append(name)

    def _noise(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self._noise_names]

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | torch.Tensor:
        """
        Args:
            images: (B, 1 or 3, H, W) intensities in [0, 1], at the network's image size.

        Returns:
            ``(anomaly_map, uncertainty_map, pred_score)`` or, with ``as_tuple=False``, the stacked maps.
        """
        if self.num_samples > 0:
            with _FixedNoise(self._noise()):
                out = self.network(images, num_samples=self.num_samples)
        else:
            out = self.network(images, num_samples=0)
        if not self.as_tuple:
            return torch.cat([out["anomaly_map"], out["uncertainty_map"]], dim=1)
        return out["anomaly_map"], out["uncertainty_map"], out["pred_score"]

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load a project checkpoint (``{"format": "ura_monai.uranet/1", "config", "state_dict", ...}``) or a
        state dict of this wrapper.

        A project checkpoint's weights go into the wrapped network (the frozen backbone, not stored, keeps its
        pretrained weights), after checking that its architecture settings match the network's
        (:func:`check_checkpoint_config`); its thresholds go into the ``image_threshold`` / ``pixel_threshold``
        buffers.
        """
        from ura_monai.networks.checkpoint import CHECKPOINT_FORMAT

        if isinstance(state_dict, Mapping) and state_dict.get("format") == CHECKPOINT_FORMAT:
            check_checkpoint_config(state_dict.get("config", {}), self.network.config)
            missing, unexpected = self.network.load_trainable_state_dict(state_dict["state_dict"])
            if strict and (missing or unexpected):
                raise RuntimeError(f"checkpoint does not match the network: missing {missing}, unexpected {unexpected}")
            post = state_dict.get("postprocessing") or {}
            for key in ("image_threshold", "pixel_threshold"):
                value = post.get(key)
                getattr(self, key).fill_(math.nan if value is None else float(value))
            return nn.modules.module._IncompatibleKeys(missing, unexpected)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
