"""Tests of URA-Net: FASM, UIAPM, the Bayesian head, RAM, the loss, ablations, checkpoints and the workflow."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata
from torch.distributions import Normal, kl_divergence

from ura_monai.data import make_demo_dataset, mvtec_datalist
from ura_monai.engines.evaluation import test as evaluate
from ura_monai.engines.trainer import URANetTrainer
from ura_monai.engines.workflow import fit
from ura_monai.losses.ura_loss import URANetLoss, gaussian_kl
from ura_monai.networks.blocks.bayesian import BayesianConv2d
from ura_monai.networks.blocks.fasm import FeatureAnomalySynthesis, sample_region_masks
from ura_monai.networks.blocks.feature_extractor import PretrainedFeatureExtractor
from ura_monai.networks.blocks.ram import RestorationAttention
from ura_monai.networks.blocks.uiapm import UncertaintyAnomalyPerception
from ura_monai.networks.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from ura_monai.networks.nets.ura_net import URANet

LEVEL_CHANNELS = (24, 40, 112)


pytestmark = pytest.mark.usefixtures("one_torch_thread")
# a small URA-Net: the architecture of the default one, narrower, so that CPU tests stay fast
SMALL = {
    "perception_hidden": 32,
    "latent_channels": 8,
    "num_samples": 2,
    "num_prototypes": 64,
    "embed_dim": 32,
    "num_heads": 2,
}


def brick_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random crops of skimage's brick texture: (count, 3, size, size) normal images in [0, 1]."""
    brick = torch.from_numpy(skdata.brick().astype(np.float32) / 255.0)
    generator = torch.Generator().manual_seed(seed)
    crops = []
    for _ in range(count):
        top, left = torch.randint(0, brick.shape[0] - 2 * size + 1, (2,), generator=generator).tolist()
        crops.append(brick[top : top + 2 * size, left : left + 2 * size])
    images = F.interpolate(
        torch.stack(crops).unsqueeze(1), size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return images.expand(-1, 3, -1, -1).contiguous()


@pytest.fixture(scope="module")
def brick_features_16() -> torch.Tensor:
    """Real Lite0 features of 24 normal brick crops at 128 px: (24, 176, 16, 16)."""
    extractor = PretrainedFeatureExtractor(image_size=128)
    with torch.no_grad():
        return extractor(brick_images(24, 128))


def max_run(mask: torch.Tensor) -> int:
    """Longest run of set cells along the rows of a (h, w) boolean mask."""
    best = 0
    for row in mask.tolist():
        run = 0
        for value in row:
            run = run + 1 if value else 0
            best = max(best, run)
    return best


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    return F.max_pool2d(mask, 2 * radius + 1, stride=1, padding=radius)


def erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    return -F.max_pool2d(-mask, 2 * radius + 1, stride=1, padding=radius)


# ------------------------------------------------------------------------------------------------- FASM


@pytest.mark.parametrize("kind", ["blob", "box"])
@pytest.mark.parametrize(("size", "area_range"), [((32, 32), (0.05, 0.15)), ((16, 16), (0.01, 0.2))])
def test_region_masks_cover_the_configured_area(kind, size, area_range):
    generator = torch.Generator().manual_seed(0)
    masks = sample_region_masks(64, size, (kind,), area_range, generator)
    assert masks.shape == (64, 1, *size)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    fraction = masks.mean(dim=(1, 2, 3))
    cell = 1.0 / (size[0] * size[1])  # discretisation: rounding box sides, ties of the blob threshold
    lo, hi = area_range
    assert fraction.min() >= 0.85 * lo - cell, fraction.min()
    assert fraction.max() <= 1.15 * hi + cell, fraction.max()
    assert fraction.max() - fraction.min() > 0.3 * (hi - lo)  # the area really is drawn from the range
    if kind == "box":  # a box is one axis-aligned rectangle
        for mask in masks[:, 0]:
            rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
            box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert bool(box.all())


def test_line_masks_are_thin():
    generator = torch.Generator().manual_seed(1)
    masks = sample_region_masks(64, (32, 32), ("line",), (0.05, 0.15), generator)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    for mask in masks[:, 0].bool():
        area = int(mask.sum())
        assert area >= 1
        # one or two cells wide: across the line's main direction, runs are at most a few cells long
        thickness = min(max_run(mask), max_run(mask.T))
        assert thickness <= 4, thickness
        assert area <= 2 * 2 * 2 * 32  # a segment of at most 2 max(h, w) points, 2x2 cells each
    # long lines are much longer than wide
    extents = []
    for mask in masks[:, 0].bool():
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        extents.append(max(int(rows.max() - rows.min()), int(cols.max() - cols.min())) + 1)
    assert max(extents) >= 16


def test_masks_are_never_empty():
    masks = sample_region_masks(32, (8, 8), ("blob", "box", "line"), (0.0, 0.001), torch.Generator().manual_seed(0))
    assert (masks.sum(dim=(1, 2, 3)) >= 1).all()


def positive_features(b: int = 6, c: int = 32, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=generator) + 0.2 * torch.randn(b, c, h, w, generator=generator)


@pytest.mark.parametrize("corruption", ["noise", "shuffle", "mix"])
def test_fasm_changes_features_only_inside_the_mask(corruption):
    features = positive_features()
    fasm = FeatureAnomalySynthesis(corruptions=(corruption,), probability=1.0)
    corrupted, mask = fasm(features, generator=torch.Generator().manual_seed(3))
    assert corrupted.shape == features.shape and mask.shape == (6, 1, 16, 16)
    assert (mask.sum(dim=(1, 2, 3)) > 0).all()
    outside = (mask == 0).expand_as(features)
    assert torch.equal(corrupted[outside], features[outside])
    inside = (mask > 0).expand_as(features)
    assert not torch.equal(corrupted[inside], features[inside])


def test_fasm_noise_norm_is_within_noise_scale():
    features = positive_features()
    lo, hi = 0.3, 1.5
    fasm = FeatureAnomalySynthesis(corruptions=("noise",), noise_scale=(lo, hi), probability=1.0)
    corrupted, mask = fasm(features, generator=torch.Generator().manual_seed(4))
    ratio = (corrupted - features).norm(dim=1) / features.norm(dim=1)  # (B, h, w)
    inside = mask[:, 0] > 0
    assert (ratio[inside] >= lo - 1e-4).all() and (ratio[inside] <= hi + 1e-4).all()
    assert (ratio[~inside] == 0).all()
    # one ratio per sample, drawn over the range
    per_sample = [ratio[i][inside[i]] for i in range(features.shape[0])]
    for r in per_sample:
        torch.testing.assert_close(r, r.mean().expand_as(r), rtol=1e-4, atol=1e-5)
    means = torch.stack([r.mean() for r in per_sample])
    assert means.max() - means.min() > 0.1


def test_fasm_shuffle_uses_features_of_the_batch():
    features = positive_features()
    fasm = FeatureAnomalySynthesis(corruptions=("shuffle",), probability=1.0)
    corrupted, mask = fasm(features, generator=torch.Generator().manual_seed(5))
    c = features.shape[1]
    clean_vectors = features.permute(0, 2, 3, 1).reshape(-1, c)
    inside = (mask[:, 0] > 0).reshape(-1)
    replaced = corrupted.permute(0, 2, 3, 1).reshape(-1, c)[inside]
    # every corrupted vector is exactly one of the batch's clean vectors
    matches = (replaced[:, None, :] == clean_vectors[None, :, :]).all(dim=-1)
    assert matches.any(dim=1).all()
    # ...and mostly not the one that was there (shuffled positions)
    own = torch.nonzero(inside).squeeze(1)
    assert (~matches[torch.arange(own.numel()), own]).float().mean() > 0.9


def test_fasm_probability_zero_gives_empty_masks():
    features = positive_features()
    fasm = FeatureAnomalySynthesis(probability=0.0)
    corrupted, mask = fasm(features, generator=torch.Generator().manual_seed(6))
    assert mask.shape == (6, 1, 16, 16) and mask.sum() == 0
    assert torch.equal(corrupted, features)


def test_fasm_is_deterministic_with_a_seeded_generator():
    features = positive_features()
    fasm = FeatureAnomalySynthesis()
    a = fasm(features, generator=torch.Generator().manual_seed(7))
    b = fasm(features, generator=torch.Generator().manual_seed(7))
    c = fasm(features, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_fasm_rejects_unknown_options():
    with pytest.raises(ValueError, match="circle"):
        FeatureAnomalySynthesis(mask_types=("circle",))
    with pytest.raises(ValueError):
        FeatureAnomalySynthesis(corruptions=())


# ------------------------------------------------------------------------------------------------ UIAPM


def test_uiapm_uncertainty_is_high_at_anomaly_boundaries(brick_features_16):
    torch.manual_seed(0)
    train, held_out = brick_features_16[:16], brick_features_16[16:]
    uiapm = UncertaintyAnomalyPerception(train.shape[1], hidden_channels=32, latent_channels=8, num_samples=4)
    fasm = FeatureAnomalySynthesis(mask_types=("box",), area_range=(0.05, 0.2), probability=1.0)
    loss_function = URANetLoss(LEVEL_CHANNELS, dataset_positions=train.shape[0] * 16 * 16)
    holder = types.SimpleNamespace(uiapm=uiapm)  # the loss only needs model.uiapm
    optimizer = torch.optim.Adam(uiapm.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(250):
        clean = train[torch.randperm(train.shape[0], generator=generator)[:8]]
        corrupted, mask = fasm(clean, generator=generator)
        outputs = {**uiapm(corrupted)._asdict(), "clean": clean, "mask": mask}
        loss = loss_function(outputs, holder)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    uiapm.eval()
    generator = torch.Generator().manual_seed(100)
    ring, deep, p_inside, p_deep = [], [], [], []
    with torch.no_grad():
        for repeat in range(4):
            corrupted, mask = fasm(held_out, generator=generator)
            torch.manual_seed(repeat)
            out = uiapm(corrupted, num_samples=16)
            boundary = (dilate(mask, 1) > 0) & (erode(mask, 1) == 0)  # cells within 1 of the mask edge
            far = dilate(mask, 2) == 0  # cells >= 3 away from any mask cell
            core = erode(mask, 1) > 0
            ring.append(out.uncertainty[boundary])
            deep.append(out.uncertainty[far])
            p_inside.append(out.probability[core])
            p_deep.append(out.probability[far])
    ring_u, deep_u = torch.cat(ring).mean(), torch.cat(deep).mean()
    assert torch.cat(p_inside).mean() > 0.5 > torch.cat(p_deep).mean()  # it learned to perceive the anomalies
    assert ring_u > 1.5 * deep_u, (ring_u, deep_u)


def test_uiapm_without_samples_is_deterministic():
    torch.manual_seed(0)
    uiapm = UncertaintyAnomalyPerception(32, hidden_channels=16, latent_channels=4, num_samples=4)
    features = torch.randn(2, 32, 8, 8)
    a = uiapm(features, num_samples=0)
    b = uiapm(features, num_samples=0)
    assert a.logits.shape == (2, 1, 1, 8, 8)
    assert a.probability.shape == a.uncertainty.shape == (2, 1, 8, 8)
    assert torch.equal(a.uncertainty, torch.zeros_like(a.uncertainty))
    assert torch.equal(a.probability, b.probability) and torch.equal(a.logits, b.logits)
    torch.testing.assert_close(a.probability, torch.sigmoid(a.logits[:, 0]))
    # stochastic passes: T logits, a non-zero uncertainty in [0, 1], the probability their mean
    s = uiapm(features)
    assert s.logits.shape == (2, 4, 1, 8, 8)
    assert (s.uncertainty > 0).any() and (s.uncertainty >= 0).all() and (s.uncertainty <= 1).all()
    torch.testing.assert_close(s.probability, torch.sigmoid(s.logits).mean(dim=1))


def test_gaussian_kl():
    torch.manual_seed(0)
    mean, logvar, prior = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    kl = gaussian_kl(mean, logvar, prior)
    reference = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(prior, torch.ones_like(prior))).sum(1).mean()
    torch.testing.assert_close(kl, reference)
    assert kl > 0
    assert gaussian_kl(prior, torch.zeros_like(logvar), prior) == 0
    for _ in range(20):
        assert gaussian_kl(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4) * 3, torch.randn(2, 3, 4, 4)) >= 0


def test_uiapm_priors():
    uiapm = UncertaintyAnomalyPerception(8, hidden_channels=8, latent_channels=4, prior_distance=6.0)
    mask = torch.tensor([[[[0.0, 1.0]]]])
    prior = uiapm.prior_mean(mask)  # (1, 4, 1, 2)
    torch.testing.assert_close(prior[..., 0], -prior[..., 1])
    torch.testing.assert_close((prior[..., 1] - prior[..., 0]).norm(), torch.tensor(6.0))


# --------------------------------------------------------------------------------------- Bayesian layer


def test_bayesian_conv_kl_matches_hand_computation():
    layer = BayesianConv2d(2, 1, kernel_size=1, prior_sigma=0.5)
    with torch.no_grad():
        layer.weight_mu.copy_(torch.tensor([0.3, -0.2]).view(1, 2, 1, 1))
        layer.weight_rho.copy_(torch.tensor([-1.0, 0.5]).view(1, 2, 1, 1))
        layer.bias_mu.fill_(0.1)
        layer.bias_rho.fill_(-2.0)
    prior = 0.5
    expected = 0.0
    for mu, rho in ((0.3, -1.0), (-0.2, 0.5), (0.1, -2.0)):
        sigma = math.log1p(math.exp(rho))
        expected += math.log(prior / sigma) + (sigma**2 + mu**2) / (2 * prior**2) - 0.5
    assert layer.kl_divergence().item() == pytest.approx(expected, rel=1e-5)
    # and it is KL(q || p) of torch.distributions
    mus, sigmas = torch.tensor([0.3, -0.2, 0.1]), F.softplus(torch.tensor([-1.0, 0.5, -2.0]))
    reference = kl_divergence(Normal(mus, sigmas), Normal(torch.zeros(3), torch.full((3,), prior))).sum()
    assert layer.kl_divergence().item() == pytest.approx(reference.item(), rel=1e-5)


def test_bayesian_conv_sampling_moments():
    torch.manual_seed(0)
    layer = BayesianConv2d(2, 1, kernel_size=1, init_sigma=0.3)
    x = torch.tensor([1.0, -2.0]).view(1, 2, 1, 1).expand(20000, -1, -1, -1)
    mean = layer(x[:1], sample=False).item()
    samples = layer(x).flatten()
    expected_std = math.sqrt(0.3**2 * (1.0 + 4.0) + 0.3**2)  # weights' and bias' variances
    assert samples.mean().item() == pytest.approx(mean, abs=0.03)
    assert samples.std().item() == pytest.approx(expected_std, rel=0.03)
    assert layer(x[:1], sample=False).item() == mean  # the posterior mean is deterministic


# -------------------------------------------------------------------------------------------------- RAM


def small_ram(seed: int = 0, channels: int = 16, exclude_radius: int = 1) -> RestorationAttention:
    torch.manual_seed(seed)
    return RestorationAttention(
        channels, num_prototypes=8, embed_dim=16, num_heads=2, exclude_radius=exclude_radius
    ).eval()


def test_ram_restoration_is_a_convex_combination():
    ram = small_ram()
    torch.manual_seed(1)
    features = torch.randn(3, 16, 8, 8) * torch.linspace(0.1, 3.0, 16).view(1, 16, 1, 1) + 2.0
    probability, uncertainty = torch.rand(3, 1, 8, 8), torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        out = ram(features, probability, uncertainty)
    protos = ram.prototypes.detach()
    for i in range(3):
        values = torch.cat([features[i].flatten(1).T, protos])  # (N + K, C)
        lo, hi = values.min(0).values.view(16, 1, 1), values.max(0).values.view(16, 1, 1)
        assert (out.restoration[i] >= lo - 1e-5).all() and (out.restoration[i] <= hi + 1e-5).all()
    torch.testing.assert_close(out.restored, probability * out.restoration + (1 - probability) * features)

    # perception off: every position is restored
    with torch.no_grad():
        out = ram(features)
    assert torch.equal(out.restored, out.restoration)


def test_ram_with_all_positions_anomalous_restores_from_prototypes():
    ram = small_ram()
    torch.manual_seed(2)
    features = torch.randn(2, 16, 8, 8) + 50.0  # image values far from the prototypes (~N(0, 0.1))
    with torch.no_grad():
        out = ram(features, torch.ones(2, 1, 8, 8))
    protos = ram.prototypes.detach()
    lo, hi = protos.min(0).values.view(1, 16, 1, 1), protos.max(0).values.view(1, 16, 1, 1)
    # the image positions keep only the 1e-4 floor of trust: their weight is well below 1%
    assert (out.restoration >= lo - 0.5).all() and (out.restoration <= hi + 0.5).all()
    torch.testing.assert_close(out.restored, out.restoration)


def test_ram_excludes_the_query_neighbourhood():
    features = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3)) * 0.5
    spike = torch.zeros(16)
    spike[0] = 1000.0
    planted = features.clone()
    planted[:, :, 2:5, 2:5] = spike.view(16, 1, 1)  # the 8 neighbours of (3, 3) ...
    planted[:, :, 3, 3] = features[:, :, 3, 3]  # ... around an ordinary query
    for seed in range(3):
        ram = small_ram(seed)
        normal_max = torch.cat([features.abs().max().view(1), ram.prototypes.detach().abs().max().view(1)]).max()
        with torch.no_grad():
            out = ram(planted)
        # the spike sits only in the excluded neighbourhood of (3, 3): it gets exactly zero weight there
        assert (out.restoration[:, 0, 3, 3].abs() <= normal_max + 1e-4).all()
        # elsewhere the spike is visible context and does pull restorations (the check above is not vacuous)
        assert (out.restoration[:, 0, 7, 7] > 10.0).all()
        # with a radius of 0 only the query itself is excluded, so the neighbours leak in
        ram0 = small_ram(seed, exclude_radius=0)
        with torch.no_grad():
            assert (ram0(planted).restoration[:, 0, 3, 3] > 10.0).all()


