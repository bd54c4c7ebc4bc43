"""Fixtures of the MONAI Label tests (run by `make test-label` in .venv-label; never by the main suite).

Everything is generated here: a datastore of small normal 2D pictures (PNG and JPEG, from the demo dataset
generator) and a small grey NIfTI volume, and, for the server test, a URA-Net checkpoint trained for one epoch.
Nothing is downloaded.
"""

import os
import tempfile

# MONAI Label reads its settings from the environment when it is first imported: keep the in-process apps
# hermetic (no session store under ~/.cache, no datastore file watcher thread, no experiment tracking)
os.environ.setdefault("MONAI_LABEL_SESSIONS", "false")
os.environ.setdefault("MONAI_LABEL_DATASTORE_AUTO_RELOAD", "false")
os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
os.environ.setdefault("MONAI_LABEL_AUTO_UPDATE_SCORING", "false")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
APP_SOURCE = REPO / "apps" / "ura_net_label"
IMAGE_SIZE = 64  # network size used by the tests: a multiple of 32, small enough for CPU
VOLUME_SHAPE = (48, 40, 5)  # (x, y, z) of the generated NIfTI volume
VOLUME_AFFINE = np.array([[0.8, 0, 0, -10.0], [0, 0.8, 0, 5.0], [0, 0, 2.0, 30.0], [0, 0, 0, 1]])


def _write_studies(folder: Path) -> dict:
    """Normal pictures ``normal_000.png`` ... (some ``.jpeg``, one not square) and one grey volume."""
    import nibabel as nib

    from ura_monai.data import make_demo_dataset

    with tempfile.TemporaryDirectory() as scratch:
        demo = make_demo_dataset(scratch, n_train=7, n_test_good=0, n_test_defect=0, image_size=IMAGE_SIZE)
        normals = sorted((demo / "train" / "good").glob("*.png"))
        folder.mkdir(parents=True, exist_ok=True)
        info = {"png": [], "jpeg": [], "sizes": {}}
        for index, source in enumerate(normals[:5]):
            image = Image.open(source).convert("RGB")
            if index % 2:  # odd ones as .jpeg: the extension MONAI Label's default datastore does not list
                name = f"normal_{index:03d}"
                image.save(folder / f"{name}.jpeg", quality=95)
                info["jpeg"].append(name)
            else:
                name = f"normal_{index:03d}"
                image.save(folder / f"{name}.png")
                info["png"].append(name)
            info["sizes"][name] = image.size
        # a non-square picture: the mask must come back at the picture's own size
        wide = Image.open(normals[5]).convert("RGB").resize((80, 56))
        wide.save(folder / "normal_wide.png")
        info["png"].append("normal_wide")
        info["sizes"]["normal_wide"] = wide.size

        # a grey volume (x, y, z) in CT-like units, each slice a crop of a demo picture
        slices = []
        for source in normals[: VOLUME_SHAPE[2]]:
            grey = np.asarray(Image.open(source).convert("L"), dtype=np.float32)
            slices.append(grey[: VOLUME_SHAPE[1], : VOLUME_SHAPE[0]].T * 4.0 - 200.0)  # (x, y)
        volume = np.stack(slices, axis=-1).astype(np.int16)
        nib.save(nib.Nifti1Image(volume, VOLUME_AFFINE), folder / "volume_001.nii.gz")
        info["volume"] = "volume_001"
    return info


@pytest.fixture(scope="session")
def studies(tmp_path_factory):
    """``(folder, info)``: a fresh datastore folder and what it holds (ids by kind, picture sizes)."""
    folder = tmp_path_factory.mktemp("studies")
    return folder, _write_studies(folder)


def make_app_dir(tmp_path_factory, name: str = "app") -> Path:
    """A copy of the sample app (MONAI Label writes model/, logs/ ... into the app folder)."""
    target = tmp_path_factory.mktemp(name) / "ura_net_label"
    shutil.copytree(APP_SOURCE, target, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
    return target


@pytest.fixture(scope="session")
def pretrained_checkpoint(tmp_path_factory, studies):
    """A URA-Net checkpoint trained for one epoch on the datastore's PNG pictures, outside MONAI Label."""
    from ura_monai.engines.workflow import fit

    folder, info = studies
    items = [{"image": str(folder / f"{name}.png"), "label": 0} for name in info["png"] if name != "normal_wide"]
    output = tmp_path_factory.mktemp("pretrained")
    result = fit(items, output, image_size=IMAGE_SIZE, epochs=1, batch_size=4, progress=False)
    target = output / "initial.pt"
    shutil.copy(result["checkpoint"], target)
    return target


def pytest_configure(config):
    # noise of ITK's SWIG bindings and of MONAI's optional GPU DICOM decoder, not of this project
    config.addinivalue_line("filterwarnings", "ignore:builtin type .* has no __module__ attribute:DeprecationWarning")
    config.addinivalue_line("filterwarnings", "ignore:NvImgCodecPydicomReader")
