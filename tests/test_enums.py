"""The option vocabularies of ``ura_monai.utils.enums`` are exactly what the code behind them accepts.

Each value goes through the component that implements it (and an unknown value is refused there), so a
vocabulary that gains or loses a member without its implementation fails here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ura_monai.utils.enums import (
    AugmentView,
    Backbone,
    FasmCorruption,
    FasmMaskType,
    Layout,
    MapSource,
    Precision,
    Residual,
    ScoreMode,
    StrEnum,
    VolumeAggregation,
)


def test_members_are_their_strings():
    assert MapSource.PROTOTYPE == "prototype" and str(MapSource.PROTOTYPE) == "prototype"
    assert MapSource("restoration") is MapSource.RESTORATION
    assert ScoreMode.choices() == ("max", "topk_mean", "std", "mean")
    assert all(issubclass(e, StrEnum) for e in (Layout, Precision, Backbone))


@pytest.mark.parametrize("source", MapSource.choices())
@pytest.mark.parametrize("residual", Residual.choices())
def test_every_map_source_and_residual_builds_a_network(source, residual):
    from ura_monai.networks.nets.ura_net import URANet

    net = URANet(image_size=32, num_prototypes=4, pretrained=False, anomaly_map_source=source, residual=residual).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 3, 32, 32), num_samples=0)
    assert out["anomaly_map"].shape == (1, 1, 32, 32)


def test_unknown_network_options_are_refused():
    from ura_monai.networks.nets.ura_net import URANet

    with pytest.raises(ValueError, match="anomaly_map_source"):
        URANet(image_size=32, pretrained=False, anomaly_map_source="nearest")
    with pytest.raises(ValueError, match="residual"):
        URANet(image_size=32, pretrained=False, residual="l1")


def test_score_modes_and_augment_views_are_implemented():
    from ura_monai.engines.features import augmented_views
    from ura_monai.networks.blocks.anomaly_map import image_score

    maps = torch.rand(2, 1, 8, 8)
    for mode in ScoreMode:
        assert image_score(maps, mode.value, 0.1).shape == (2,)
    with pytest.raises(ValueError):
        image_score(maps, "median", 0.1)
    assert [len(augmented_views(maps, v.value)) for v in AugmentView] == [1, 2, 8]
    with pytest.raises(ValueError):
        augmented_views(maps, "vflip")


def test_fasm_vocabularies_are_implemented():
    from ura_monai.networks.blocks.fasm import FeatureAnomalySynthesis

    for mask in FasmMaskType:
        for corruption in FasmCorruption:
            FeatureAnomalySynthesis([mask.value], [corruption.value])
    with pytest.raises(ValueError):
        FeatureAnomalySynthesis(["star"], ["noise"])


def test_backbones_precisions_aggregations_and_layouts_are_implemented(tmp_path):
    from ura_monai.data.datalists import build_datalist
    from ura_monai.inference.dicom_inference import aggregate_slice_scores
    from ura_monai.inference.fast import DTYPES
    from ura_monai.networks.blocks.feature_extractor import BACKBONE_LEVELS

    assert set(BACKBONE_LEVELS) == set(Backbone.choices())
    assert set(Precision.choices()) <= set(DTYPES)
    scores = np.array([0.1, 0.4, 0.2])
    for aggregation in VolumeAggregation:
        assert np.isfinite(aggregate_slice_scores(scores, aggregation.value, top_k=2))
    with pytest.raises(ValueError):
        aggregate_slice_scores(scores, "median")
    for layout in Layout:  # every layout is dispatched (an empty root fails on the data, not on the name)
        with pytest.raises(Exception) as error:
            build_datalist(layout.value, tmp_path, "c", "train")
        assert "unknown dataset layout" not in str(error.value)
    with pytest.raises(ValueError, match="unknown dataset layout"):
        build_datalist("kaggle", tmp_path, "c", "train")