def test_ram_ignores_regions_perceived_as_anomalous():
    features = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4)) * 0.5
    spike = torch.zeros(16)
    spike[0] = 1000.0
    features[:, :, 0:3, 0:3] = spike.view(16, 1, 1)
    probability = torch.zeros(2, 1, 8, 8)
    probability[:, :, 0:3, 0:3] = 1.0
    elsewhere = probability[0, 0] == 0
    for seed in range(3):
        ram = small_ram(seed)
        with torch.no_grad():
            ignored = ram(features, probability).restoration[:, 0][:, elsewhere]
            trusted = ram(features, torch.zeros_like(probability)).restoration[:, 0][:, elsewhere]
        # attention weight on the anomalous region ~0: the 1000-spike moves restorations by < 1
        assert ignored.abs().max() < 1.0 + features[:, 0][:, elsewhere].abs().max()
        assert ignored.abs().max() < 2.5
        # trusted, the same region dominates the restorations
        assert trusted.min() > 10.0


def test_ram_init_prototypes_draws_normal_features():
    ram = small_ram()
    features = torch.randn(2, 16, 2, 2)  # 8 tokens for 8 prototypes
    ram.init_prototypes(features, torch.Generator().manual_seed(0))
    tokens = features.permute(0, 2, 3, 1).reshape(-1, 16)
    assert torch.equal(ram.prototypes.detach().sort(0).values, tokens.sort(0).values)
    few = torch.randn(1, 16, 1, 3)  # fewer tokens than prototypes: repeated
    ram.init_prototypes(few)
    assert ((ram.prototypes.detach()[:, None] == few.flatten(2).transpose(1, 2)).all(-1).any(-1)).all()


