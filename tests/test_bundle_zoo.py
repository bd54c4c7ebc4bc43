"""The model zoo's checks on a trained copy of ``bundles/ura_net_oct``, through MONAI's public bundle API.

The model zoo's CI (``ci/verify_bundle.py`` of Project-MONAI/model-zoo, full mode) checks a bundle's files, its
version and changelog, its metadata against the schema, ``verify_net_in_out`` on ``network_def`` and
``ckpt_export network_def --ckpt_file models/model.pt`` (``torch.jit.script``, no tracing). The same calls run
here, in-process, on a bundle trained for one epoch at 64x64 (the README's training command), with the offline
schema instead of the downloaded one; the exports are then loaded and compared with the eager ``network_def``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from test_bundle import BUNDLE, SCHEMA, SIZE, TINY, TRAIN, bundle, make_oct2017

NETWORK_FORMAT = {"_meta_#network_data_format#inputs#image#spatial_shape": [SIZE, SIZE]}


@pytest.fixture(scope="module")
def zoo_bundle(tmp_path_factory) -> Path:
    """``<models>/ura_net_oct``: the bundle's files and a ``models/model.pt`` from the README's training command."""
    data = make_oct2017(tmp_path_factory.mktemp("oct2017"), n_train=6)
    root = tmp_path_factory.mktemp("models") / "ura_net_oct"
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("eval", "*.ts", "*.onnx", "model*.pt"))
    bundle("run", "training", "--bundle_root", str(root), "--config_file", TRAIN, "--dataset_dir", str(data), *TINY,
           "--epochs", "1", "--preset#val_abnormal_per_class", "1")  # fmt: skip
    return root


def _files(root: Path) -> dict[str, str]:
    return {
        "meta_file": str(root / "configs" / "metadata.json"),
        "config_file": str(root / "configs" / "inference.json"),
    }


def _network_def(root: Path) -> torch.nn.Module:
    """The config's ``network_def`` with ``models/model.pt`` loaded, as ``ckpt_export`` builds it."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser.update({"bundle_root": str(root), "image_size": SIZE})
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True))
    return network.eval()


@pytest.mark.slow  # trains the bundle (about 35 s)
def test_zoo_files_version_and_metadata(zoo_bundle):
    from monai.bundle import verify_metadata

    for name in ("LICENSE", "configs/metadata.json", "configs/inference.json", "models/model.pt"):
        assert (zoo_bundle / name).is_file(), name
    metadata = json.loads((zoo_bundle / "configs" / "metadata.json").read_text())
    assert metadata["version"] in metadata["changelog"]
    verify_metadata(meta_file=str(zoo_bundle / "configs" / "metadata.json"), filepath=SCHEMA)


def test_zoo_metadata_check_fails_on_a_broken_file(tmp_path):
    from monai.bundle import verify_metadata

    broken = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    del broken["network_data_format"]["outputs"]["pred"]["channel_def"]
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="channel_def"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=SCHEMA)


@pytest.mark.slow  # trains the bundle (about 35 s)
def test_zoo_verify_net_in_out_on_network_def(zoo_bundle):
    from monai.bundle import verify_net_in_out

    files = _files(zoo_bundle)
    verify_net_in_out(
        "network_def", **files, device="cpu", bundle_root=str(zoo_bundle), image_size=SIZE, **NETWORK_FORMAT
    )
    # the check is real: a metadata that promises one output channel fails
    with pytest.raises(ValueError, match="output channel number `2` doesn't match: `1`"):
        verify_net_in_out("network_def", **files, device="cpu", bundle_root=str(zoo_bundle), image_size=SIZE,
                          **NETWORK_FORMAT, **{"_meta_#network_data_format#outputs#pred#num_channels": 1})  # fmt: skip


@pytest.mark.slow  # trains the bundle (about 35 s)
def test_zoo_ckpt_export_and_onnx_export_match_the_eager_network_def(zoo_bundle, tmp_path):
    from monai.bundle import ckpt_export, onnx_export

    files = {**_files(zoo_bundle), "ckpt_file": str(zoo_bundle / "models" / "model.pt"), "bundle_root": str(zoo_bundle)}
    # as the zoo's CI calls it: torch.jit.script, no tracing options
    ckpt_export("network_def", filepath=str(tmp_path / "model.ts"), image_size=SIZE, **files)
    onnx_export("network_def", filepath=str(tmp_path / "model.onnx"), image_size=SIZE, use_trace=True,
                input_shape=[1, 1, SIZE, SIZE], converter_kwargs={"external_data": False, "input_names": ["image"]},
                **files)  # fmt: skip

    eager = _network_def(zoo_bundle)
    image = torch.rand(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    scripted = torch.jit.load(str(tmp_path / "model.ts"))
    with torch.no_grad():
        expected, got = eager(image), scripted(image)
    assert expected.shape == (1, 2, SIZE, SIZE) and expected[:, 1].max() > 0  # the uncertainty passes are exported
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # the checkpoint's thresholds travel with the export and are the project's
    from ura_monai.networks.checkpoint import read_checkpoint

    post = read_checkpoint(zoo_bundle / "models" / "model.pt")["postprocessing"]
    assert math.isfinite(post["image_threshold"])
    assert float(scripted.image_threshold) == pytest.approx(post["image_threshold"])
    assert float(scripted.pixel_threshold) == pytest.approx(post["pixel_threshold"])

    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (got_onnx,) = session.run(None, {"image": image.numpy()})
    torch.testing.assert_close(torch.from_numpy(got_onnx), expected, atol=1e-4, rtol=0)
