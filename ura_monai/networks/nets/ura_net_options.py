"""URANet's option vocabularies, the checks of its switch combinations and the blocks its options build (kept beside
the network they configure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ura_monai.networks.blocks.ram import RestorationAttention
from ura_monai.networks.blocks.restoration import RestorationTransformer
from ura_monai.networks.blocks.uiapm import PerceptionEnsemble, UncertaintyAnomalyPerception
from ura_monai.utils.enums import MapSource, PerceptionInput, RamNetwork, Residual, ScoreMap

__all__ = [
    "MAP_SOURCES", "NORMAL_MODEL_SOURCES", "RESIDUALS", "PERCEPTION_INPUTS", "RAM_NETWORKS", "SCORE_MAPS",
    "checked_choice", "checked_map_source", "checked_score_map", "perception_module", "restoration_module",
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


def checked_score_map(score_map: str | None, signal_map: bool, position_model: bool) -> str:
    """The map the image score reads (:class:`~ura_monai.networks.blocks.anomaly_map.ImageScorer`): ``None`` (the
    default) is ``"grid_and_position"`` for the signal perception's map with the position model, else ``"grid"``;
    ``"grid_and_position"`` falls back to ``"grid"`` where it does not apply (another map, e.g. a checkpoint loaded
    with ``anomaly_map_source="memory"``, whose peaks its statistics do not describe)."""
    if score_map is None:
        score_map = "grid_and_position"
    checked_choice("score_map", score_map, SCORE_MAPS)
    if score_map == "grid_and_position" and not (signal_map and position_model):
        return "grid"
    return score_map


def checked_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """``value``, or ValueError naming the option ``name`` and its ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got '{value}'")
    return value


def perception_module(
    config: Mapping[str, Any], channels: int, signals: int
) -> UncertaintyAnomalyPerception | PerceptionEnsemble:
    """UIAPM on the ``signals`` discrepancy signals (a residual head over their fused map; an ensemble of
    ``perception_members`` such heads) or on the features."""
    hidden, latent, samples = config["perception_hidden"], config["latent_channels"], config["num_samples"]
    if config["perception_input"] != "signals":
        return UncertaintyAnomalyPerception(channels, hidden, latent, samples)
    members = [
        UncertaintyAnomalyPerception(signals, hidden, latent, samples, normalize_input=False, residual_head=True)
        for _ in range(config["perception_members"])
    ]
    # trained in its own stage on cross-fitted signals (engines/perception.py), not by the main loop, whose
    # optimizer and DistributedDataParallel wrapper therefore leave it out
    module = members[0] if len(members) == 1 else PerceptionEnsemble(members, samples)
    return module.requires_grad_(False)


def restoration_module(
    config: Mapping[str, Any], channels: int, grid: tuple[int, int]
) -> RestorationAttention | RestorationTransformer | None:
    """The RAM a URANet ``config`` asks for: the restoration transformer, the restoration attention, or None."""
    if not config["use_ram"]:
        return None
    if config["ram_network"] == "transformer":
        return RestorationTransformer(
            channels, grid, config["num_prototypes"], config["embed_dim"], config["ram_depth"], config["num_heads"],
            config["ram_patch_size"], config["num_normal_tokens"], mask_ratio=config["ram_mask_ratio"],
        )  # fmt: skip
    return RestorationAttention(
        channels, config["num_prototypes"], config["embed_dim"], config["num_heads"], config["exclude_radius"],
        config["distance_attention"],
    )  # fmt: skip