@pytest.mark.parametrize("mode", ["chunked", "sdpa"])
@pytest.mark.parametrize("distance", [True, False])
@pytest.mark.parametrize("exclude_radius", [0, 1, 2])
def test_ram_attention_modes_agree_with_the_reference(mode, distance, exclude_radius):
    """The module's inference attention modes give the reference maths (restoration and restored), with and
    without perception, on a non-square grid; the mode is a switch of the module, not of its weights."""
    torch.manual_seed(0)
    kwargs = {
        "num_prototypes": 8,
        "embed_dim": 16,
        "num_heads": 2,
        "exclude_radius": exclude_radius,
        "distance_attention": distance,
    }
    reference = RestorationAttention(16, **kwargs).eval()
    with torch.no_grad():
        reference.log_temperature.fill_(-1.0)
    fast = RestorationAttention(16, attention=mode, **kwargs).eval()
    fast.load_state_dict(reference.state_dict())
    features = torch.randn(3, 16, 5, 7) + 1.0
    probability, uncertainty = torch.rand(3, 1, 5, 7), torch.rand(3, 1, 5, 7) * 0.5
    with torch.inference_mode():
        for p, u in ((None, None), (probability, None), (probability, uncertainty)):
            expected, got = reference(features, p, u), fast(features, p, u)
            for name in ("restoration", "restored"):
                assert torch.allclose(getattr(got, name), getattr(expected, name), atol=1e-5), (
                    name,
                    p is None,
                    u is None,
                )
            # the token entry point, with the mode passed per call, and small blocks of queries
            tokens = features.flatten(2).transpose(1, 2)
            blocked = reference.restore_tokens(tokens, (5, 7), p, u, attention=mode, block_elements=2 * 8 * 43)
            assert torch.allclose(blocked, expected.restoration.flatten(2).transpose(1, 2), atol=1e-5)


