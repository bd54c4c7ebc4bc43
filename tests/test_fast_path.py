"""The fast inference path (ura_monai.inference.fast) against the reference path (URANet.forward), on the CPU.

fp32 fast paths must give the reference maps within 1e-3 (they agree to ~1e-6); bf16 autocast on the CPU is
checked with a looser tolerance (below). The GPU fast paths (bf16/fp16 autocast, SDPA kernels, CUDA graphs) are
checked against the CPU fp32 reference by ``bench/gpu_check.sh`` (``bench/throughput.py --check --check-all``).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from ura_monai.inference.fast import FastURANet, fast_restoration, smoothing_matrix, token_residual
from ura_monai.networks.blocks.anomaly_map import AnomalyMapGenerator, feature_residual
from ura_monai.networks.blocks.ram import RestorationAttention
from ura_monai.networks.blocks.uiapm import perception_heads
from ura_monai.networks.nets.ura_net import URANet
from ura_monai.networks.nets.ura_net_options import MAP_SOURCES

TOL = 1e-3
# bf16 autocast on the CPU: the backbone and UIAPM run in bf16 (8-bit mantissa), so features differ from fp32 by
# ~1e-2 relative; maps are compared relative to their range
BF16_RELATIVE_TOL = 0.1

SMALL = {"perception_hidden": 32, "latent_channels": 8, "num_prototypes": 64, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(image_size: int = 64, seed: int = 0, **overrides) -> URANet:
    torch.manual_seed(seed)
    config = {**SMALL, "num_samples": 0, "image_size": image_size, "pretrained": False, **overrides}
    model = URANet(**config).eval()
    with torch.no_grad():  # a trained-looking temperature and perception head, so every bias term matters
        if isinstance(model.ram, RestorationAttention):
            model.ram.log_temperature.fill_(-2.0)
        for k, head in enumerate(perception_heads(model.uiapm) if model.uiapm is not None else []):
            head.classifier.bias_mu.fill_(-0.5 - 0.2 * k)  # heads of an ensemble that disagree
            head.classifier.weight_mu.mul_(20.0)
    return model


def images(batch: int = 3, height: int = 64, width: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, height, width, generator=g)
    x[:, :, height // 4 : height // 2, width // 3 : width // 2] = (
        1.0 - x[:, :, height // 4 : height // 2, width // 3 : width // 2]
    )
    return x


def reference(model: URANet, x: torch.Tensor, num_samples: int | None = None, seed: int = 7) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    with torch.inference_mode():
        return model(x, num_samples=num_samples)


def fast(
    model: URANet, x: torch.Tensor, num_samples: int | None = None, seed: int = 7, **options
) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return FastURANet(model, **options)(x, num_samples=num_samples)


def assert_same(out: dict, ref: dict, tol: float = TOL) -> None:
    assert set(out) == set(ref)
    for key in ref:
        assert out[key].shape == ref[key].shape, key
        assert out[key].dtype == torch.float32, key
        err = (out[key] - ref[key].float()).abs().max().item()
        assert err <= tol, f"{key}: max abs error {err:.3g} > {tol}"


# ------------------------------------------------------------------------------------------- building blocks
@pytest.mark.parametrize("sigma", [4.0, 1.5, 0.0])
@pytest.mark.parametrize("grid,size", [(8, 64), (16, 128), (12, 96)])
def test_smoothing_matrix_is_the_map_generator(sigma, grid, size):
    generator = AnomalyMapGenerator(sigma)
    grid_map = torch.rand(2, 1, grid, grid + 4)
    a_y, a_x = smoothing_matrix(grid, size, generator), smoothing_matrix(grid + 4, size + 32, generator)
    expected = generator(grid_map, (size, size + 32))
    assert torch.allclose(a_y @ grid_map @ a_x.t(), expected, atol=1e-5)


def test_token_residual_is_feature_residual():
    torch.manual_seed(0)
    f, r = torch.randn(2, 176, 8, 8), torch.randn(2, 176, 8, 8)
    r[0, :, 0, 0] = 0.0  # a zero vector: the eps clamp
    expected = feature_residual(f, r, (24, 40, 112))
    got = token_residual(f.flatten(2).transpose(1, 2), r.flatten(2).transpose(1, 2), (24, 40, 112)).view(2, 1, 8, 8)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("attention", ["chunked", "sdpa"])
@pytest.mark.parametrize("distance", [True, False])
@pytest.mark.parametrize("with_probability", [True, False])
def test_fast_restoration_matches_the_module(attention, distance, with_probability):
    torch.manual_seed(0)
    model = make_model(distance_attention=distance, ram_network="attention")
    ram = model.ram
    features = torch.randn(3, ram.channels, 8, 8) + 1.0
    probability = torch.rand(3, 1, 8, 8) if with_probability else None
    uncertainty = torch.rand(3, 1, 8, 8) * 0.5 if with_probability else None
    with torch.inference_mode():
        expected = ram(features, probability, uncertainty).restoration
        tokens = features.flatten(2).transpose(1, 2)
        # small blocks: several images per block, and several query blocks per image
        for block in (None, 2 * 64 * 128 + 1, 2 * 16 * 128):
            got = fast_restoration(ram, tokens, (8, 8), probability, uncertainty, attention, block_elements=block)
            assert torch.allclose(got.transpose(1, 2).reshape(expected.shape), expected, atol=1e-5), block


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize(
    "residual,source,distance", list(itertools.product(["l2", "cosine"], MAP_SOURCES, [True, False]))
)
@pytest.mark.parametrize("attention", ["chunked", "sdpa"])
def test_fast_path_matches_reference(residual, source, distance, attention):
    """The attention RAM's inference kernels in the fast path (the restoration transformer: the tests below)."""
    model = make_model(
        residual=residual, anomaly_map_source=source, distance_attention=distance, ram_network="attention"
    )
    x = images()
    assert_same(fast(model, x, attention=attention, block_elements=4096), reference(model, x))


