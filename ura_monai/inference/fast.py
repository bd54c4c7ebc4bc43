"""Fast URA-Net inference: the maps and scores of ``URANet.forward``, with less work.

:class:`FastURANet` wraps a trained :class:`~ura_monai.networks.nets.ura_net.URANet` (it shares its weights,
copies nothing) and returns what ``URANet.forward`` returns, the same maps to within float rounding
(``tests/test_fast_path.py`` checks 1e-3 absolute in fp32; the differences are ~1e-6 relative), but:

- it runs under ``torch.inference_mode`` and never leaves the device: no host syncs, no per-image loops;
- the perception module's stochastic passes run only when asked for (``num_samples > 0``), in its own batched
  call (same random draws, in the same order, as the reference path); the normal-model maps (``memory``, ``position``, ``fused``) need no perception
  at all and no attention (the module's own chunked nearest-prototype distance, kept in float32 under autocast);
- the restoration attention (RAM) computes only what the map needs (the restoration; the perception-gated
  ``restored`` features only when the map is made from them), with one of the module's own inference attention
  modes (:meth:`~ura_monai.networks.blocks.ram.RestorationAttention.restore_tokens`): ``attention="chunked"``
  (blocks of queries whose logits stay in cache) or ``"sdpa"`` (``scaled_dot_product_attention``, the GPU
  default: fused kernels, no logits in memory);
- the residual (L2 or ``1 - cos``) is taken in the attention's token layout, without transposes;
- upsampling + Gaussian smoothing is one linear map per axis, ``A_y @ grid @ A_x^T``, whose matrices are built
  once per size from the reference operations themselves (bilinear upsampling, reflect padding, the separable
  Gaussian): the same operator as two small matrix products on the device;
- options: autocast (``dtype="bf16"`` or ``"fp16"``; attention logits and softmax of the chunked path, residual,
  map and score stay float32), ``channels_last`` for the backbone, ``torch.compile`` and CUDA-graph replay
  (``cuda_graph=True``: one graph per input shape; removes the launch overhead that dominates batch-1 latency).

Example::

    fast = FastURANet(model, dtype="bf16", channels_last=True)   # model on the GPU
    out = fast(images)            # {"anomaly_map": (B, 1, H, W), "pred_score": (B,), "uncertainty_map": ...}
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from monai.networks.layers import separable_filtering
from torch import nn

from ura_monai.networks.blocks.anomaly_map import AnomalyMapGenerator
from ura_monai.networks.blocks.ram import RestorationAttention, default_block_elements
from ura_monai.networks.nets.ura_net import URANet
from ura_monai.networks.nets.ura_net_options import NORMAL_MODEL_SOURCES
from ura_monai.utils.enums import AttentionMode

__all__ = [
    "FastURANet",
    "StageTimer",
    "ATTENTION_MODES",
    "fast_restoration",
    "smoothing_matrix",
    "token_residual",
    "DTYPES",
]

ATTENTION_MODES = AttentionMode.choices()
DTYPES = {
    "fp32": None,
    "float32": None,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def _as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return None if dtype == torch.float32 else dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


class StageTimer:
    """Times named stages: wall clock on the CPU, CUDA events on the GPU (stream order, no syncs in between).

    ``span(name)`` is a context manager (also a ``torch.profiler`` range); ``start(name)`` / ``stop(name)`` do the
    same from hooks. ``totals_ms()`` syncs and returns milliseconds per name, summed over repeats.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._open: dict[str, tuple[Any, Any]] = {}
        self._done: list[tuple[str, Any, Any]] = []

    def _mark(self) -> Any:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self, name: str) -> None:
        rf = torch.profiler.record_function(name)
        rf.__enter__()
        self._open[name] = (self._mark(), rf)

    def stop(self, name: str) -> None:
        begin, rf = self._open.pop(name)
        rf.__exit__(None, None, None)
        self._done.append((name, begin, self._mark()))

    @contextlib.contextmanager
    def span(self, name: str):
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def totals_ms(self) -> dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        totals: dict[str, float] = {}
        for name, begin, end in self._done:
            ms = begin.elapsed_time(end) if self.device.type == "cuda" else (end - begin) * 1000.0
            totals[name] = totals.get(name, 0.0) + ms
        return totals

    def reset(self) -> None:
        self._open.clear()
        self._done.clear()