def test_ram_attention_mode_errors():
    with pytest.raises(ValueError, match="attention must be one of"):
        RestorationAttention(16, num_prototypes=8, embed_dim=16, num_heads=2, attention="flash")
    ram = small_ram()
    features = torch.randn(1, 16, 4, 4)
    with pytest.raises(ValueError, match="attention must be one of"):
        ram.restore_tokens(features.flatten(2).transpose(1, 2), (4, 4), attention="flash")
    # the inference modes have no autograd: a clear error when gradients are on, none under no_grad
    ram.attention = "chunked"
    with pytest.raises(RuntimeError, match="for inference"):
        ram(features)
    with torch.no_grad():
        assert ram(features).restoration.shape == features.shape


# ------------------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("perception_input", ["features", "signals"])
def test_training_steps_lower_the_loss(perception_input):
    # the main loop trains the RAM, and the perception module when it reads features (the signal perception has
    # its own stage, engines/perception.py)
    torch.manual_seed(0)
    model = URANet(image_size=64, **SMALL, perception_input=perception_input)
    with torch.no_grad():
        bank = model.feature_extractor(brick_images(16, 64))
    model.init_prototypes(bank, torch.Generator().manual_seed(0))
    loss_function = URANetLoss(model.level_channels, dataset_positions=bank.shape[0] * 64)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    history = []
    for _ in range(20):
        batch = bank[torch.randperm(bank.shape[0], generator=generator)[:8]]
        outputs = model.forward_features(batch, synthesize=True, generator=generator)
        terms = loss_function(outputs, model)
        perception_terms = {"focal", "dice", "kl", "weight_kl"} if perception_input == "features" else set()
        assert set(terms) == {"restored", "restoration", "loss"} | perception_terms
        torch.testing.assert_close(terms["loss"], sum(v for k, v in terms.items() if k != "loss"))
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        history.append(terms["loss"].item())
    assert all(math.isfinite(v) for v in history)
    first, last = np.mean(history[:3]), np.mean(history[-3:])
    assert last < 0.95 * first, history