@pytest.mark.parametrize("source", MAP_SOURCES)
@pytest.mark.parametrize(
    "overrides",
    [{"use_uiapm": False}, {"use_ram": False}, {"use_fasm": False}, {"exclude_radius": 0}, {"score_mode": "topk_mean"}],
)
def test_fast_path_matches_reference_ablations(overrides, source):
    if source == "perception" and overrides.get("use_uiapm") is False:
        pytest.skip("the perception map needs the perception module")
    model = make_model(anomaly_map_source=source, **overrides)
    x = images()
    assert_same(fast(model, x), reference(model, x))


@pytest.mark.parametrize("source", MAP_SOURCES)
@pytest.mark.parametrize("num_samples", [1, 4])
def test_fast_path_uncertainty_passes_match_reference(num_samples, source):
    """With stochastic passes, the same seed gives the same draws: uncertainty and maps match too."""
    model = make_model(anomaly_map_source=source)
    x = images()
    ref = reference(model, x, num_samples=num_samples)
    out = fast(model, x, num_samples=num_samples)
    assert_same(out, ref)
    if num_samples > 1:
        assert ref["uncertainty_map"].abs().max() > 0  # the check is not vacuous


@pytest.mark.parametrize("source", MAP_SOURCES)
def test_fast_path_non_square_and_grey_images(source):
    model = make_model(anomaly_map_source=source)
    x = images(2, 64, 96)[:, :1]
    assert_same(fast(model, x, attention="chunked", block_elements=1000), reference(model, x))


@pytest.mark.parametrize("source", MAP_SOURCES)
def test_fast_path_channels_last(source):
    model = make_model(anomaly_map_source=source)
    x = images()
    ref = reference(model, x)
    assert_same(fast(model, x, channels_last=True), ref)


