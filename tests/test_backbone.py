"""Tests of the frozen ImageNet backbone: EfficientNet-Lite0 weights, the feature extractor and WRN-50-2 errors."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata
from torch import nn

from ura_monai.networks.blocks.feature_extractor import (
    BACKBONE_LEVELS,
    PretrainedFeatureExtractor,
    wide_resnet50_2_weights_path,
)
from ura_monai.networks.nets.efficientnet_lite import efficientnet_lite0, lite0_weights_path

LEVELS = ("reduction_4", "reduction_8", "reduction_16")
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image_tensor(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div(255.0).unsqueeze(0)


def _brick_batch(size: int = 64, count: int = 2) -> torch.Tensor:
    """A few grey crops of skimage's brick texture, as (count, 3, size, size) in [0, 1]."""
    brick = torch.from_numpy(skdata.brick().astype(np.float32) / 255.0)
    crops = [brick[i * 40 : i * 40 + 2 * size, i * 30 : i * 30 + 2 * size] for i in range(count)]
    batch = torch.stack(crops).unsqueeze(1)
    batch = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return batch.expand(-1, 3, -1, -1).contiguous()


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return efficientnet_lite0(image_size=224)


@pytest.fixture(scope="module")
def extractor():
    return PretrainedFeatureExtractor(levels=LEVELS, image_size=64)


# ------------------------------------------------------------------------------------------- classifier