# -------------------------------------------------------------------------------------------- ablations


@pytest.mark.parametrize(
    "switches",
    [{}, {"use_fasm": False}, {"use_uiapm": False}, {"use_ram": False}, {"use_fasm": False, "use_ram": False}],
    ids=["full", "no_fasm", "no_uiapm", "no_ram", "no_fasm_no_ram"],
)
def test_ablations_train_and_infer(switches):
    # the main loop's ablations, with the perception module on features so that every module trains here
    torch.manual_seed(0)
    model = URANet(
        image_size=64, pretrained=False, **SMALL, perception_input="features", anomaly_map_source="fused", **switches
    )
    assert (model.fasm is None) == (switches.get("use_fasm") is False)
    assert (model.uiapm is None) == (switches.get("use_uiapm") is False)
    assert (model.ram is None) == (switches.get("use_ram") is False)
    images = torch.rand(4, 3, 64, 64)
    loader = torch.utils.data.DataLoader([{"image": image} for image in images], batch_size=4)
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.Adam(trainable, lr=1e-3)
    trainer = URANetTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=loader,
        network=model,
        optimizer=optimizer,
        loss_function=URANetLoss(model.level_channels),
        generator=torch.Generator().manual_seed(0),
    )
    trainer.run()
    output = trainer.state.output
    assert math.isfinite(float(output["loss"]))
    assert ("restored" in output) == (model.ram is not None)
    assert ("focal" in output) == (model.uiapm is not None)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable))

    model.eval()
    with torch.no_grad():
        result = model(images[:2])
    assert result["anomaly_map"].shape == (2, 1, 64, 64)
    assert result["uncertainty_map"].shape == (2, 1, 64, 64)
    assert result["pred_score"].shape == (2,)
    assert ("perception_map" in result) == (model.uiapm is not None)
    if model.uiapm is None:
        assert torch.equal(result["uncertainty_map"], torch.zeros_like(result["uncertainty_map"]))
    else:
        assert result["perception_map"].shape == (2, 1, 64, 64)
    assert all(torch.isfinite(v).all() for v in result.values())


