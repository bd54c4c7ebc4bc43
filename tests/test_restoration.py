"""The RAM's restoration transformer, its residual signal and the schedule that trains it."""

from __future__ import annotations

import math
import types

import pytest
import torch
from test_ura_net import brick_images

from ura_monai.engines.calibration import calibrate_restoration_residual, select_residual_weight
from ura_monai.engines.workflow import default_schedule
from ura_monai.losses.ura_loss import RestorationLoss
from ura_monai.networks.blocks.fasm import FeatureAnomalySynthesis
from ura_monai.networks.blocks.ram import RestorationAttention
from ura_monai.networks.blocks.restoration import RestorationTransformer, sincos_positions
from ura_monai.networks.blocks.uiapm import perception_heads
from ura_monai.networks.checkpoint import load_checkpoint, save_checkpoint
from ura_monai.networks.nets import URANet

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZE = 64


def smooth_features(count: int, channels: int = 12, grid: int = 8, seed: int = 0) -> torch.Tensor:
    """Normal 'features' with structure a network can learn: a few smooth patterns mixed per sample."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, math.pi, grid), torch.linspace(0, math.pi, grid), indexing="ij")
    basis = torch.stack([torch.sin(x), torch.cos(y), torch.sin(x + y), torch.ones_like(x)])  # (4, g, g)
    mixing = torch.randn(channels, 4, generator=g)
    weights = 1.0 + 0.2 * torch.randn(count, 4, 1, 1, generator=g)
    return torch.einsum("cb,nbhw->nchw", mixing, basis.unsqueeze(0) * weights)


def test_sincos_positions_are_distinct_and_bounded():
    pos = sincos_positions(4, 6, 16)
    assert pos.shape == (24, 16) and pos.abs().max() <= 1.0
    assert torch.cdist(pos, pos).add(torch.eye(24)).min() > 1e-3  # every position has its own code
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_positions(2, 2, 10)


def test_restoration_shapes_masking_and_gate():
    torch.manual_seed(0)
    net = RestorationTransformer(12, (8, 8), num_prototypes=16, hidden_size=32, depth=2, num_heads=2).eval()
    features = smooth_features(3)
    net.init_prototypes(features, torch.Generator().manual_seed(0))
    prototype_rows = features.permute(0, 2, 3, 1).reshape(-1, 12)
    # the memory holds real normal feature vectors
    assert (net.prototypes[:, None] - prototype_rows[None]).norm(dim=-1).amin(dim=1).max() < 1e-5
    mask = torch.zeros(3, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1.0
    with torch.no_grad():
        out = net(features, mask)
        unmasked = net(features)
        resized = net.restore(torch.nn.functional.interpolate(features, size=(12, 10)))
    assert out.restoration.shape == features.shape and resized.shape == (3, 12, 12, 10)
    torch.testing.assert_close(out.restored, mask * out.restoration + (1 - mask) * features)
    assert torch.equal(unmasked.restored, unmasked.restoration)  # nothing masked: all restored
    # the mask changes what the network sees: masked positions are restored from context
    assert not torch.allclose(out.restoration, unmasked.restoration)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        RestorationTransformer(12, (7, 8))


def test_restoration_learns_to_restore_corrupted_features():
    """Trained on FASM's corruptions, the network restores clean features (held-out samples) far better than the
    corrupted input is; its output is not confined to the span of the inputs (a decoder, not a convex mix)."""
    torch.manual_seed(0)
    samples = smooth_features(72)  # one distribution (one channel mixing): 64 to train on, 8 held out
    train, held_out = samples[:64], samples[64:]
    net = RestorationTransformer(12, (8, 8), num_prototypes=32, hidden_size=32, depth=2, num_heads=2)
    net.init_prototypes(train, torch.Generator().manual_seed(0))
    fasm = FeatureAnomalySynthesis(corruptions=("noise",), noise_scale=(0.8, 1.2), probability=1.0)
    loss_fn = RestorationLoss([12])
    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=3e-3)

    def held_out_error() -> tuple[float, float]:
        net.eval()
        with torch.no_grad():
            corrupted, mask = fasm(held_out, generator=torch.Generator().manual_seed(5))
            restored = net(corrupted, mask).restoration
        net.train()
        inside = mask.expand_as(held_out).bool()
        return float((restored - held_out)[inside].pow(2).mean()), float((corrupted - held_out)[inside].pow(2).mean())

    before, corruption = held_out_error()
    for _ in range(150):
        batch = train[torch.randint(0, 64, (8,), generator=g)]
        corrupted, mask = fasm(batch, generator=g)
        loss = loss_fn(net(corrupted, mask).restoration, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after, _ = held_out_error()
    assert after < 0.2 * corruption and after < 0.2 * before, (before, after, corruption)
    assert not net.prototypes.requires_grad  # the memory is a statistic of the normal data, not trained


def _fitted(**kwargs) -> tuple[URANet, torch.Tensor]:
    torch.manual_seed(0)
    kwargs = {"ram_network": "transformer", **kwargs}
    model = URANet(image_size=SIZE, num_prototypes=64, num_samples=2, embed_dim=32, num_heads=2, **kwargs).eval()
    with torch.no_grad():
        bank = model.fit_normal_statistics(
            model.feature_extractor(brick_images(12, SIZE)), torch.Generator().manual_seed(0)
        )
    return model, bank


def test_the_residual_is_the_third_signal_and_starts_outside_the_prior():
    model, bank = _fitted()
    assert model.uses_residual_signal and perception_heads(model.uiapm)[0].encoder[1].in_channels == 3
    calibrate_restoration_residual(model, bank)
    with torch.no_grad():
        memory, position = model.raw_distances(bank)
        residual = model.restoration_residual(bank, memory, position)
        signals, prior = model.signals_from_distances(memory, position, residual)
        fused = model.fuse(*model.standardize(memory, position))
    # calibrated on these features: the residual signal is standardized on them
    assert abs(float(signals[:, 2].mean())) < 1e-4 and abs(float(signals[:, 2].std()) - 1.0) < 1e-3
    torch.testing.assert_close(prior, fused)  # residual weight 0: the prior is the fused map
    model.residual_weight.fill_(0.5)
    with torch.no_grad():
        _, prior = model.signals_from_distances(memory, position, residual)
    torch.testing.assert_close(prior, 0.5 * fused + 0.5 * signals[:, 2:])
    with pytest.raises(ValueError, match="needs its residual"):
        model.signals_from_distances(memory, position)
    # the attention RAM keeps the two-signal perception of the first design
    attention, _ = _fitted(ram_network="attention")
    assert not attention.uses_residual_signal and perception_heads(attention.uiapm)[0].encoder[1].in_channels == 2


def test_select_residual_weight_keeps_the_weight_with_the_best_synthetic_ap():
    model, bank = _fitted()
    calibrate_restoration_residual(model, bank)
    defects = bank[:4].clone()
    masks = torch.zeros(4, 1, SIZE, SIZE)
    masks[:, :, 16:40, 16:40] = 1.0
    defects[:, :, 2:5, 2:5] += 3.0 * torch.randn(4, defects.shape[1], 3, 3, generator=torch.Generator().manual_seed(0))
    scores = select_residual_weight(model, bank[4:], defects, masks, weights=(0.0, 0.5))
    assert set(scores) == {0.0, 0.5}
    best = max(scores, key=lambda w: (scores[w], -w))
    assert float(model.residual_weight) == best


def test_checkpoints_without_the_residual_buffers_load(tmp_path):
    """A checkpoint written before the residual signal (no residual_calibration / residual_weight) loads with
    their neutral defaults; the new buffers round-trip."""
    model, bank = _fitted()
    model.residual_calibration.copy_(torch.tensor([2.0, 0.5]))
    model.residual_weight.fill_(0.25)
    path = save_checkpoint(tmp_path / "model.pt", model)
    loaded, _ = load_checkpoint(path)
    assert torch.equal(loaded.residual_calibration, model.residual_calibration)
    assert float(loaded.residual_weight) == 0.25
    state = torch.load(path, weights_only=True)
    older = {k: v for k, v in state.items() if "residual_calibration" not in k and "residual_weight" not in k}
    torch.save(older, tmp_path / "older.pt")
    loaded, _ = load_checkpoint(tmp_path / "older.pt")
    assert loaded.residual_calibration.tolist() == [0.0, 1.0] and float(loaded.residual_weight) == 0.0


@pytest.mark.parametrize("samples,batch,expected", [(25, 8, (3, 100)), (343, 8, (3, 100)), (2000, 8, (3, None))])
def test_the_default_schedule_gives_the_transformer_300_steps(samples, batch, expected):
    # 25 images: 3 full batches a pass, cycled to 100 steps an epoch; 343: 42 -> 100; 2000: 250 a pass, as is
    transformer = types.SimpleNamespace(ram=RestorationTransformer(12, (8, 8), num_prototypes=4, hidden_size=16))
    assert default_schedule(transformer, samples, batch) == expected
    # the attention RAM: plain passes (its default map does not depend on the length)
    attention = types.SimpleNamespace(ram=RestorationAttention(12, num_prototypes=4, embed_dim=8, num_heads=2))
    assert default_schedule(attention, samples, batch) == (3, None)


def test_an_exported_transformer_model_takes_any_batch():
    """TorchScript of the zoo's network_def with the restoration transformer: the same maps as eager, for a batch
    larger than the residual's internal batch size too (no batch loop is baked into the trace)."""
    from ura_monai.networks.nets.export import URANetExport

    model, bank = _fitted()
    calibrate_restoration_residual(model, bank)
    export = URANetExport(model, num_samples=0).eval()
    scripted = torch.jit.script(export)
    for batch in (2, 40):
        images = brick_images(batch, SIZE, seed=3)
        with torch.no_grad():
            torch.testing.assert_close(scripted(images), export(images), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("source", ["perception", "restoration", "restored"])
def test_fast_path_matches_the_transformer_model(source):
    from ura_monai.inference.fast import FastURANet

    model, bank = _fitted(anomaly_map_source=source)
    calibrate_restoration_residual(model, bank)
    images = brick_images(3, SIZE, seed=4)
    with torch.inference_mode():
        torch.manual_seed(7)
        expected = model(images, num_samples=0)
        got = FastURANet(model)(images, num_samples=0)
    for key in ("anomaly_map", "pred_score"):
        torch.testing.assert_close(got[key], expected[key], atol=1e-3, rtol=1e-4)
