"""The signal perception (UIAPM over the memory and position signals) and its training stage."""

from __future__ import annotations

import pytest
import torch
from test_ura_net import brick_images

from ura_monai.engines.calibration import synthetic_variants
from ura_monai.engines.perception import (
    MIN_SYNTHETIC_DEFECTS,
    perception_loss,
    perception_training_set,
    train_perception,
)
from ura_monai.networks.blocks.uiapm import PerceptionEnsemble, UncertaintyAnomalyPerception, perception_heads
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
        logit, _, _ = model.signal_perception(features, 0)
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
    assert all(torch.count_nonzero(head.classifier.weight_mu) == 0 for head in perception_heads(model.uiapm))


def test_map_source_rules_of_the_signal_perception():
    assert checked_map_source("perception", True, True, True) == "perception"
    assert checked_map_source("perception", False, True, True) == "fused"  # UIAPM off: the map it would correct
    assert checked_map_source("perception", False, True, False) == "memory"
    assert checked_map_source("fused", True, False, True) == "perception"  # RAM off: the perception of position
    with pytest.raises(ValueError, match="perception_input"):
        checked_map_source("perception", True, True, True, "pixels")


def _head(bias: float) -> UncertaintyAnomalyPerception:
    head = UncertaintyAnomalyPerception(2, 8, 4, num_samples=4, normalize_input=False, residual_head=True)
    head.prior_bias.data.fill_(bias)
    return head.eval()


def test_the_ensemble_averages_its_heads_and_pools_their_passes():
    torch.manual_seed(0)
    low, high = _head(-4.0), _head(4.0)
    ensemble = PerceptionEnsemble([low, high], num_samples=3)
    signals, prior = torch.randn(2, 2, 6, 6), torch.zeros(2, 1, 6, 6)
    with torch.no_grad():
        mean = ensemble(signals, 0, prior)
        torch.testing.assert_close(mean.logits, (low(signals, 0, prior).logits + high(signals, 0, prior).logits) / 2)
        pooled = ensemble(signals, None, prior)
        alone = [head(signals, 4, prior).uncertainty for head in (low, high)]
    assert pooled.logits.shape == (2, 4, 1, 6, 6)  # ceil(3 / 2) = 2 passes of each head
    # each head is sure of itself (about sigmoid(-4) or sigmoid(4) every pass); together they disagree
    assert all(float(u.max()) < 0.1 for u in alone) and float(pooled.uncertainty.min()) > 0.8
    assert float(ensemble.weight_kl()) == pytest.approx(float(low.weight_kl() + high.weight_kl()))
    with pytest.raises(ValueError, match="at least one member"):
        PerceptionEnsemble([], num_samples=1)


def test_each_head_of_the_ensemble_is_trained_on_its_own(bricks):
    model, bank = _fitted(bricks, perception_members=2)
    assert isinstance(model.uiapm, PerceptionEnsemble) and len(perception_heads(model.uiapm)) == 2
    summary = train_perception(model, bank, bricks, torch.arange(len(bricks)), epochs=4, variants=1, seed=7)
    assert summary["members"] == 2
    first, second = (head.classifier.weight_mu for head in perception_heads(model.uiapm))
    assert torch.count_nonzero(first) > 0 and torch.count_nonzero(second) > 0 and not torch.allclose(first, second)
    assert not any(p.requires_grad for p in model.uiapm.parameters())  # frozen again after its stage
    single, _ = _fitted(bricks, perception_members=1)
    assert isinstance(single.uiapm, UncertaintyAnomalyPerception)


def test_a_small_training_set_gets_more_synthetic_defects_per_image():
    # 400 defects at the least, 2 to 16 per image: magnetic tiles' 343 images keep 2, hazelnut's 25 get 16
    assert MIN_SYNTHETIC_DEFECTS == 400

    def variants(images):
        return synthetic_variants(images, MIN_SYNTHETIC_DEFECTS, fewest=2)

    assert variants(343) == 2 and variants(200) == 2
    assert variants(100) == 4 and variants(133) == 4 and variants(134) == 3
    assert variants(25) == 16 and variants(24) == 16 and variants(1) == 16
    # the fusion weight's defects in the held-out images: 64 at the least, 1 to 16 each
    assert synthetic_variants(10, 64) == 7 and synthetic_variants(100, 64) == 1 and synthetic_variants(2, 64) == 16