def test_ablation_without_uiapm_and_ram_is_rejected():
    with pytest.raises(ValueError, match="at least one"):
        URANet(image_size=64, pretrained=False, use_uiapm=False, use_ram=False)
    with pytest.raises(ValueError, match="perception"):
        URANet(
            image_size=64,
            pretrained=False,
            use_uiapm=False,
            anomaly_map_source="perception",
            perception_input="features",
        )
    # without UIAPM the signal perception's map is the fused map it would correct
    assert URANet(image_size=64, pretrained=False, use_uiapm=False).anomaly_map_source == "fused"
    assert URANet(image_size=64, pretrained=False, use_uiapm=False, position_model=False).anomaly_map_source == "memory"
    with pytest.raises(ValueError, match="position_model"):
        URANet(image_size=64, pretrained=False, use_ram=False, position_model=False)


def test_the_grid_score_reads_the_grid_map_and_the_pixel_score_the_pixel_map():
    model = URANet(image_size=64, score_map="grid", **SMALL).eval()
    grid = torch.zeros(2, 1, 8, 8)
    grid[0, 0, 3, 4] = 1.0  # a defect of one feature cell
    pixel = model.map_generator(grid, (64, 64), guide=torch.full((2, 3, 64, 64), 0.5))
    assert float(pixel.max()) < 0.6  # the refined map of a flat image dilutes it ...
    assert torch.equal(model.score_images(grid, pixel), torch.tensor([1.0, 0.0]))  # ... the grid score does not
    assert torch.equal(
        URANet(image_size=64, score_map="pixel", **SMALL).score_images(grid, pixel), pixel.amax((1, 2, 3))
    )
    # the forward's grid score is the maximum of its grid map, the signal perception's logit
    images = brick_images(2, 64, seed=3)
    features = model.fit_normal_statistics(model.feature_extractor(images))
    with torch.no_grad():
        expected = model.signal_perception(features, 0)[0].amax((1, 2, 3))
        assert torch.allclose(model(images, num_samples=0)["pred_score"], expected, atol=1e-5)


# ------------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = URANet(image_size=64, **{**SMALL, "num_samples": 4})
    images = brick_images(4, 64, seed=1)
    with torch.no_grad():
        bank = model.fit_normal_statistics(model.feature_extractor(images))
    loss_function = URANetLoss(model.level_channels)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):  # move the weights away from their initial values
        loss = loss_function(model.forward_features(bank, synthesize=True), model)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()

    path = save_checkpoint(tmp_path / "model.pt", model, {"image_threshold": 0.25}, {"note": "test"})
    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors, numbers and strings only
    # the frozen backbone is not stored; its level scale (a statistic of the training data) is
    assert [k for k in raw if k.startswith("network.feature_extractor.")] == ["network.feature_extractor.level_scale"]
    assert not torch.allclose(raw["network.feature_extractor.level_scale"], torch.ones(()))
    assert raw["image_threshold"].item() == 0.25 and math.isnan(raw["pixel_threshold"].item())  # statistics as tensors
    loaded, checkpoint = load_checkpoint(path)
    assert not loaded.training
    assert checkpoint["postprocessing"] == {"image_threshold": 0.25} and checkpoint["extra"] == {"note": "test"}
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    with torch.no_grad():
        a, b = model(images, num_samples=0), loaded(images, num_samples=0)
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key]), key
        torch.manual_seed(11)
        a = model(images)
        torch.manual_seed(11)
        b = loaded(images)
    assert (a["uncertainty_map"] > 0).any()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    # inference overrides at load time
    fast, _ = load_checkpoint(path, num_samples=0, score_mode="topk_mean")
    assert fast.uiapm.num_samples == 0 and fast.score_mode == "topk_mean"


def test_checkpoint_without_level_scale_loads_with_raw_levels(tmp_path):
    # checkpoints written before level equalization existed: no scale stored, none in the config
    model = URANet(image_size=64, **SMALL).eval()
    model.fit_normal_statistics(model.feature_extractor(brick_images(2, 64)))
    path = save_checkpoint(tmp_path / "model.pt", model, {}, {})
    raw = torch.load(path, map_location="cpu", weights_only=True)
    del raw["network.feature_extractor.level_scale"]
    del raw["_extra_state"]["config"]["equalize_levels"]
    torch.save(raw, path)
    loaded, _ = load_checkpoint(path)
    assert torch.equal(loaded.feature_extractor.level_scale, torch.ones(loaded.feature_extractor.out_channels))


def test_checkpoint_without_score_map_or_coreset_loads_as_it_was_written(tmp_path):
    # checkpoints written before the grid score (their stored image threshold is on the smoothed map's scale) and
    # before the coreset memory (their thresholds' cross-fitted memories were drawn at random)
    model = URANet(image_size=64, **SMALL).eval()
    assert model.score_map == "grid_and_position" and model.memory_coreset
    path = save_checkpoint(tmp_path / "model.pt", model, {"image_threshold": 1.0}, {})
    raw = torch.load(path, map_location="cpu", weights_only=True)
    del raw["_extra_state"]["config"]["score_map"], raw["_extra_state"]["config"]["memory_coreset"]
    torch.save(raw, path)
    loaded, checkpoint = load_checkpoint(path)
    assert loaded.score_map == "pixel" and not loaded.memory_coreset
    assert checkpoint["config"]["score_map"] == "pixel" and checkpoint["config"]["memory_coreset"] is False
    # into a network (the bundle's network_def) that scores otherwise, the load names the setting to override
    from ura_monai.networks.nets.export import URANetExport

    with pytest.raises(ValueError, match="score_map"):
        URANetExport(URANet(image_size=64, **SMALL)).load_state_dict(torch.load(path, weights_only=True))
    URANetExport(URANet(image_size=64, score_map="pixel", **SMALL)).load_state_dict(torch.load(path, weights_only=True))


