"""The signal perception (UIAPM over the memory and position signals) and its training stage."""

from __future__ import annotations

import pytest
import torch
from test_ura_net import brick_images

from ura_monai.engines.perception import perception_loss, perception_training_set, train_perception
from ura_monai.networks.nets import URANet
from ura_monai.networks.nets.ura_net_options import checked_map_source

SIZE = 64


def _fitted(images: torch.Tensor, **kwargs) -> tuple[URANet, torch.Tensor]:
    torch.manual_seed(0)
    model = URANet(image_size=SIZE, num_prototypes=64, num_samples=4, **kwargs).eval()
    with torch.no_grad():
        bank = model.fit_normal_statistics(model.feature_extractor(images), torch.Generator().manual_seed(0))
    return model, bank


@pytest.fixture(scope="module")
def bricks() -> torch.Tensor:
    return brick_images(16, SIZE)


def test_the_signal_perception_starts_as_the_fused_map(bricks):
    model, _ = _fitted(bricks)
    query = brick_images(2, SIZE, seed=5)
    with torch.no_grad():
        features = model.feature_extractor(query)
        logit, _ = model.signal_perception(features, 0)
        fused = model.normal_model_map(features, "fused")
        out = model(query, num_samples=4)
    # zero-initialised residual head: logit = 1 * fused - 3 at every position
    torch.testing.assert_close(logit, fused - 3.0, atol=1e-5, rtol=0)
    assert out["anomaly_map"].shape == (2, 1, SIZE, SIZE) and out["uncertainty_map"].shape == (2, 1, SIZE, SIZE)


def test_cross_fitted_queries_are_scored_by_the_fold_without_their_image(bricks):
    model, bank = _fitted(bricks)
    rows = torch.tensor([0, 5, 9, 15])
    with torch.no_grad():
        memory, position, q_memory, q_position = model.cross_fitted_query_distances(
            bank, bank[rows], rows, generator=torch.Generator().manual_seed(1)
        )
    # a query equal to a training row gets exactly that row's cross-fitted distances (same fold models)
    torch.testing.assert_close(q_memory, memory[rows])
    torch.testing.assert_close(q_position, position[rows])
    # and they are held-out distances: larger than the in-sample ones of the full normal models
    assert float(position.mean()) > float(model.position_model(bank).mean())


def test_training_lowers_the_perception_loss_and_moves_the_map(bricks):
    model, bank = _fitted(bricks)
    rows = torch.arange(len(bricks))

    def training_loss() -> float:
        torch.manual_seed(3)  # the same stochastic pass before and after
        with torch.no_grad():
            signals, prior, target = perception_training_set(model, bank, bricks, rows, variants=2, seed=7)
            return float(perception_loss(model.uiapm, signals, prior, target, target.numel())["loss"])

    query = brick_images(2, SIZE, seed=5)
    with torch.no_grad():
        before = model(query, num_samples=0)["anomaly_map"]
        loss_before = training_loss()
    summary = train_perception(model, bank, bricks, rows, epochs=40, variants=2, seed=7)
    assert summary["defects"] == 2 * len(bricks) and summary["samples"] == 3 * len(bricks)
    with torch.no_grad():
        after = model(query, num_samples=0)["anomaly_map"]
    assert training_loss() < 0.97 * loss_before
    assert not torch.allclose(before, after)


def test_without_fasm_the_perception_stays_the_fused_map(bricks):
    model, bank = _fitted(bricks, use_fasm=False)
    assert train_perception(model, bank, bricks, torch.arange(len(bricks))) == {}
    assert torch.count_nonzero(model.uiapm.classifier.weight_mu) == 0


def test_map_source_rules_of_the_signal_perception():
    assert checked_map_source("perception", True, True, True) == "perception"
    assert checked_map_source("perception", False, True, True) == "fused"  # UIAPM off: the map it would correct
    assert checked_map_source("perception", False, True, False) == "memory"
    assert checked_map_source("fused", True, False, True) == "perception"  # RAM off: the perception of position
    with pytest.raises(ValueError, match="perception_input"):
        checked_map_source("perception", True, True, True, "pixels")