def _top_classes(net: nn.Module, array: np.ndarray, k: int = 5) -> list[int]:
    image = F.interpolate(_image_tensor(array), size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        logits = net((image - 0.5) / 0.5)
    assert logits.shape == (1, 1000)
    return logits[0].topk(k).indices.tolist()


def test_lite0_classifies_chelsea_as_a_cat(classifier):
    top = _top_classes(classifier, skdata.chelsea())
    assert 281 <= top[0] <= 285, f"top-5 classes {top}"  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_lite0_classifies_coffee_as_espresso(classifier):
    top = _top_classes(classifier, skdata.coffee(), k=3)
    # 967 espresso; 968 cup and 504 coffee mug are acceptable neighbours in the top 3
    assert top[0] == 967 or {967, 968, 504} & set(top), f"top-3 classes {top}"
    assert 967 in top, f"top-3 classes {top}"


def test_lite0_is_built_in_eval_mode_with_relu6(classifier):
    assert not classifier.training
    assert isinstance(classifier._swish, nn.ReLU6)
    assert all(isinstance(block._swish, nn.ReLU6) for stage in classifier._blocks for block in stage)


# ------------------------------------------------------------------------------------ feature extractor


def test_extractor_output_shape(extractor):
    assert extractor.level_channels == tuple(BACKBONE_LEVELS["efficientnet_lite0"][lv] for lv in LEVELS)
    assert extractor.out_channels == 24 + 40 + 112 == 176
    images = _brick_batch(64, 2)
    with torch.no_grad():
        features = extractor(images)
    assert features.shape == (2, 176, 8, 8)
    assert torch.isfinite(features).all()
    # another size divisible by 32, not square
    with torch.no_grad():
        features = extractor(torch.rand(1, 3, 64, 96))
    assert features.shape == (1, 176, 8, 12)


def test_extractor_levels_are_kept_in_network_order():
    ext = PretrainedFeatureExtractor(levels=("reduction_16", "reduction_4"), image_size=64, pretrained=False)
    assert ext.levels == ("reduction_4", "reduction_16")
    assert ext.out_channels == 24 + 112
    with pytest.raises(ValueError, match="reduction_64"):
        PretrainedFeatureExtractor(levels=("reduction_64",), image_size=64, pretrained=False)
    with pytest.raises(ValueError, match="unknown backbone"):
        PretrainedFeatureExtractor(backbone="resnet18", pretrained=False)


def test_extractor_grey_input_equals_repeated_rgb(extractor):
    grey = _brick_batch(64, 2)[:, :1]
    with torch.no_grad():
        from_grey = extractor(grey)
        from_rgb = extractor(grey.repeat(1, 3, 1, 1))
    torch.testing.assert_close(from_grey, from_rgb, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        extractor(torch.rand(1, 2, 64, 64))


def test_fit_level_scale_equalizes_level_variance():
    fe = PretrainedFeatureExtractor(image_size=64, pretrained=False)
    images = _brick_batch(64, 4)
    with torch.no_grad():
        raw = fe(images)
    assert torch.equal(fe.level_scale, torch.ones(fe.out_channels))  # identity until fitted

    def variance(f):
        return [p.transpose(0, 1).flatten(1).var(dim=1).sum().item() for p in f.split(list(fe.level_channels), dim=1)]

    assert max(variance(raw)) / min(variance(raw)) > 2.0  # unequal to start with, or the test proves nothing
    scaled = fe.fit_level_scale(raw)
    np.testing.assert_allclose(variance(scaled), 1.0, rtol=1e-4)
    # constant within a level, and later outputs carry the scale
    for part in fe.level_scale.split(list(fe.level_channels)):
        assert torch.all(part == part[0])
    with torch.no_grad():
        torch.testing.assert_close(fe(images), scaled, rtol=1e-5, atol=1e-6)
    # fitting on already-scaled features changes nothing
    before = fe.level_scale.clone()
    fe.fit_level_scale(scaled)
    torch.testing.assert_close(fe.level_scale, before, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="expected features"):
        fe.fit_level_scale(raw[:, :10])


def test_extractor_is_frozen(extractor):
    assert all(not p.requires_grad for p in extractor.parameters())
    bn_stats = {k: v.clone() for k, v in extractor.state_dict().items() if "running" in k or "num_batches" in k}
    assert bn_stats, "expected batch-norm statistics in the backbone"

    # a parent module switched to training mode must not put the backbone's batch norms in training mode
    parent = nn.ModuleDict({"extractor": extractor})
    parent.train()
    try:
        assert not extractor.net.training
        assert not any(m.training for m in extractor.net.modules())
        images = _brick_batch(64, 2) * 0.5 + 0.4  # statistics unlike ImageNet's: BN in train mode would move
        features = extractor(images)
        assert not features.requires_grad
    finally:
        parent.eval()
    for key, value in extractor.state_dict().items():
        if key in bn_stats:
            assert torch.equal(value, bn_stats[key]), f"{key} changed in a training-mode forward"


def _flat_key(key: str) -> str:
    """MONAI's nested ``_blocks.S.N.<rest>`` -> lukemelas' flat ``_blocks.N.<rest>``."""
    parts = key.split(".")
    if parts[0] == "_blocks" and parts[1].isdigit() and parts[2].isdigit():
        return ".".join(["_blocks", *parts[2:]])
    return key


def test_packaged_lite0_weights_have_flat_keys():
    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    block_keys = [k for k in state if k.startswith("_blocks.")]
    assert block_keys and all(not k.split(".")[2].isdigit() for k in block_keys)


def test_flat_key_weights_file_loads_through_weights(tmp_path):
    torch.manual_seed(123)
    source = efficientnet_lite0(pretrained=False, image_size=64)
    with torch.no_grad():  # make every tensor distinctive, batch-norm buffers included
        for name, tensor in source.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if "running_var" in name:
                tensor.uniform_(0.5, 1.5)
            else:
                tensor.normal_(0.0, 0.05)
    flat = {_flat_key(k): v.clone() for k, v in source.state_dict().items()}
    assert any(k.startswith("_blocks.15.") for k in flat)  # Lite0 has 16 blocks: keys really are flat
    path = tmp_path / "lite0_flat.pth"
    torch.save(flat, path)

    ext = PretrainedFeatureExtractor(levels=LEVELS, image_size=64, weights=path)
    loaded = ext.net.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert all(not p.requires_grad for p in ext.parameters())

    default = PretrainedFeatureExtractor(levels=LEVELS, image_size=64)
    images = _brick_batch(64, 1)
    with torch.no_grad():
        assert not torch.allclose(ext(images), default(images))

    # a {"state_dict": ...} wrapper and MONAI's nested keys load too
    nested = tmp_path / "lite0_nested.pth"
    torch.save({"state_dict": source.state_dict()}, nested)
    net = efficientnet_lite0(pretrained=False, image_size=64, weights=nested)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in source.state_dict().items())


def test_missing_lite0_weights_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        PretrainedFeatureExtractor(image_size=64, weights=tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------- WideResNet-50-2


def test_wide_resnet_weights_path_names_the_file_to_supply(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as info:
        wide_resnet50_2_weights_path()
    message = str(info.value)
    assert "wide_resnet50_2-95faca4d.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "never downloads" in message

    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        wide_resnet50_2_weights_path(tmp_path / "nowhere.pth")

    # a file in the hub cache is found
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "wide_resnet50_2-95faca4d.pth").write_bytes(b"")
    assert wide_resnet50_2_weights_path() == checkpoints / "wide_resnet50_2-95faca4d.pth"


def test_wide_resnet_without_torchvision_or_weights_raises_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises((ImportError, FileNotFoundError)) as info:
        PretrainedFeatureExtractor(backbone="wide_resnet50_2", levels=("reduction_8", "reduction_16"), image_size=64)
    message = str(info.value)
    if HAS_TORCHVISION:
        assert info.type is FileNotFoundError
        assert "wide_resnet50_2-95faca4d.pth" in message
        assert "never downloads" in message
    else:
        assert info.type is ImportError
        assert "torchvision" in message
        assert "ura-monai[wrn]" in message
        assert "efficientnet_lite0" in message