# --------------------------------------------------------------------------------------------- smoothing
def smoothing_matrix(
    grid: int, size: int, generator: AnomalyMapGenerator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(size, grid) matrix of one axis of ``generator``: bilinear upsampling from ``grid`` to ``size`` samples
    (``align_corners=False``), then the reflect-padded Gaussian (when ``sigma > 0``).

    Both operations are linear and act on each axis separately, so the 2D map is ``A_y @ grid_map @ A_x^T``.
    The matrix is made by applying the reference operations (``F.interpolate``, MONAI's ``separable_filtering``
    with the generator's own kernel) to the unit vectors, in float64.
    """
    eye = torch.eye(grid, dtype=torch.float64).unsqueeze(1)  # (grid, 1, grid): one unit signal per row
    up = F.interpolate(eye, size=size, mode="linear", align_corners=False)  # (grid, 1, size)
    if generator.sigma > 0:
        kernel = generator.kernel.to(torch.float64).cpu()
        up = separable_filtering(up, [kernel], mode="reflect")
    return up[:, 0].t().contiguous().to(device=device, dtype=torch.float32)


def token_residual(
    features: torch.Tensor, restored: torch.Tensor, level_channels: Sequence[int], eps: float = 1e-6
) -> torch.Tensor:
    """``feature_residual`` on token layout (B, N, C): sum over levels of ``1 - cos``, returns (B, N) float32.

    Same formula as ``torch.nn.functional.cosine_similarity``: each vector divided by ``max(norm, eps)``.
    """
    residual = None
    for f, r in zip(features.split(list(level_channels), dim=-1), restored.split(list(level_channels), dim=-1)):
        f, r = f.float(), r.float()
        cos = (f * r).sum(-1) / (
            torch.linalg.vector_norm(f, dim=-1).clamp_min(eps) * torch.linalg.vector_norm(r, dim=-1).clamp_min(eps)
        )
        residual = 1.0 - cos if residual is None else residual + (1.0 - cos)
    if residual is None:
        raise ValueError("token_residual needs at least one level (level_channels is empty)")
    return residual


# --------------------------------------------------------------------------------------------- attention
def fast_restoration(
    ram: RestorationAttention,
    tokens: torch.Tensor,
    hw: tuple[int, int],
    probability: torch.Tensor | None = None,
    uncertainty: torch.Tensor | None = None,
    attention: str = "chunked",
    compute_dtype: torch.dtype | None = None,
    block_elements: int | None = None,
) -> torch.Tensor:
    """The RAM's ``restoration`` for token features (B, N, C), as (B, N, C), with one of the module's inference
    attention modes: :meth:`RestorationAttention.restore_tokens` (see there for the arguments).

    ``attention``: ``"chunked"`` (blocks of queries, weights averaged over heads before the value product, as the
    module does) or ``"sdpa"`` (``scaled_dot_product_attention`` per head, outputs averaged: the same convex
    combination, fused kernels).
    """
    if attention not in ATTENTION_MODES[1:]:
        raise ValueError(f"unknown attention '{attention}'; choose one of {ATTENTION_MODES[1:]}")
    return ram.restore_tokens(tokens, hw, probability, uncertainty, attention, compute_dtype, block_elements)


# --------------------------------------------------------------------------------------------- the module
class FastURANet(nn.Module):
    """Fast inference path of a ``URANet``; returns what ``URANet.forward`` returns (maps in float32).

    Args:
        model: the trained ``URANet`` (shared, not copied; ``channels_last`` changes its backbone's memory format).
        dtype: ``None``/``"fp32"`` (no autocast), ``"bf16"`` or ``"fp16"`` (autocast on the input's device).
        channels_last: run the backbone in channels-last memory format (faster convolutions on GPUs and oneDNN).
        attention: ``"auto"`` (``sdpa`` on CUDA, ``chunked`` elsewhere), ``"chunked"`` or ``"sdpa"``.
        block_elements: logits elements per block of the chunked attention (see :func:`fast_restoration`).
        compile: ``torch.compile`` the whole path (``compile_mode`` is passed on, e.g. ``"max-autotune"``).
        cuda_graph: on CUDA, capture one CUDA graph per input shape and replay it (inputs are copied into a
            static buffer; outputs are cloned). Not with ``compile``.
    """

    def __init__(
        self,
        model: nn.Module,
        dtype: str | torch.dtype | None = None,
        channels_last: bool = False,
        attention: str = "auto",
        block_elements: int | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
        cuda_graph: bool = False,
    ) -> None:
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got '{attention}'")
        if compile and cuda_graph:
            raise ValueError("use either compile (mode='reduce-overhead' captures graphs itself) or cuda_graph")
        self.model = cast(URANet, getattr(model, "module", model))
        self.dtype = _as_dtype(dtype)
        self.channels_last = channels_last
        self.attention = attention
        self.block_elements = block_elements
        self.cuda_graph = cuda_graph
        self.stage_timer: StageTimer | None = None  # times the stages (bench/throughput.py --profile)
        self._matrices: dict[tuple, torch.Tensor] = {}
        self._graphs: dict[tuple, tuple[Any, torch.Tensor, dict[str, torch.Tensor]]] = {}
        if channels_last:
            # Module.to takes memory_format at run time; torch's stubs do not list it
            self.model.feature_extractor.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self._impl = (
            torch.compile(self._forward_impl, mode=compile_mode, dynamic=False) if compile else self._forward_impl
        )

    # ------------------------------------------------------------------ pieces
    def _axis_matrix(self, grid: int, size: int, device: torch.device) -> torch.Tensor:
        key = (grid, size, str(device))
        if key not in self._matrices:
            self._matrices[key] = smoothing_matrix(grid, size, self.model.map_generator, device)
        return self._matrices[key]

    def _stage(self, name: str):
        return contextlib.nullcontext() if self.stage_timer is None else self.stage_timer.span(name)

    def _autocast(self, device: torch.device):
        # no cast cache under CUDA-graph capture: cached casts made during capture would be freed at its end
        return torch.autocast(
            device.type, dtype=self.dtype, enabled=self.dtype is not None, cache_enabled=not self.cuda_graph
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features (B, C, h, w), under the path's autocast and memory format."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self._autocast(images.device):
            return self.model.feature_extractor(images)

    def _attention_mode(self, device: torch.device) -> str:
        if self.attention != "auto":
            return self.attention
        return "sdpa" if device.type == "cuda" else "chunked"

    def _perception(
        self, features: torch.Tensor, source: str, t: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(signal perception logit, probability, uncertainty, raw position distances)`` as the reference forward
        computes them (None where it does not): the normal-model maps need no perception, which then runs only for
        uncertainty passes; the signal perception's map is its posterior-mean logit, and its position distances are
        what the image score reads beside it."""
        model = self.model
        if model.uiapm is None:
            return None, None, None, None
        run_perception = source not in NORMAL_MODEL_SOURCES or t > 0
        if model.has_signal_perception and (run_perception or source == "perception"):
            with self._stage("uiapm"), torch.autocast(features.device.type, enabled=False):
                # the signals are distances: float32, as the normal-model maps
                logit, perception, position = model.signal_perception(features.float(), t)
            without_passes = t <= 0 and (source == "perception" or source in NORMAL_MODEL_SOURCES)
            probability = None if without_passes else perception.probability.float()  # RAM maps gate with it
            return logit, probability, perception.uncertainty.float() if t > 1 else None, position
        if not run_perception:
            return None, None, None, None
        with self._stage("uiapm"):
            perception = model.uiapm(features, t)
        # with one pass or none the module returns zero uncertainty: no need to keep or upsample it
        return None, perception.probability.float(), perception.uncertainty.float() if t > 1 else None, None

    def _forward_impl(self, images: torch.Tensor, num_samples: int | None) -> dict[str, torch.Tensor]:
        model = self.model
        size = tuple(images.shape[-2:])
        source = model.anomaly_map_source
        t = (model.uiapm.num_samples if model.uiapm is not None else 0) if num_samples is None else num_samples
        with self._stage("features"):
            features = self.features(images)
        b, c, h, w = features.shape
        with self._autocast(images.device):
            signal_logit, probability, uncertainty, position = self._perception(features, source, t)
            if source == "perception":
                grid = probability if signal_logit is None else signal_logit
            elif source in NORMAL_MODEL_SOURCES:
                with self._stage("normal_model_distance"), torch.autocast(images.device.type, enabled=False):
                    # the module's own chunked computation, in float32 (|x|^2 + |p|^2 - 2 x.p cancels badly in bf16)
                    block = self.block_elements or default_block_elements(images.device)
                    features = features.float()
                    if source == "memory":
                        grid = model.ram.prototype_distance(
                            features, chunk=max(1, block // model.ram.prototypes.shape[0])
                        )
                    else:
                        grid = model.normal_model_map(features)
            elif not isinstance(model.ram, RestorationAttention):
                # the restoration transformer's maps: its own forward (it has no separate inference kernels)
                with self._stage("ram_transformer"), torch.autocast(images.device.type, enabled=False):
                    grid = model.grid_anomaly_map(model.forward_features(features.float(), num_samples=t))
            else:
                tokens = features.flatten(2).transpose(1, 2)  # (B, N, C); contiguous when channels_last
                with self._stage("ram_attention"):
                    restoration = model.ram.restore_tokens(
                        tokens,
                        (h, w),
                        probability,
                        uncertainty,
                        self._attention_mode(images.device),
                        self.dtype,
                        self.block_elements,
                    )
                with self._stage("residual"):
                    if model.anomaly_map_source == "restored":
                        gate = (
                            torch.ones_like(tokens[..., :1], dtype=torch.float32)
                            if probability is None
                            else probability.flatten(1).unsqueeze(-1)
                        )
                        restoration = gate * restoration.float() + (1.0 - gate) * tokens.float()
                    if getattr(model, "residual", "cosine") == "l2":
                        grid = torch.linalg.vector_norm(tokens.float() - restoration.float(), dim=-1).view(b, 1, h, w)
                    else:
                        grid = token_residual(tokens, restoration, model.level_channels).view(b, 1, h, w)
        with self._stage("upsample_smooth"):
            grid = grid.float()
            if model.map_generator.needs_guide:  # the guided filter depends on the image: not a fixed matrix
                anomaly_map = model.map_generator(grid, size, guide=images.float())
            else:
                a_y = self._axis_matrix(h, size[0], images.device)
                a_x = a_y if (w, size[1]) == (h, size[0]) else self._axis_matrix(w, size[1], images.device)
                anomaly_map = torch.matmul(torch.matmul(a_y, grid), a_x.t())  # (B, 1, H, W)
        with self._stage("score"):
            result = {"anomaly_map": anomaly_map, "pred_score": model.score_images(grid, anomaly_map, position)}
        with self._stage("other_maps"):
            if probability is not None:
                result["perception_map"] = F.interpolate(probability, size=size, mode="bilinear", align_corners=False)
                result["uncertainty_map"] = (
                    torch.zeros_like(anomaly_map)
                    if uncertainty is None
                    else F.interpolate(uncertainty, size=size, mode="bilinear", align_corners=False)
                )
            else:
                result["uncertainty_map"] = torch.zeros_like(anomaly_map)
        return result

    def _prepare(self, images: torch.Tensor) -> None:
        """Fill the caches (smoothing matrices, exclusion bias and indices) eagerly, outside compiled code and CUDA
        graph capture, so that those only read them."""
        fe, model = self.model.feature_extractor, self.model
        if fe.feature_stride is None or model.anomaly_map_source == "perception":
            return
        height, width = images.shape[-2:]
        h, w = height // fe.feature_stride, width // fe.feature_stride
        if not model.map_generator.needs_guide:  # a guided map is made from the images, not from these matrices
            self._axis_matrix(h, height, images.device)
            self._axis_matrix(w, width, images.device)
        ram = model.ram
        if not isinstance(ram, RestorationAttention) or model.anomaly_map_source in NORMAL_MODEL_SOURCES:
            return
        ram.prepare((h, w), self._attention_mode(images.device), self.dtype or images.dtype, images.device)

    # ------------------------------------------------------------------ CUDA graphs
    def _graphed(self, images: torch.Tensor, num_samples: int | None) -> dict[str, torch.Tensor]:
        key = (tuple(images.shape), images.dtype, str(images.device), num_samples)
        if key not in self._graphs:
            static_in = images.clone()
            stream = torch.cuda.Stream(images.device)
            stream.wait_stream(torch.cuda.current_stream(images.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: caches (matrices, exclusion bias) and kernels chosen outside the graph
                    self._forward_impl(static_in, num_samples)
            torch.cuda.current_stream(images.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._forward_impl(static_in, num_samples)
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(images)
        graph.replay()
        return {k: v.clone() for k, v in static_out.items()}

    # ------------------------------------------------------------------ entry point
    def forward(self, images: torch.Tensor, num_samples: int | None = None) -> dict[str, torch.Tensor]:
        """
        Args:
            images: (B, 1 or 3, H, W) intensities in [0, 1], on the model's device.
            num_samples: perception passes (None: the model's setting; 0: none, zero uncertainty, fastest).

        Returns:
            as ``URANet.forward``: ``anomaly_map``, ``uncertainty_map`` (B, 1, H, W) and ``pred_score`` (B,), plus
            ``perception_map`` when the model has a perception module; float32, on the images' device.
        """
        self.model.eval()
        with torch.inference_mode():
            self._prepare(images)
            if self.cuda_graph and images.is_cuda:
                return self._graphed(images, num_samples)
            return self._impl(images, num_samples)
