"""URA-Net as a tensor-in, tensor-out module: the bundle's ``network_def``, for ``monai.bundle verify_net_in_out``,
``ckpt_export`` and ``onnx_export``.

:class:`URANet` returns a dict and draws fresh Gaussian noise for every uncertainty pass, so an exported graph
would neither have a fixed output signature nor give repeatable maps. :class:`URANetExport` wraps a URANet and

- returns the anomaly and uncertainty maps stacked as one ``(B, 2, H, W)`` tensor (the model zoo's convention:
  ``verify_net_in_out`` checks it against ``network_data_format``) or, with ``as_tuple=True``, the tuple
  ``(anomaly_map, uncertainty_map, pred_score)``;
- fixes the uncertainty passes: the number of passes is set at construction and the noise of every pass is
  drawn once, from ``seed``, and stored as (non-persistent) buffers, so the exported model and the eager wrapper
  give the same maps for the same image, whatever the batch it comes in (every image of a batch gets the same
  noise);
- has the project checkpoint as its ``state_dict`` (:mod:`ura_monai.networks.checkpoint`): ``models/model.pt``
  loads with the zoo's ``ckpt_export network_def --ckpt_file models/model.pt`` (ignite's
  ``Checkpoint.load_objects`` calls ``load_state_dict``); the post-processing statistics are buffers
  (``image_threshold``, ``pixel_threshold``, ...; NaN when absent) and travel with the exported model.

The wrapper runs the network's own forward; only the two noise sources of the perception module
(``torch.randn`` for the latent samples and ``torch.randn_like`` in the Bayesian head) are served from the
stored buffers, through a ``TorchFunctionMode`` active during the wrapper's forward; tracing records those
buffers as constants of the graph. TorchScript: ``torch.jit.trace`` (``ckpt_export --use_trace True``) or
``torch.jit.script`` (``ckpt_export`` without it, as the zoo's CI calls it), which traces the wrapper inside a
scriptable shell (``__prepare_scriptable__``). ONNX: the ``torch.export``-based exporter
(``onnx_export --use_trace True``; ``torch.onnx.export(..., dynamo=True)``, the default of torch >= 2.9; it needs
``onnxscript``); the TorchScript-based ONNX exporter (``dynamo=False``) is not supported (the Gaussian smoothing's
kernel shape is not static there). The exported graph has the batch size and image size it was traced with
(``--input_shape``; batch 1 and the network's image size for ``torch.jit.script``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ura_monai.networks.checkpoint import (
    CHECKPOINT_FORMAT,
    EXTRA_STATE_KEY,
    POSTPROCESSING_KEYS,
    check_checkpoint_config,
    load_into,
    read_checkpoint,
)
from ura_monai.networks.nets.ura_net import URANet
from ura_monai.utils.distributed import unwrap

__all__ = ["URANetExport"]


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
                shape = (
                    tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else tuple(args)
                )
            sample = torch.randn(shape, generator=self.generator, dtype=torch.float32)
            self.noise.append(sample)
            return sample.to(kwargs.get("device") or "cpu")
        return func(*args, **kwargs)


class URANetExport(nn.Module):
    """URA-Net as a tensor-in, tensors-out module: the bundle's ``network_def``.

    Images in; out ``cat([anomaly_map, uncertainty_map], 1)``, one ``(B, 2, H, W)`` tensor (the default, the form
    ``monai.bundle verify_net_in_out`` checks and the metadata documents) or, with ``as_tuple=True``,
    ``(anomaly_map (B,1,H,W), uncertainty_map (B,1,H,W), pred_score (B,))``.

    Its ``state_dict`` is the project checkpoint (:mod:`ura_monai.networks.checkpoint`): the network's weights
    under ``network.``, the post-processing statistics as float64 buffers (``image_threshold``, ... ``pixel_max``;
    NaN when unknown) and the config as extra state. ``load_state_dict`` takes that state dict (with or without
    the frozen backbone's weights) or a first-format checkpoint, and checks the architecture settings.

    Args:
        network: the :class:`URANet` to wrap.
        num_samples: uncertainty passes baked into the export; ``None`` takes the network's ``num_samples``,
            0 gives a zero uncertainty map and the deterministic anomaly map of ``URANet(x, num_samples=0)``.
        seed: seed of the stored noise.
        as_tuple: return the maps and the score as a tuple instead of the stacked maps.
        image_size: size of the dry run that records the noise shapes (default the network's ``image_size``);
            the exported model then takes images of this size.
        input_channels: channels of the example image that ``torch.jit.script`` traces (see
            ``__prepare_scriptable__``).

    Example::

        net = URANetExport(URANet(image_size=256), num_samples=8)
        net.load_state_dict(torch.load("models/model.pt", weights_only=True))
        maps = torch.jit.trace(net, torch.rand(1, 1, 256, 256))(images)   # (B, 2, 256, 256)
    """

    def __init__(
        self,
        network: URANet,
        num_samples: int | None = None,
        seed: int = 0,
        as_tuple: bool = False,
        image_size: int | None = None,
        input_channels: int = 1,
    ) -> None:
        super().__init__()
        inner = unwrap(network)
        if not isinstance(inner, URANet):
            raise TypeError(f"URANetExport wraps a URANet, got {type(inner).__name__}")
        self.network = network = inner.eval()
        self.num_samples = int(network.config.get("num_samples", 0) if num_samples is None else num_samples)
        if self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {self.num_samples}")
        self.seed = int(seed)
        self.as_tuple = bool(as_tuple)
        self.image_size = int(image_size or network.config["image_size"])
        self.input_channels = int(input_channels)
        for key in POSTPROCESSING_KEYS:
            self.register_buffer(key, torch.tensor(math.nan, dtype=torch.float64))
        self.postprocessing_extra: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}
        self._noise_names: list[str] = []
        self._record_noise()

    # ------------------------------------------------------------------ noise
    def _record_noise(self) -> None:
        """Draw the noise of one image's uncertainty passes (a batch-of-one dry run) and store it as buffers
        (not persistent: they are redrawn from ``seed``, so checkpoints do not depend on ``num_samples``)."""
        for name in self._noise_names:
            delattr(self, name)
        self._noise_names = []
        if self.num_samples == 0:
            return
        device = next(self.network.parameters()).device
        recorder = _RecordNoise(torch.Generator().manual_seed(self.seed))
        with torch.no_grad(), recorder:
            self.network(
                torch.zeros(1, 3, self.image_size, self.image_size, device=device), num_samples=self.num_samples
            )
        for index, sample in enumerate(recorder.noise):
            name = f"noise_{index}"
            self.register_buffer(name, sample.to(device), persistent=False)
            self._noise_names.append(name)

    def _noise(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self._noise_names]

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | torch.Tensor:
        """
        Args:
            images: (B, 1 or 3, H, W) intensities in [0, 1], at the network's image size.

        Returns:
            the stacked maps (B, 2, H, W) or, with ``as_tuple=True``, ``(anomaly_map, uncertainty_map, pred_score)``.
        """
        if self.num_samples > 0:
            with _FixedNoise(self._noise()):
                out = self.network(images, num_samples=self.num_samples)
        else:
            out = self.network(images, num_samples=0)
        if not self.as_tuple:
            return torch.cat([out["anomaly_map"], out["uncertainty_map"]], dim=1)
        return out["anomaly_map"], out["uncertainty_map"], out["pred_score"]

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script(wrapper)`` compiles (``monai.bundle ckpt_export`` without ``--use_trace``, as the
        model zoo's CI calls it): URANet's forward is not TorchScript (dict outputs, the noise mode), so the
        wrapper is traced on a ``(1, input_channels, image_size, image_size)`` example and the trace put in a
        scriptable shell, PyTorch's documented mix of tracing and scripting. The result is the traced export
        (batch size 1, this image size), with the post-processing buffers."""
        device = next(self.network.parameters()).device
        example = torch.rand(1, self.input_channels, self.image_size, self.image_size, device=device)
        with torch.no_grad():
            traced = torch.jit.trace(self, example, check_trace=False)
        shell = _ScriptableTuple(traced) if self.as_tuple else _ScriptableMaps(traced)
        for key in POSTPROCESSING_KEYS:
            shell.register_buffer(key, getattr(self, key).clone())
        return shell

    # ------------------------------------------------------------------ checkpoints
    @torch.jit.ignore  # checkpoint I/O stays Python when the wrapper is scripted or traced
    def get_extra_state(self) -> dict[str, Any]:
        """The checkpoint's non-tensor part: format, the network's config, other statistics, extra values."""
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.network.config,
            "postprocessing": dict(self.postprocessing_extra),
            "extra": dict(self.extra),
        }

    @torch.jit.ignore  # checkpoint I/O stays Python when the wrapper is scripted or traced
    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, Mapping) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a URA-Net checkpoint's extra state (expected format {CHECKPOINT_FORMAT})")
        check_checkpoint_config(state.get("config", {}), self.network.config)
        self.postprocessing_extra = dict(state.get("postprocessing") or {})
        self.extra = dict(state.get("extra") or {})

    @torch.jit.ignore  # checkpoint I/O stays Python when the wrapper is scripted or traced
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load a checkpoint (:func:`ura_monai.networks.checkpoint.read_checkpoint` reads both formats).

        Its weights go into the wrapped network after checking that its architecture settings match the
        network's (:func:`~ura_monai.networks.checkpoint.check_checkpoint_config`); the frozen backbone keeps its
        pretrained weights unless the state dict has them; its statistics go into the buffers. ``strict`` and
        ``assign`` apply to state dicts that are no checkpoint (the noise-free wrapper's own keys).
        """
        if isinstance(state_dict, Mapping) and (EXTRA_STATE_KEY in state_dict or "format" in state_dict):
            checkpoint = read_checkpoint(state_dict)
            load_into(self.network, checkpoint)
            post = dict(checkpoint["postprocessing"])
            for key in POSTPROCESSING_KEYS:
                value = post.pop(key, None)
                getattr(self, key).fill_(math.nan if value is None else float(value))
            self.postprocessing_extra, self.extra = post, dict(checkpoint["extra"])
            return nn.modules.module._IncompatibleKeys([], [])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


class _ScriptableMaps(nn.Module):
    """TorchScript shell around the traced :class:`URANetExport` (stacked maps)."""

    def __init__(self, traced: nn.Module) -> None:
        super().__init__()
        self.traced = traced

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.traced(images)


class _ScriptableTuple(nn.Module):
    """TorchScript shell around the traced :class:`URANetExport` (maps and score)."""

    def __init__(self, traced: nn.Module) -> None:
        super().__init__()
        self.traced = traced

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.traced(images)
