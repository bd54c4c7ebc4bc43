"""The position-aware normal model, the ``position`` / ``fused`` maps, cross-fitted calibration and thresholds."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from ura_monai.cli import main
from ura_monai.engines.features import bank_images
from ura_monai.networks.blocks.normal_model import PositionalGaussian, cross_fitted_normal_distances, image_folds
from ura_monai.networks.checkpoint import read_checkpoint
from ura_monai.networks.nets import URANet


def test_positional_gaussian_matches_a_hand_mahalanobis_distance():
    # dim == channels: the projection is a rotation, under which the (regularized) Mahalanobis distance is unchanged,
    # so it must equal the distance computed on the raw features with numpy
    g = torch.Generator().manual_seed(0)
    train = torch.randn(12, 3, 2, 2, generator=g) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    query = torch.randn(2, 3, 2, 2, generator=g)
    model = PositionalGaussian(3, (2, 2), dim=3, regularization=0.01)
    model.fit(train)
    got = model(query)
    x = train.numpy()
    # the regularization is relative to the mean feature variance (over channels and positions; a rotation keeps it)
    reg = 0.01 * x.var(axis=0, ddof=1).mean()
    for i in range(2):
        for j in range(2):
            samples = x[:, :, i, j]
            mean = samples.mean(0)
            cov = np.cov(samples, rowvar=False) + reg * np.eye(3)
            for b in range(2):
                d = query.numpy()[b, :, i, j] - mean
                expected = float(np.sqrt(d @ np.linalg.solve(cov, d)))
                assert got[b, 0, i, j].item() == pytest.approx(expected, rel=1e-4)


def test_position_model_flags_a_feature_that_is_normal_elsewhere():
    # position (0, 0) always holds pattern a, position (1, 1) pattern b: b placed at (0, 0) is an anomaly only a
    # position-aware model sees (the nearest-neighbour memory finds b among the normal features)
    g = torch.Generator().manual_seed(1)
    a, b = torch.zeros(8), torch.zeros(8)
    a[0], b[1] = 3.0, 3.0
    train = 0.05 * torch.randn(20, 8, 2, 2, generator=g)
    train[:, :, 0, 0] += a
    train[:, :, 1, 1] += b
    model = PositionalGaussian(8, (2, 2), dim=8)
    model.fit(train)
    normal = train[:1].clone()
    swapped = normal.clone()
    swapped[0, :, 0, 0] = b
    assert model(swapped)[0, 0, 0, 0] > 10 * model(normal)[0, 0, 0, 0]
    memory = train.permute(0, 2, 3, 1).reshape(-1, 8)
    assert torch.cdist(swapped[0, :, 0, 0].view(1, 8), memory).min() < 0.5  # the position-free memory accepts it


def test_positional_gaussian_before_fit_one_sample_and_wrong_grids():
    model = PositionalGaussian(4, (2, 2), dim=4)
    x = torch.randn(2, 4, 2, 2)
    # unfitted: zero mean, unit covariance, and the projection is a rotation: the distance is the feature norm
    assert torch.allclose(model(x), x.norm(dim=1, keepdim=True), atol=1e-5)
    one = torch.randn(1, 4, 2, 2)
    model.fit(one)  # a single normal image: its features are the mean, the covariance is the regularization
    assert torch.isfinite(model(x)).all() and model(one).abs().max() < 1e-4
    # another grid (an image of another aspect): resampled to the model's grid and back
    assert model(torch.randn(1, 4, 3, 5)).shape == (1, 1, 3, 5)
    with pytest.raises(ValueError, match="channels"):
        model(torch.zeros(1, 3, 2, 2))


def _small(source: str, **kw) -> URANet:
    return URANet(
        image_size=64,
        pretrained=False,
        num_prototypes=16,
        perception_hidden=16,
        latent_channels=4,
        embed_dim=16,
        num_heads=2,
        anomaly_map_source=source,
        **kw,
    ).eval()


def test_the_coreset_memory_keeps_rare_normal_appearances():
    from ura_monai.networks.blocks.ram import draw_normal_tokens, greedy_coreset

    g = torch.Generator().manual_seed(0)
    # 1,994 features of a common appearance, 20 of a rare one, 2 of a rarer one
    common = torch.randn(1994, 16, generator=g) * 0.1
    rare = torch.randn(20, 16, generator=g) * 0.1 + 5.0
    rarer = torch.randn(2, 16, generator=g) * 0.1 - 5.0
    tokens = torch.cat([common, rare, rarer])
    chosen = greedy_coreset(tokens, 3, torch.Generator().manual_seed(1))
    assert sorted(int(i >= 1994) + int(i >= 2014) for i in chosen) == [0, 1, 2]  # one of each appearance
    features = tokens.T.reshape(1, 16, 63, 32)  # a (1, C, h, w) feature map whose positions are the tokens
    flat = features.permute(0, 2, 3, 1).reshape(-1, 16)

    def covering_radius(memory):  # the farthest any training feature is from the memory
        return torch.cdist(flat, memory).amin(1).max()

    coreset = draw_normal_tokens(features, 32, torch.Generator().manual_seed(2))
    drawn = draw_normal_tokens(features, 32, torch.Generator().manual_seed(2), coreset=False)
    assert covering_radius(coreset) < 0.5 * covering_radius(drawn)
    # the random draw is the first draw_normal_tokens' (older checkpoints' cross-fitting reproduces)
    assert torch.equal(drawn, flat[torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(2))[:32]])
    # fewer positions than asked: every position, repeated
    assert draw_normal_tokens(features[..., :1, :2], 5).shape == (5, 16)
    # the coreset memory is kept as drawn (the first design's random draw is trained by the attention RAM)
    assert not URANet(image_size=32, pretrained=False).ram.prototypes.requires_grad
    assert URANet(image_size=32, pretrained=False, memory_coreset=False).ram.prototypes.requires_grad


def test_fused_map_is_calibrated_on_cross_fitted_normal_distances():
    torch.manual_seed(0)
    model = _small("fused")
    features = model.fit_normal_statistics(torch.rand(8, model.feature_extractor.out_channels, 8, 8) + 1.0)
    memory, position = model.cross_fitted_distances(features, generator=torch.Generator().manual_seed(0))
    assert memory.shape == position.shape == (8, 1, 8, 8)
    calibration = model.map_calibration
    assert calibration[1] > 0 and calibration[3] > 0
    # the stored calibration standardizes cross-fitted normal distances (a new draw of the folds' memories)
    fused, cross_fitted_position = model.cross_fitted_grid_maps(features, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cross_fitted_position, position)
    assert abs(fused.mean().item()) < 0.5
    # the fused grid map is the weighted sum of both standardized distances
    grid = model.normal_model_map(features[:2])
    weight = model.fusion_weight
    expected = (
        weight * (model.ram.prototype_distance(features[:2]) - calibration[0]) / calibration[1]
        + (1 - weight) * (model.position_model(features[:2]) - calibration[2]) / calibration[3]
    )
    assert torch.allclose(grid, expected, atol=1e-5)


def test_cross_fitting_blocks_keep_every_view_of_an_image_together():
    # 12 images of 2 identical "views" each, laid out as extract_feature_bank stacks them (batch of 4, then views)
    groups = bank_images(12, 2, 4)
    assert groups[:8].tolist() == [0, 1, 2, 3, 0, 1, 2, 3] and groups[-4:].tolist() == [8, 9, 10, 11]
    folds = image_folds(len(groups), 4, groups)
    # contiguous blocks of images in their order (3 each), whatever the rows' layout
    assert [int(folds[groups == image].unique()) for image in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # one row per image: the blocks of rows the cross-fitting has always used (25 rows: 6 / 6 / 7 / 6)
    assert torch.bincount(image_folds(25, 4)).tolist() == [6, 6, 7, 6]
    with pytest.raises(ValueError, match="one image index per row"):
        image_folds(5, 2, groups=torch.arange(4))
    # a row is scored by a memory (here all positions of the other blocks) that never saw its image: split by rows
    # (no groups), some views land in another block than their identical twin and get distance 0; grouped, none does
    base = torch.rand(12, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    features = torch.cat([torch.cat([base[b : b + 4]] * 2) for b in range(0, 12, 4)])
    assert torch.equal(features[groups == 5][0], features[groups == 5][1])
    grouped = cross_fitted_normal_distances(features, None, None, 4096, None, 4, None, False, groups)[0]
    by_rows = cross_fitted_normal_distances(features, None, None, 4096, None, 4, None, False)[0]
    per_row = lambda d: d.flatten(1).amax(1)  # noqa: E731
    assert (per_row(grouped) > 0.05).all()
    assert (per_row(by_rows) < 1e-2).any()  # 0 up to the rounding of |x|^2 + |m|^2 - 2 x.m


def test_map_source_names_and_switches():
    assert _small("prototype").anomaly_map_source == "memory"  # the older name still loads
    with pytest.raises(ValueError, match="position_model"):
        _small("position", position_model=False)
    assert _small("memory", position_model=False).position_model is None


def test_checkpoints_written_before_the_position_model_load_without_it():
    model = _small("memory", position_model=False)
    legacy = {
        "format": "ura_monai.uranet/1",
        "config": {k: v for k, v in model.config.items() if k not in ("position_model", "position_dim")},
        "state_dict": model.trainable_state_dict(),
    }
    config = read_checkpoint(legacy)["config"]
    assert config["position_model"] is False
    rebuilt = URANet(**config)
    assert rebuilt.position_model is None


def test_make_demo_flags_at_most_one_normal_test_image(tmp_path):
    """The README's ``make demo`` (128 px, 3 epochs): thresholds from every normal training image (cross-fitted),
    not a handful of held-out ones, so that normal test images are not flagged (it flagged 3 of 8 before)."""
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--no-progress", "-q"]) == 0
    with open(out / "predictions" / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    normal = [r for r in rows if "/good/" in r["path"].replace("\\", "/")]
    anomalous = [r for r in rows if "/good/" not in r["path"].replace("\\", "/")]
    assert len(normal) == 8 and len(anomalous) == 12
    assert sum(r["decision"] == "anomalous" for r in normal) <= 1
    assert sum(r["decision"] == "anomalous" for r in anomalous) >= 11
    metrics = json.loads((out / "test" / "metrics.json").read_text())
    assert metrics["normal_fpr"] <= 0.125 and metrics["anomalous_tpr"] >= 0.9


class _TwoDistances(torch.nn.Module):
    """Stands in for URANet in the weight selection: fixed standardized memory / position distance maps."""

    def __init__(self, memory: torch.Tensor, position: torch.Tensor) -> None:
        super().__init__()
        self.memory, self.position = memory, position
        self.register_buffer("map_calibration", torch.zeros(4))
        self.register_buffer("fusion_weight", torch.tensor(0.5))

    def standardized_distances(self, features):
        return self.memory, self.position

    fuse = URANet.fuse  # the real weighting


@pytest.mark.parametrize("informative", ["memory", "position"])
def test_fusion_weight_follows_the_distance_that_finds_the_synthetic_defects(informative):
    from ura_monai.engines.calibration import select_fusion_weight

    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(4, 1, 8, 8)
    masks[:, :, 2:5, 2:5] = 1.0
    target = torch.cat([torch.zeros(2, 1, 8, 8), masks])  # 2 clean held-out images, 4 with defects
    good = target * 3.0 + torch.randn(6, 1, 8, 8, generator=g) * 0.5  # high inside the defects
    noise = torch.randn(6, 1, 8, 8, generator=g)  # blind to them
    memory, position = (good, noise) if informative == "memory" else (noise, good)
    model = _TwoDistances(memory, position)
    scores = select_fusion_weight(model, torch.zeros(2, 1, 8, 8), torch.zeros(4, 1, 8, 8), masks)
    assert set(scores) == {0.0, 0.25, 0.5, 0.75, 1.0}
    assert model.fusion_weight.item() == (1.0 if informative == "memory" else 0.0)
    assert scores[model.fusion_weight.item()] > 0.9 > scores[1.0 - model.fusion_weight.item()]
    # scored only (a model configured with a fixed weight, the default 0.5): the weight stays
    model.fusion_weight.fill_(0.5)
    assert select_fusion_weight(model, torch.zeros(2, 1, 8, 8), torch.zeros(4, 1, 8, 8), masks, apply=False) == scores
    assert model.fusion_weight.item() == 0.5


def test_the_fusion_weight_is_fixed_unless_configured_none():
    assert URANet(image_size=32, pretrained=False).fusion_weight.item() == 0.5
    assert URANet(image_size=32, pretrained=False, fusion_weight=0.25).fusion_weight.item() == 0.25
    chosen = URANet(image_size=32, pretrained=False, fusion_weight=None)
    assert chosen.config["fusion_weight"] is None and chosen.fusion_weight.item() == 0.5  # until fit chooses


def test_synthetic_defects_change_the_image_only_inside_their_mask():
    from ura_monai.engines.calibration import synthetic_defect_batch

    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    defects, masks = synthetic_defect_batch(images, variants=2, seed=0)
    assert defects.shape == (6, 3, 32, 32) and masks.shape == (6, 1, 32, 32)
    assert (masks.flatten(1).sum(1) > 0).all()
    originals = images.repeat(2, 1, 1, 1)
    outside = (1 - masks).bool().expand_as(defects)
    assert torch.equal(defects[outside], originals[outside])
    assert (defects - originals).abs()[masks.bool().expand_as(defects)].mean() > 0.01
    again, _ = synthetic_defect_batch(images, variants=2, seed=0)
    assert torch.equal(again, defects)  # seeded
