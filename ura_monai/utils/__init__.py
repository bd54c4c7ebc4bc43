"""Helpers of the lowest layer (see docs/design.md): nothing here imports another ``ura_monai`` package.

- :mod:`.enums`: the option vocabularies (torch-free, re-exported here, so ``import ura_monai.utils`` stays
  torch-free for the CLI's ``--help``);
- :mod:`.distributed`: ``unwrap`` and the rank helpers (import them from ``ura_monai.utils.distributed``).
"""

from .enums import (
    AttentionMode,
    AugmentView,
    Backbone,
    FasmCorruption,
    FasmMaskType,
    InputType,
    Layout,
    MapSource,
    Precision,
    Residual,
    ScoreMode,
    StrEnum,
    VolumeAggregation,
)

__all__ = [
    "AttentionMode",
    "AugmentView",
    "Backbone",
    "FasmCorruption",
    "FasmMaskType",
    "InputType",
    "Layout",
    "MapSource",
    "Precision",
    "Residual",
    "ScoreMode",
    "StrEnum",
    "VolumeAggregation",
]
