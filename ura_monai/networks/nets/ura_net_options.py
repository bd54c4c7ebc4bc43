"""URANet's option vocabularies and the checks of its switch combinations (kept beside the network they configure)."""

from __future__ import annotations

from collections.abc import Sequence

from ura_monai.utils.enums import MapSource, PerceptionInput, RamNetwork, Residual, ScoreMap

__all__ = [
    "MAP_SOURCES", "NORMAL_MODEL_SOURCES", "RESIDUALS", "PERCEPTION_INPUTS", "RAM_NETWORKS", "SCORE_MAPS",
    "checked_choice", "checked_map_source",
]  # fmt: skip

MAP_SOURCES = MapSource.choices()
# maps computed from the fitted normal models alone: no attention, and the perception module only for uncertainty
NORMAL_MODEL_SOURCES = ("memory", "position", "fused", "prototype")
RESIDUALS = Residual.choices()
PERCEPTION_INPUTS = PerceptionInput.choices()
RAM_NETWORKS = RamNetwork.choices()
SCORE_MAPS = ScoreMap.choices()


def checked_map_source(
    source: str, use_uiapm: bool, use_ram: bool, position_model: bool, perception_input: str = "signals"
) -> str:
    """The anomaly map source a URANet with these switches uses (``prototype`` is ``memory``'s older name; without
    the RAM the map is the perception's; without UIAPM the signal perception's map falls back to the normal-model
    map it would correct), or ValueError for an impossible combination."""
    if not (use_uiapm or use_ram):
        raise ValueError("URA-Net needs at least one of UIAPM (use_uiapm) and RAM (use_ram)")
    if source not in MAP_SOURCES:
        raise ValueError(f"anomaly_map_source must be one of {MAP_SOURCES}, got '{source}'")
    if perception_input not in PERCEPTION_INPUTS:
        raise ValueError(f"perception_input must be one of {PERCEPTION_INPUTS}, got '{perception_input}'")
    if source in ("position", "fused") and not position_model:
        raise ValueError(f"anomaly_map_source='{source}' needs position_model=True")
    if not use_ram:
        if perception_input == "signals" and not position_model:
            raise ValueError("without the RAM's normal memory the signal perception needs position_model=True")
        return "perception"
    if source == "perception" and not use_uiapm:
        if perception_input == "signals":
            return "fused" if position_model else "memory"
        raise ValueError("anomaly_map_source='perception' needs use_uiapm=True")
    return "memory" if source == "prototype" else source


def checked_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """``value``, or ValueError naming the option ``name`` and its ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got '{value}'")
    return value
