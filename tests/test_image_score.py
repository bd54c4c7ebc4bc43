"""The image score (``ImageScorer``): which maps it reads, its standardized peaks, and their calibration on normal data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ura_monai.data import make_demo_dataset, mvtec_datalist
from ura_monai.engines.evaluation import compute_thresholds
from ura_monai.engines.loaders import image_loader
from ura_monai.networks.blocks.anomaly_map import ImageScorer
from ura_monai.networks.checkpoint import load_checkpoint, save_checkpoint
from ura_monai.networks.nets.ura_net import URANet

SMALL = {"pretrained": False, "perception_hidden": 8, "latent_channels": 4, "num_prototypes": 32, "embed_dim": 16}


def test_grid_and_position_score_is_the_mean_of_the_standardized_peaks():
    scorer = ImageScorer("grid_and_position")
    grid = torch.zeros(2, 1, 4, 4)
    position = torch.zeros(2, 1, 4, 4)
    grid[0, 0, 1, 1], grid[1, 0, 2, 2] = 3.0, 5.0  # map peaks 3 and 5
    position[0, 0, 0, 0], position[1, 0, 3, 3] = 10.0, 30.0  # position peaks 10 and 30
    scorer.calibrate(grid, position)
    # mean 4, std sqrt(2) (unbiased) of the map peaks; mean 20, std sqrt(200) of the position peaks
    assert torch.allclose(scorer.calibration, torch.tensor([4.0, 2**0.5, 20.0, 200**0.5]))
    query_grid = torch.full((1, 1, 4, 4), -1.0)
    query_grid[0, 0, 0, 3] = 4.0 + 2**0.5  # z = 1
    query_position = torch.zeros(1, 1, 4, 4)
    query_position[0, 0, 2, 1] = 20.0 + 3 * 200**0.5  # z = 3
    pixel = torch.zeros(1, 1, 16, 16)
    assert torch.allclose(scorer(query_grid, pixel, query_position), torch.tensor([2.0]))
    with pytest.raises(ValueError, match="position"):
        scorer(query_grid, pixel)
    # the other choices read one map, and need no position
    assert torch.equal(ImageScorer("grid")(query_grid, pixel), torch.tensor([4.0 + 2**0.5]))
    assert torch.equal(ImageScorer("pixel")(query_grid, pixel + 7.0), torch.tensor([7.0]))
    with pytest.raises(ValueError, match="two normal images"):
        scorer.calibrate(grid[:1], position[:1])


def test_the_default_score_adds_the_position_peak_only_to_the_perceptions_map(tmp_path):
    model = URANet(image_size=64, **SMALL)
    assert model.score_map == model.config["score_map"] == "grid_and_position"
    assert URANet(image_size=64, anomaly_map_source="memory", **SMALL).score_map == "grid"
    assert URANet(image_size=64, position_model=False, **SMALL).score_map == "grid"
    assert URANet(image_size=64, use_uiapm=False, **SMALL).score_map == "grid"  # the fused map: no learned correction
    assert URANet(image_size=64, score_map="pixel", **SMALL).score_map == "pixel"
    with pytest.raises(ValueError, match="score_map"):
        URANet(image_size=64, score_map="patch", **SMALL)
    # a checkpoint loaded with another map scores that map on the grid: its statistics describe the perception's peaks
    model.image_scorer.calibration.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    path = save_checkpoint(tmp_path / "model.pt", model.eval(), {"image_threshold": 0.5}, {})
    loaded, _ = load_checkpoint(path)
    assert loaded.score_map == "grid_and_position"
    assert torch.equal(loaded.image_scorer.calibration, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert load_checkpoint(path, anomaly_map_source="memory")[0].score_map == "grid"
    # a checkpoint written before the scorer's statistics (it scored the grid) loads without them
    raw = torch.load(path, map_location="cpu", weights_only=True)
    del raw["network.image_scorer.calibration"]
    raw["_extra_state"]["config"]["score_map"] = "grid"
    torch.save(raw, path)
    assert load_checkpoint(path)[0].score_map == "grid"


def test_thresholds_rest_on_the_calibrated_score_of_the_same_normal_images(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", n_train=8, n_test_good=1, n_test_defect=1, image_size=64, seed=2)
    train = mvtec_datalist(root, None, "train")
    fit_items, threshold_items = train[:6], train[6:]
    model = URANet(image_size=64, **SMALL).eval()
    images = torch.cat([batch["image"] for batch in image_loader(fit_items, 64, 8, 0)])
    with torch.no_grad():
        bank = model.fit_normal_statistics(model.feature_extractor(images), torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    stats = compute_thresholds(model, threshold_items, 64, training_features=bank, training_images=[images])
    # the same normal images, recomputed: the cross-fitted training images (the same draws) and the held-out ones
    torch.manual_seed(0)
    with torch.no_grad():
        grid, position = model.cross_fitted_grid_maps(bank)
        held_out = torch.cat([batch["image"] for batch in image_loader(threshold_items, 64, 8, 0)])
        held_grid, _, held_position = model.signal_perception(model.feature_extractor(held_out), 0)
    grid, position = torch.cat([grid, held_grid]), torch.cat([position, held_position])
    map_peaks, position_peaks = grid.amax((1, 2, 3)).double(), position.amax((1, 2, 3)).double()
    expected = torch.stack([map_peaks.mean(), map_peaks.std(), position_peaks.mean(), position_peaks.std()]).float()
    assert torch.allclose(model.image_scorer.calibration, expected, rtol=1e-4)
    # the stored threshold is the 0.99 quantile of those images' calibrated scores, not of the uncalibrated ones
    scores = 0.5 * ((map_peaks - expected[0]) / expected[1] + (position_peaks - expected[2]) / expected[3])
    assert stats["image_threshold"] == pytest.approx(float(np.quantile(scores.numpy(), 0.99)), rel=1e-4, abs=1e-4)
    assert abs(float(scores.mean())) < 1e-4  # standardized: the normal scores centre on 0
    # another operating point takes its own quantile of the same scores
    torch.manual_seed(0)
    wide = compute_thresholds(
        model, threshold_items, 64, training_features=bank, training_images=[images], false_alarm_rate=0.25
    )
    assert wide["image_threshold"] == pytest.approx(float(np.quantile(scores.numpy(), 0.75)), rel=1e-4, abs=1e-4)
    assert wide["image_threshold"] < stats["image_threshold"]
    assert (wide["image_false_alarm_rate"], stats["image_false_alarm_rate"]) == (0.25, 0.01)
