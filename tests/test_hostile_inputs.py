"""Hostile and broken inputs (issue 11): names from file content, formula cells, lost training state, output
folders, mixed channels, bad masks, special files, huge images, bundle errors. Everything on generated data.

One tiny training run (64x64 images, one grey image among RGB ones, small network, one epoch) is shared by the
module; the rest are fast unit-level checks or one-line CLI refusals that stop before any work.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from ura_monai.cli import main
from ura_monai.data import anomaly_transforms, make_demo_dataset, mvtec_datalist
from ura_monai.engines.trainer import URANetTrainer
from ura_monai.engines.workflow import fit
from ura_monai.inference.image_inference import predict_files
from ura_monai.inference.predictor import URANetPredictor
from ura_monai.networks.checkpoint import read_checkpoint
from ura_monai.utils import (
    OUTPUT_MARKER_NAME,
    OutputFolderError,
    SkippedFileWarning,
    claim_output_dir,
    escape_csv_cell,
    list_input_files,
    safe_child,
    safe_name,
)

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
QUIET = ["--no-progress", "-q"]
SMALL = {
    "perception_hidden": 32,
    "latent_channels": 8,
    "num_samples": 2,
    "num_prototypes": 64,
    "embed_dim": 32,
    "num_heads": 2,
}
FIT = {"image_size": SIZE, "batch_size": 4, "seed": 0, "progress": False, "model_kwargs": SMALL}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def _tree_digest(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Path -> sha256 of every file under ``root`` (folders as 'dir'), leaving out ``skip``."""
    out = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        out[str(path.relative_to(root))] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _png(path: Path, size: int = SIZE, rgb: bool = True, value: int | None = None, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if rgb else (size, size)
    pixels = np.full(shape, value, np.uint8) if value is not None else rng.integers(0, 255, shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


# --------------------------------------------------------------------------------------------- shared run


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory) -> Path:
    """The demo dataset (RGB) with one training and one test image replaced by grey ones."""
    root = make_demo_dataset(
        tmp_path_factory.mktemp("mixed"), n_train=8, n_test_good=2, n_test_defect=2, image_size=SIZE, seed=2
    )
    for folder in (root / "train" / "good", root / "test" / "good"):
        first = sorted(folder.glob("*.png"))[0]
        Image.open(first).convert("L").save(first)
    return root


@pytest.fixture(scope="module")
def trained(mixed_dataset, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("run")
    result = fit(mvtec_datalist(mixed_dataset, None, "train"), out, epochs=1, **FIT)
    return {"root": mixed_dataset, "out": out, "checkpoint": Path(result["checkpoint"])}


# --------------------------------------------------------------------------------------------- names from content


def _dicom_series(folder: Path, series_uid: str, slices: int = 3, size: int = 16) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), series_uid, "MR"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(2 * k)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 0
        ds.PixelData = ((np.arange(size * size).reshape(size, size) + 50 * k) % 400).astype(np.uint16).tobytes()
        ds.save_as(folder / f"s{k}.dcm", enforce_file_format=True)


class _MeanPredictor:
    image_threshold = 0.5

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        amap = images.mean(dim=1)
        return {"anomaly_map": amap, "uncertainty_map": 1.0 - amap, "pred_score": amap.flatten(1).amax(1)}


@pytest.fixture
def hostile_dicom(tmp_path, monkeypatch) -> dict:
    """A DICOM folder whose SeriesInstanceUIDs are '../victim' and an absolute path, next to a folder to protect."""
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("user data")
    absolute = tmp_path / "absolute_victim"
    _dicom_series(tmp_path / "dicom" / "a", "../victim")
    _dicom_series(tmp_path / "dicom" / "b", str(absolute))
    # a file name a spreadsheet would run as a formula
    (tmp_path / "dicom" / "=HYPERLINK(1).txt").write_text("not dicom")
    return {"root": tmp_path, "input": tmp_path / "dicom", "victim": victim, "absolute": absolute}


def test_dicom_series_uid_with_traversal_stays_inside_the_output_folder(hostile_dicom):
    from ura_monai.inference.dicom_inference import predict_dicom_folder

    root, output = hostile_dicom["root"], hostile_dicom["root"] / "out"
    before = _tree_digest(root)
    rows = predict_dicom_folder(hostile_dicom["input"], output, _MeanPredictor(), write_dicom=False, progress=False)
    assert sum(r["status"] == "ok" for r in rows) == 2
    # no file outside the output folder changed, appeared or vanished
    assert _tree_digest(root, skip=output) == before
    assert not hostile_dicom["absolute"].exists()
    for row in rows:
        if row["status"] == "ok":
            folder = output / row["series_dir"]
            assert folder.parent == output and (folder / "anomaly_map.nii.gz").is_file(), row["series_dir"]
    # the skipped file's name is escaped in results.csv (formula injection)
    cells = [r["skipped_files"] for r in _read_csv(output / "results.csv") if r["status"] == "skipped"]
    assert cells == ["'=HYPERLINK(1).txt"]


def test_dicom_cache_folder_names_stay_inside_the_cache(hostile_dicom):
    from ura_monai.data.dicom import dicom_slice_datalist

    root, cache = hostile_dicom["root"], hostile_dicom["root"] / "cache"
    before = _tree_digest(root)
    items = dicom_slice_datalist(hostile_dicom["input"], cache)
    assert len(items) == 6
    assert _tree_digest(root, skip=cache) == before
    assert all(Path(it["image"]).resolve().parent.parent == cache.resolve() for it in items)


def test_safe_names_and_formula_cells():
    for hostile in ("../x", "/etc/passwd", "..", ".", "", "a/../../b", "\x00", "~root"):
        name = safe_name(hostile)
        assert name and "/" not in name and name not in (".", "..") and not name.startswith(".")
    assert safe_child(Path("/out"), "../../etc").parent == Path("/out")
    assert [escape_csv_cell(v) for v in ("=1+2", "+A1", "-cmd", "@SUM(A1)", "-0.5", "1e-3", -1.0, "ok")] == [
        "'=1+2",
        "'+A1",
        "'-cmd",
        "'@SUM(A1)",
        "-0.5",
        "1e-3",
        -1.0,
        "ok",
    ]


def test_scores_csv_escapes_formula_file_names(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _png(tmp_path / "=cmd.png")
    _png(tmp_path / "@sum.png", seed=1)
    assert (
        main(["predict", "--checkpoint", str(trained["checkpoint"]), "--input", "=cmd.png", "--output", "out", *QUIET])
        == 0
    )
    assert (
        main(["predict", "--checkpoint", str(trained["checkpoint"]), "--input", "@sum.png", "--output", "out2", *QUIET])
        == 0
    )
    assert [r["path"] for r in _read_csv(tmp_path / "out" / "scores.csv")] == ["'=cmd.png"]
    assert [r["path"] for r in _read_csv(tmp_path / "out2" / "scores.csv")] == ["'@sum.png"]


# --------------------------------------------------------------------------------------------- training state


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing catches it, so no handler gets to tidy up."""


def _count_epochs(monkeypatch) -> list[int]:
    epochs: list[int] = []
    original = URANetTrainer._iteration

    def counting(self, engine, batch):
        epochs.append(engine.state.epoch)
        return original(self, engine, batch)

    monkeypatch.setattr(URANetTrainer, "_iteration", counting)
    return epochs


def test_kill_during_state_save_then_resume_continues_from_last_complete_epoch(trained, tmp_path, monkeypatch):
    items = mvtec_datalist(trained["root"], None, "train")
    epochs = _count_epochs(monkeypatch)
    real_save = torch.save
    state_saves = []

    def dying_save(obj, target, *args, **kwargs):
        if isinstance(obj, dict) and "trainer" in obj:
            state_saves.append(obj["trainer"]["iteration"])
            if len(state_saves) == 2:  # the process dies half-way through writing epoch 2's state
                if isinstance(target, (str, os.PathLike)):
                    Path(target).write_bytes(b"PK\x03\x04 half a file")
                else:
                    target.write(b"PK\x03\x04 half a file")
                raise _Killed("SIGKILL")
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(_Killed):
        fit(items, tmp_path, epochs=2, **FIT)
    monkeypatch.setattr(torch, "save", real_save)
    per_epoch = epochs.count(1)
    epochs.clear()
    fit(items, tmp_path, epochs=2, resume=True, **FIT)
    assert epochs == [2] * per_epoch  # epoch 1's state survived: only epoch 2 ran again


def test_kill_between_state_write_and_rename_keeps_the_previous_state(trained, tmp_path, monkeypatch):
    items = mvtec_datalist(trained["root"], None, "train")
    epochs = _count_epochs(monkeypatch)
    real_replace = os.replace
    renames = []

    def dying_replace(src, dst):
        if Path(dst).name == "train_state.pt":
            renames.append(dst)
            if len(renames) == 2:
                raise _Killed("SIGKILL before the rename")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(_Killed):
        fit(items, tmp_path, epochs=2, **FIT)
    monkeypatch.setattr(os, "replace", real_replace)
    per_epoch = epochs.count(1)
    epochs.clear()
    fit(items, tmp_path, epochs=2, resume=True, **FIT)
    assert epochs == [2] * per_epoch


def test_fresh_fit_never_leaves_an_older_runs_state_to_resume(trained, tmp_path, monkeypatch):
    items = mvtec_datalist(trained["root"], None, "train")
    fit(items, tmp_path, epochs=2, **FIT)  # an older, longer run
    epochs = _count_epochs(monkeypatch)
    fit(items, tmp_path, epochs=1, **FIT)  # a fresh run into the same folder
    per_epoch = len(epochs)
    epochs.clear()
    fit(items, tmp_path, epochs=2, resume=True, **FIT)
    assert epochs == [2] * per_epoch  # resumed the fresh run (1 epoch done), not the older one (2 epochs done)


def test_resume_with_other_settings_is_refused(trained, tmp_path):
    items = mvtec_datalist(trained["root"], None, "train")
    fit(items, tmp_path, epochs=1, **FIT)
    with pytest.raises(ValueError, match="image_size: saved 64, now 32"):
        fit(items, tmp_path, epochs=2, resume=True, **{**FIT, "image_size": 32})


def test_cli_fit_refuses_an_existing_run_without_overwrite(trained, tmp_path, capsys, caplog):
    args = ["fit", "--layout", "mvtec", "--root", str(trained["root"]), "--image-size", "32", "--epochs", "1", *QUIET]
    assert main([*args, "--output", str(trained["out"])]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--output", str(trained["root"] / "runs")]) == 2  # inside the dataset
    assert "inside the input folder" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING, logger="ura_monai"):
        assert main([*args, "--output", str(tmp_path / "new"), "--resume"]) == 0  # nothing to resume: trains, says so
    assert any("no saved training state" in r.getMessage() for r in caplog.records)
    assert main([*args, "--output", str(tmp_path / "new"), "--resume", "--image-size", "64"]) == 2
    assert "image_size: saved 32, now 64" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- output folders


def test_predict_never_writes_into_the_inputs_folder_nor_mixes_runs(trained, tmp_path, capsys):
    ckpt = str(trained["checkpoint"])
    image = _png(tmp_path / "data" / "scan.png")
    user_csv = tmp_path / "data" / "scores.csv"
    user_csv.write_text("my own table\n")
    assert (
        main(["predict", "--checkpoint", ckpt, "--input", str(image), "--output", str(tmp_path / "data"), *QUIET]) == 2
    )
    assert "folder of the input file" in capsys.readouterr().err
    assert user_csv.read_text() == "my own table\n" and sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "scan.png",
        "scores.csv",
    ]

    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", ckpt, "--input", str(image), "--output", str(out), *QUIET]) == 0
    other = _png(tmp_path / "other" / "second.png", seed=3)
    assert main(["predict", "--checkpoint", ckpt, "--input", str(other), "--output", str(out), *QUIET]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (
        main(["predict", "--checkpoint", ckpt, "--input", str(other), "--output", str(out), "--overwrite", *QUIET]) == 0
    )
    # the table and the images describe the same (second) run
    assert [Path(r["path"]).name for r in _read_csv(out / "scores.csv")] == ["second.png"]
    assert sorted(p.name for p in out.glob("*_overlay.png")) == ["second_overlay.png"]

    # a folder ura-monai did not write is never cleared, even with --overwrite
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert (
        main(["predict", "--checkpoint", ckpt, "--input", str(other), "--output", str(foreign), "--overwrite", *QUIET])
        == 2
    )
    assert (foreign / "notes.txt").read_text() == "keep"


def test_two_runs_into_one_folder_and_the_demo_rule(tmp_path):
    out = claim_output_dir(tmp_path / "o", "predict")
    with pytest.raises(OutputFolderError, match="already holds"):
        claim_output_dir(out, "predict")  # a second (e.g. concurrent) run is refused
    (tmp_path / "race").mkdir()
    (tmp_path / "race" / OUTPUT_MARKER_NAME).write_text('{"kind": "predict"}')
    with pytest.raises(OutputFolderError):
        claim_output_dir(tmp_path / "race", "predict")
    demo = claim_output_dir(tmp_path / "demo", "demo", replace_own=True)
    (demo / "model.pt").write_bytes(b"old")
    claim_output_dir(demo, "demo", replace_own=True)  # the demo replaces its own previous output
    assert not (demo / "model.pt").exists()


def test_test_output_inside_the_test_split_is_refused(trained, capsys):
    code = main(
        [
            "test",
            "--checkpoint",
            str(trained["checkpoint"]),
            "--layout",
            "mvtec",
            "--root",
            str(trained["root"]),
            "--output",
            str(trained["root"] / "test" / "results"),
            *QUIET,
        ]
    )
    assert code == 2 and "inside the input folder" in capsys.readouterr().err
    assert not (trained["root"] / "test" / "results").exists()


# --------------------------------------------------------------------------------------------- channels and masks


def test_grey_image_among_rgb_trains_tests_and_warns(trained, tmp_path, caplog):
    checkpoint = read_checkpoint(trained["checkpoint"])
    assert checkpoint["extra"]["channels"] == 3
    with caplog.at_level(logging.WARNING):  # the CLI logs warnings as lines of the "py.warnings" logger
        code = main(
            [
                "test",
                "--checkpoint",
                str(trained["checkpoint"]),
                "--layout",
                "mvtec",
                "--root",
                str(trained["root"]),
                "--output",
                str(tmp_path / "t"),
                *QUIET,
            ]
        )
    assert code == 0
    assert any("is a grey image; converted to RGB" in r.getMessage() for r in caplog.records)
    grey = _png(tmp_path / "in" / "grey.png", rgb=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ura_monai"):
        rows = predict_files(
            [grey], tmp_path / "p", URANetPredictor(trained["checkpoint"], num_samples=0), progress=False
        )
    assert rows[0]["error"] == "" and any("grey.png is a grey image" in r.getMessage() for r in caplog.records)


def test_wrong_size_and_non_binary_masks(tmp_path, capsys):
    root = make_demo_dataset(tmp_path / "d", n_train=5, n_test_good=1, n_test_defect=2, image_size=SIZE, seed=0)
    masks = sorted((root / "ground_truth").rglob("*.png"))
    Image.fromarray(np.zeros((SIZE // 2, SIZE), np.uint8)).save(masks[0])  # wrong size
    grey = np.zeros((SIZE, SIZE), np.uint8)
    grey[10:20, 10:20], grey[30, 30] = 255, 128
    Image.fromarray(grey).save(masks[1])  # not binary
    with pytest.warns(SkippedFileWarning, match=r"its mask .* is 64x32 but the image is 64x64"):
        items = mvtec_datalist(root, None, "test")
    assert len(items) == 2  # the image with the wrong-size mask is left out, the run goes on
    item = next(it for it in items if it["mask"] == str(masks[1]))
    with pytest.warns(UserWarning, match="is not binary"):
        anomaly_transforms(SIZE)(item)
    # the transform chain's error, if it is reached, is the cause, not "applying transform <object at 0x..>"
    from ura_monai.cli import one_line, root_cause

    bad = {"image": items[0]["image"], "mask": str(masks[0]), "label": 1}
    with pytest.raises(Exception) as info:
        anomaly_transforms(SIZE)(bad)
    assert "applying transform" in str(info.value)
    message = one_line(root_cause(info.value))
    assert "0x" not in message and str(masks[0]) in message and "has size 32x64" in message


# --------------------------------------------------------------------------------------------- special files


def test_special_files_are_skipped_with_a_reason(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    _png(folder / "ok.png")
    os.mkfifo(folder / "pipe.png")
    (folder / "dangling.png").symlink_to(tmp_path / "gone.png")
    (folder / "loop_a.png").symlink_to(folder / "loop_b.png")
    (folder / "loop_b.png").symlink_to(folder / "loop_a.png")
    (folder / "device.png").symlink_to("/dev/null")
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to(folder)  # a folder loop
    (folder / "locked").mkdir()
    (folder / ".DS_Store").write_text("x")
    (folder / "Thumbs.db").write_text("x")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path).name == "locked":  # root reads everything: simulate a folder without read permission
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    skipped: list = []
    with pytest.warns(SkippedFileWarning):
        files = list_input_files(folder, skipped=skipped)
    assert [f.name for f in files] == ["ok.png"]
    reasons = {Path(p).name: r for p, r in skipped}
    assert "FIFO" in reasons["pipe.png"] and "dangling" in reasons["dangling.png"]
    assert "loop" in reasons["loop_a.png"] and "device" in reasons["device.png"]
    assert "loop" in reasons["up"] and "unreadable folder" in reasons["locked"]

    # the DICOM scan reports them too (it walks the tree itself): skipped rows instead of a hang or silence
    from ura_monai.data.dicom import discover_series

    (folder / "sub" / "up").unlink()
    (folder / "loop_a.png").unlink()  # a loop of file links is reported; remove it to keep the check short
    _, dicom_skipped = discover_series(folder)
    dicom_reasons = {Path(item.path).name: item.reason for item in dicom_skipped}
    assert "FIFO" in dicom_reasons["pipe.png"] and "dangling" in dicom_reasons["dangling.png"]
    assert "device" in dicom_reasons["device.png"] and "unreadable folder" in dicom_reasons["locked"]


def test_fifo_input_never_blocks(trained, tmp_path):
    fifo = tmp_path / "in" / "pipe.png"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    result: dict = {}

    def run():
        result["code"] = main(
            [
                "predict",
                "--checkpoint",
                str(trained["checkpoint"]),
                "--input",
                str(fifo),
                "--output",
                str(tmp_path / "out"),
                *QUIET,
            ]
        )

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():  # release the blocked reader before failing
        with open(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK), "wb"):
            pass
        pytest.fail("predict blocked on a FIFO")
    assert result["code"] == 2


def test_folder_predict_lists_special_files_with_error_rows(trained, tmp_path):
    folder = tmp_path / "in"
    _png(folder / "ok.png")
    os.mkfifo(folder / "pipe.png")
    (folder / "dangling.png").symlink_to(tmp_path / "gone.png")
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(trained["checkpoint"]),
                "--input",
                str(folder),
                "--output",
                str(tmp_path / "out"),
                *QUIET,
            ]
        )
        == 0
    )
    rows = {Path(r["path"]).name: r["error"] for r in _read_csv(tmp_path / "out" / "scores.csv")}
    assert rows["ok.png"] == "" and "FIFO" in rows["pipe.png"] and "dangling" in rows["dangling.png"]


# --------------------------------------------------------------------------------------------- size and memory


def test_huge_image_and_memory_error_fail_only_their_file(trained, tmp_path, monkeypatch):
    import ura_monai.data.transforms as transforms

    monkeypatch.setattr(transforms, "MAX_IMAGE_PIXELS", 100 * 100)
    folder = tmp_path / "in"
    _png(folder / "a_small.png")
    _png(folder / "b_huge.png", size=128)
    _png(folder / "c_white.png", value=255)
    _png(folder / "d_small.png", seed=5)
    real_forward = URANetPredictor.run_network

    def forward(self, images):  # a white image exhausts memory (standing in for an image too large for the machine)
        if bool((images.flatten(1).mean(1) > 0.99).any()):
            raise MemoryError("out of memory")
        return real_forward(self, images)

    monkeypatch.setattr(URANetPredictor, "run_network", forward)
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(trained["checkpoint"]),
                "--input",
                str(folder),
                "--output",
                str(tmp_path / "out"),
                *QUIET,
            ]
        )
        == 0
    )
    rows = {Path(r["path"]).name: r for r in _read_csv(tmp_path / "out" / "scores.csv")}
    assert "megapixels" in rows["b_huge.png"]["error"] and "MemoryError" in rows["c_white.png"]["error"]
    assert rows["a_small.png"]["error"] == rows["d_small.png"]["error"] == "" and rows["d_small.png"]["score"] != ""


# --------------------------------------------------------------------------------------------- bundle


def _bundle(*args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="", TQDM_DISABLE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "monai.bundle", "run", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_bundle_errors_are_one_line(trained, tmp_path):
    configs = REPO / "bundles" / "ura_net_oct" / "configs"
    inference = ["--bundle_root", str(tmp_path / "b"), "--config_file", str(configs / "inference.json")]
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    images = tmp_path / "images"
    _png(images / "x.png")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    # (a missing dataset_dir: tests/test_bundle.py::test_bad_input_fails_at_initialize_naming_the_key)
    cases = [
        (
            [*inference, "--input_dir", str(images), "--ckpt_path", str(garbage), "--output_dir", str(tmp_path / "o")],
            f"ValueError: {garbage} is not a readable URA-Net checkpoint",
        ),
        (
            [
                *inference,
                "--input_dir",
                str(images),
                "--ckpt_path",
                str(trained["checkpoint"]),
                "--output_dir",
                str(foreign),
            ],
            "is not empty and holds no ura-monai run",
        ),
    ]
    processes = [(_bundle(*args), cause) for args, cause in cases]  # side by side: each pays MONAI's import time
    for process, cause in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode != 0, cause
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert any(cause in line for line in lines), stderr[-3000:]
        assert "Traceback" not in stderr and len(lines) < 15, stderr[-3000:]
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