@pytest.mark.parametrize("source", [None, "restoration"])
def test_fast_path_default_model_at_256(source):
    """The default architecture (1024 prototypes, 4 heads, distance attention, L2 map) at its real size, with
    its default map and with the attention restoration map."""
    torch.manual_seed(0)
    model = URANet(pretrained=False, num_samples=0, **({} if source is None else {"anomaly_map_source": source})).eval()
    x = images(2, 256, 256)
    for attention in ("chunked", "sdpa"):
        assert_same(fast(model, x, attention=attention), reference(model, x))


def test_fast_path_bf16_autocast_cpu():
    """bf16 autocast on the CPU: close to the fp32 reference relative to the map's range (looser: bf16 features).

    Levels at stride 8 and 16 only: the stride-4 level is shrunk with an anti-aliased resize, which has no bf16
    kernel on the CPU (it has one on CUDA; the GPU script checks the default levels in bf16).
    """
    model = make_model(levels=("reduction_8", "reduction_16"), anomaly_map_source="restoration")
    x = images()
    ref = reference(model, x)
    out = fast(model, x, dtype="bf16")
    span = (ref["anomaly_map"].max() - ref["anomaly_map"].min()).item()
    err = (out["anomaly_map"] - ref["anomaly_map"]).abs().max().item()
    assert out["anomaly_map"].dtype == torch.float32
    assert err <= BF16_RELATIVE_TOL * span, f"bf16 map error {err:.3g} vs range {span:.3g}"
    score_err = (out["pred_score"] - ref["pred_score"]).abs().max().item()
    assert score_err <= BF16_RELATIVE_TOL * span, f"bf16 score error {score_err:.3g} vs map range {span:.3g}"


@pytest.mark.parametrize("attention", ["chunked", "sdpa"])
def test_fast_restoration_bf16(attention):
    """The attention in bf16 (values, value products; sdpa: also queries and keys) against float32."""
    model = make_model(ram_network="attention")
    features = torch.randn(2, model.ram.channels, 8, 8) + 1.0
    probability = torch.rand(2, 1, 8, 8)
    with torch.inference_mode():
        expected = model.ram(features, probability).restoration.flatten(2).transpose(1, 2)
        got = fast_restoration(
            model.ram, features.flatten(2).transpose(1, 2), (8, 8), probability, None, attention, torch.bfloat16
        )
    assert got.dtype == torch.bfloat16
    rel = ((got.float() - expected).norm(dim=-1) / expected.norm(dim=-1)).max().item()
    assert rel < 2e-2, rel


def test_fast_path_does_not_track_gradients_and_keeps_model_in_eval():
    model = make_model()
    out = FastURANet(model)(images())
    assert not out["anomaly_map"].requires_grad
    assert not model.training


def test_fast_path_rejects_bad_options():
    model = make_model()
    with pytest.raises(ValueError):
        FastURANet(model, attention="flash")
    with pytest.raises(ValueError):
        FastURANet(model, dtype="int8")
    with pytest.raises(ValueError):
        FastURANet(model, compile=True, cuda_graph=True)


@pytest.mark.parametrize("num_samples", [0, 2])
def test_predictor_fast_option(tmp_path, num_samples):
    """URANetPredictor(fast=True) gives the reference predictor's maps and scores."""
    from ura_monai.inference.predictor import URANetPredictor
    from ura_monai.networks.checkpoint import save_checkpoint

    path = save_checkpoint(tmp_path / "model.pt", make_model(anomaly_map_source="restoration"))
    x = images(3, 80, 72)
    outs = []
    for fast_option in (False, True, {"attention": "sdpa"}):
        torch.manual_seed(0)  # the random (untrained, not saved) backbone is rebuilt at load: same seed, same weights
        outs.append(URANetPredictor(path, num_samples=num_samples, batch_size=2, fast=fast_option)(x))
    for out in outs[1:]:
        for key in ("anomaly_map", "uncertainty_map", "pred_score"):
            assert torch.allclose(out[key], outs[0][key], atol=TOL), key