def test_checkpoint_without_perception_members_loads_its_one_head(tmp_path):
    # checkpoints written before the perception ensemble have one head's keys and no perception_members
    model = URANet(image_size=64, perception_members=1, **SMALL).eval()
    with torch.no_grad():
        model.uiapm.classifier.weight_mu.normal_()
    path = save_checkpoint(tmp_path / "model.pt", model, {}, {})
    raw = torch.load(path, map_location="cpu", weights_only=True)
    del raw["_extra_state"]["config"]["perception_members"]
    torch.save(raw, path)
    loaded, checkpoint = load_checkpoint(path)
    assert checkpoint["config"]["perception_members"] == 1 and isinstance(loaded.uiapm, UncertaintyAnomalyPerception)
    torch.testing.assert_close(loaded.uiapm.classifier.weight_mu, model.uiapm.classifier.weight_mu)
    # into the default network (an ensemble: the bundle's network_def), the load names the setting to override
    from ura_monai.networks.nets.export import URANetExport

    with pytest.raises(ValueError, match="perception_members"):
        URANetExport(URANet(image_size=64, **SMALL)).load_state_dict(torch.load(path, weights_only=True))


def test_checkpoint_without_guided_radius_keeps_its_gaussian_map(tmp_path):
    # checkpoints written before the guided filter smoothed their maps with the Gaussian alone (their stored sigma)
    model = URANet(image_size=64, guided_radius=0, sigma=4.0, **SMALL).eval()
    path = save_checkpoint(tmp_path / "model.pt", model, {}, {})
    raw = torch.load(path, map_location="cpu", weights_only=True)
    del raw["_extra_state"]["config"]["guided_radius"], raw["_extra_state"]["config"]["guided_eps"]
    torch.save(raw, path)
    loaded, checkpoint = load_checkpoint(path)
    assert checkpoint["config"]["guided_radius"] == 0 and not loaded.map_generator.needs_guide
    grid = torch.rand(1, 1, 8, 8)
    torch.testing.assert_close(loaded.map_generator(grid, (64, 64)), model.map_generator(grid, (64, 64)))
    # the default network refines its map with the image, so it cannot make one without it
    with pytest.raises(ValueError, match="guide"):
        URANet(image_size=64, **SMALL).map_generator(grid, (64, 64))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")
    other = tmp_path / "other.pt"
    torch.save({"format": "something/else"}, other)
    with pytest.raises(ValueError, match="not a URA-Net checkpoint"):
        load_checkpoint(other)


def test_first_format_checkpoints_still_load(tmp_path):
    # the format written before checkpoints became the export wrapper's state dict (ura_monai.uranet/1)
    from ura_monai.networks.nets.export import URANetExport

    model = URANet(image_size=64, **SMALL).eval()
    model.fit_normal_statistics(model.feature_extractor(brick_images(2, 64)))
    old = {
        "format": "ura_monai.uranet/1",
        "config": model.config,
        "state_dict": {k: v.clone() for k, v in model.trainable_state_dict().items()},
        "postprocessing": {"image_threshold": 0.5, "pixel_max": 2.0},
        "extra": {"epoch": 3},
    }
    torch.save(old, tmp_path / "old.pt")
    loaded, checkpoint = load_checkpoint(tmp_path / "old.pt")
    assert checkpoint["format"] == "ura_monai.uranet/1" and checkpoint["extra"] == {"epoch": 3}
    assert checkpoint["postprocessing"] == {"image_threshold": 0.5, "pixel_max": 2.0}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    wrapper = URANetExport(URANet(image_size=64, **SMALL), num_samples=0)
    wrapper.load_state_dict(torch.load(tmp_path / "old.pt", weights_only=True))
    assert torch.equal(wrapper.network.ram.prototypes, model.ram.prototypes)
    assert (
        float(wrapper.image_threshold) == 0.5
        and float(wrapper.pixel_max) == 2.0
        and math.isnan(float(wrapper.image_min))
    )
    # re-saved in the current format, the same model and statistics
    save_checkpoint(tmp_path / "new.pt", loaded, checkpoint["postprocessing"], checkpoint["extra"])
    again = read_checkpoint(tmp_path / "new.pt")
    assert again["postprocessing"] == checkpoint["postprocessing"] and again["config"] == model.config


# ---------------------------------------------------------------------------------------------- workflow


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    root = make_demo_dataset(
        tmp_path_factory.mktemp("demo64"), n_train=10, n_test_good=2, n_test_defect=3, image_size=64, seed=1
    )
    return mvtec_datalist(root, None, "train"), mvtec_datalist(root, None, "test")


