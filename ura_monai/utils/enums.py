"""The option vocabularies of ura_monai, one place each, as string enums (like ``monai.utils.enums``).

Torch-free on purpose: the CLI builds its ``--help`` from them without importing torch. Members compare equal to
their strings (``MapSource.PROTOTYPE == "prototype"``), so configs and checkpoints keep plain strings.
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "StrEnum",
    "MapSource",
    "ScoreMode",
    "ScoreMap",
    "Residual",
    "Layout",
    "InputType",
    "VolumeAggregation",
    "Precision",
    "AttentionMode",
    "RamAttention",
    "FasmMaskType",
    "FasmCorruption",
    "AugmentView",
    "Backbone",
]


class StrEnum(str, Enum):
    """An ``Enum`` whose members are strings (MONAI's ``StrEnum``); ``choices()`` lists the values in order."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def choices(cls) -> tuple[str, ...]:
        """The values, in declaration order (for ``argparse`` choices and error messages)."""
        return tuple(member.value for member in cls)


class MapSource(StrEnum):
    """What the anomaly map is the residual of (``URANet(anomaly_map_source=...)``; docs/design.md)."""

    FUSED = "fused"
    MEMORY = "memory"
    POSITION = "position"
    PROTOTYPE = "prototype"  # the name of ``memory`` before 0.2 (older checkpoints and configs)
    RESTORATION = "restoration"
    RESTORED = "restored"
    PERCEPTION = "perception"


class PerceptionInput(StrEnum):
    """What the perception module (UIAPM) reads (``URANet(perception_input=...)``; docs/design.md)."""

    SIGNALS = "signals"
    FEATURES = "features"


class RamNetwork(StrEnum):
    """The RAM's restoration network (``URANet(ram_network=...)``; docs/design.md): a masked-restoration transformer
    or the first design's single restoration attention (a soft nearest neighbour over normal context; the default)."""

    TRANSFORMER = "transformer"
    ATTENTION = "attention"


class ScoreMode(StrEnum):
    """Image score from the anomaly map."""

    MAX = "max"
    TOPK_MEAN = "topk_mean"
    STD = "std"
    MEAN = "mean"


class ScoreMap(StrEnum):
    """Which map the image score reads: the anomaly map on the feature grid, before upsampling and smoothing (as
    PatchCore scores its patches: smoothing dilutes a defect of one or two cells), the smoothed pixel map (checkpoints
    written before 0.6.0), or the grid map's peak and the position model's peak, each standardized on normal images,
    averaged (the default with the signal perception's map since 0.9.0)."""

    GRID = "grid"
    PIXEL = "pixel"
    GRID_AND_POSITION = "grid_and_position"


class Residual(StrEnum):
    """Distance between input and restored features."""

    L2 = "l2"
    COSINE = "cosine"


class Layout(StrEnum):
    """Dataset folder layouts (``build_datalist``, ``--layout``, the bundle's ``preset#layout``)."""

    MVTEC = "mvtec"
    BTAD = "btad"
    OCT2017 = "oct2017"
    FOLDER = "folder"


class InputType(StrEnum):
    """What an inference input folder holds."""

    IMAGES = "images"
    DICOM = "dicom"


class VolumeAggregation(StrEnum):
    """Volume score from slice scores."""

    MAX = "max"
    MEAN = "mean"
    TOPK_MEAN = "topk_mean"


class Precision(StrEnum):
    """Inference dtypes by short name (``float32``, ``bfloat16``, ``float16`` are accepted aliases where parsed)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class AttentionMode(StrEnum):
    """Attention kernel of the fast inference path (``auto``: ``sdpa`` on CUDA, ``chunked`` elsewhere)."""

    AUTO = "auto"
    CHUNKED = "chunked"
    SDPA = "sdpa"


class RamAttention(StrEnum):
    """How the restoration attention computes its attention (``RestorationAttention(attention=...)``): the
    reference maths (differentiable, all logits in memory) or one of the inference kernels of the fast path."""

    REFERENCE = "reference"
    CHUNKED = "chunked"
    SDPA = "sdpa"


class FasmMaskType(StrEnum):
    """Region shapes of the feature anomaly synthesis."""

    BLOB = "blob"
    BOX = "box"
    LINE = "line"


class FasmCorruption(StrEnum):
    """Feature corruptions of the feature anomaly synthesis."""

    NOISE = "noise"
    SHUFFLE = "shuffle"
    MIX = "mix"


class AugmentView(StrEnum):
    """Training views of the normal images: none, horizontal flip, or the 8 flips and rotations."""

    NONE = "none"
    HFLIP = "hflip"
    DIHEDRAL = "dihedral"


class Backbone(StrEnum):
    """Frozen feature extractors."""

    EFFICIENTNET_LITE0 = "efficientnet_lite0"
    WIDE_RESNET50_2 = "wide_resnet50_2"