@pytest.mark.parametrize("fusion_weight", [0.5, None])
def test_the_fusion_weight_is_chosen_on_synthetic_defects_only_when_configured_none(small_demo, fusion_weight):
    from ura_monai.engines.calibration import fusion_weight_from_items
    from ura_monai.engines.loaders import image_loader

    train, _ = small_demo
    model = URANet(image_size=64, fusion_weight=fusion_weight, **SMALL).eval()
    images = torch.cat([batch["image"] for batch in image_loader(train[:7], 64, 8, 0)])
    model.fit_normal_statistics(model.feature_extractor(images), torch.Generator().manual_seed(0))
    scores = fusion_weight_from_items(model, train[7:], 64)
    best = max(scores, key=lambda w: (scores[w], -float(w)))
    assert best != "0.5"  # the synthetic defects prefer another weight here, so the two cases differ
    assert model.fusion_weight.item() == (float(best) if fusion_weight is None else 0.5)


def test_fit_is_deterministic(small_demo, tmp_path):
    train_items, _ = small_demo
    kwargs = {"image_size": 64, "epochs": 2, "batch_size": 4, "seed": 3, "progress": False, "model_kwargs": SMALL}
    first = fit(train_items, tmp_path / "a", **kwargs)
    second = fit(train_items, tmp_path / "b", **kwargs)
    a = read_checkpoint(first["checkpoint"])
    b = read_checkpoint(second["checkpoint"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["postprocessing"] == b["postprocessing"]
    assert first["losses"] == second["losses"]
    # a different seed gives a different model (the comparison above is not vacuous)
    third = fit(train_items, tmp_path / "c", **{**kwargs, "seed": 4, "epochs": 1})
    c = read_checkpoint(third["checkpoint"])
    assert not all(torch.equal(a["state_dict"][k], c["state_dict"][k]) for k in a["state_dict"])


def test_fit_resumes_from_the_last_epoch(small_demo, tmp_path, monkeypatch):
    train_items, _ = small_demo
    iterations: list[int] = []
    original = URANetTrainer._iteration

    def counting(self, engine, batchdata):
        iterations.append(engine.state.epoch)
        return original(self, engine, batchdata)

    monkeypatch.setattr(URANetTrainer, "_iteration", counting)
    kwargs = {"image_size": 64, "batch_size": 4, "seed": 0, "progress": False, "model_kwargs": SMALL}
    fit(train_items, tmp_path, epochs=2, **kwargs)
    assert sorted(set(iterations)) == [1, 2]
    per_epoch = len(iterations) // 2
    assert per_epoch >= 1 and len(iterations) == 2 * per_epoch
    assert sorted(p.name for p in (tmp_path / "train_state").iterdir()) == ["train_state.pt"]
    saved = torch.load(tmp_path / "train_state" / "train_state.pt", weights_only=True)
    assert saved["trainer"]["iteration"] == 2 * per_epoch  # ignite keeps the iteration; epoch = iteration / length
    assert saved["trainer"]["epoch_length"] == per_epoch

    iterations.clear()
    result = fit(train_items, tmp_path, epochs=3, resume=True, **kwargs)
    # only the third epoch ran
    assert iterations == [3] * per_epoch
    # one state file, replaced atomically after every epoch
    saved = torch.load(tmp_path / "train_state" / "train_state.pt", weights_only=True)
    assert saved["trainer"]["iteration"] == 3 * per_epoch and saved["trainer"]["max_epochs"] == 3
    assert (tmp_path / "model.pt").is_file() and result["checkpoint"] == str(tmp_path / "model.pt")


# --------------------------------------------------------------------------------------------- detection


def test_fit_without_ram_trains_the_signal_perception_only(small_demo, tmp_path):
    # no RAM: the main loop has nothing to train, the perception stage still learns from synthetic defects
    train_items, _ = small_demo
    model_kwargs = {**SMALL, "use_ram": False}
    result = fit(
        train_items, tmp_path, image_size=64, epochs=1, batch_size=4, progress=False, model_kwargs=model_kwargs
    )
    checkpoint = read_checkpoint(result["checkpoint"])
    assert result["losses"] == {} and checkpoint["config"]["use_ram"] is False
    # 9 training images (one held out for the thresholds), each painted synthetic_variants(9, 400, fewest=2) = 16 times
    assert checkpoint["extra"]["perception_training"]["defects"] == 9 * 16
    heads = [v for k, v in checkpoint["state_dict"].items() if k.startswith("uiapm.") and "classifier.weight_mu" in k]
    assert len(heads) == 4 and all(torch.count_nonzero(weights) > 0 for weights in heads)


@pytest.mark.slow
def test_detects_demo_anomalies(tmp_path):
    root = make_demo_dataset(tmp_path / "data", image_size=128, seed=0)
    train_items = mvtec_datalist(root, None, "train")
    test_items = mvtec_datalist(root, None, "test")
    result = fit(train_items, tmp_path / "run", image_size=128, epochs=10, progress=False)
    metrics = evaluate(result["checkpoint"], test_items, progress=False)
    assert metrics["test_images"] == len(test_items) == 20
    assert metrics["image_auroc"] > 0.9, metrics
    # localization, not just detection: 0.9964 / 0.9802 measured; the former 3x3 feature smoothing gave
    # 0.9911 / 0.953 on this same run, so a regression in how sharply maps localize fails here
    assert metrics["pixel_auroc"] > 0.99, metrics
    assert metrics["aupro"] > 0.97, metrics
