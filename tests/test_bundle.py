"""The MONAI bundle ``bundles/ura_net_oct``, its presets in ``configs/`` and the ``ura_monai`` glue its configs call.

Every command of the bundle's README runs here as a subprocess (``python -m monai.bundle ...``, ``torchrun``) on tiny
generated data (64x64 images, one or two epochs, one thread per process). The bundle's config files are read from
the repository; everything is written under pytest's ``tmp_path`` (``--bundle_root`` points there).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "ura_net_oct"
CONFIGS = BUNDLE / "configs"
TRAIN, EVALUATE, INFERENCE, MULTI_GPU = (
    str(CONFIGS / f"{n}.json") for n in ("train", "evaluate", "inference", "multi_gpu_train")
)
METADATA = str(CONFIGS / "metadata.json")
SCHEMA = str(REPO / "bundles" / "schema" / "meta_schema.json")
PRESETS = REPO / "configs"
SIZE = 64
TINY = ["--image_size", str(SIZE), "--batch_size", "4"]


# --------------------------------------------------------------------------------------------- helpers


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="", TQDM_DISABLE="1"
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def _run(
    args: list[str], cwd: Path | None = None, expect_ok: bool = True, timeout: int = 300
) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, env=_env(), cwd=cwd, timeout=timeout)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args[:6])} ... failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def bundle(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """``python -m monai.bundle <args>``."""
    return _run([sys.executable, "-m", "monai.bundle", *args], **kwargs)


def _config_list(*files: str) -> str:
    return "[" + ",".join(f"'{f}'" for f in files) + "]"


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def _oct_image(rng: np.random.Generator, abnormal: bool, height: int = 80, width: int = 96) -> Image.Image:
    """A B-scan-like grey image: a wavy bright band (retina) and, when abnormal, a bright bump above it."""
    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    centre = height * 0.5 + 4 * np.sin(2 * np.pi * x / width + rng.uniform(0, 2 * np.pi))
    img = 0.8 * np.exp(-(((y - centre) / 6.0) ** 2)) + 0.5 * np.exp(-(((y - centre - 10) / 3.0) ** 2))
    if abnormal:
        cx = rng.uniform(0.3, 0.7) * width
        img = img + 0.9 * np.exp(-(((x - cx) / 6.0) ** 2 + ((y - centre + 8) / 5.0) ** 2))
    img = img + rng.normal(0, 0.05, img.shape)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), mode="L")


def make_oct2017(root: Path, n_train: int = 8, seed: int = 0) -> Path:
    """OCT-2017's released layout: ``train/{NORMAL,CNV}`` and ``test/{NORMAL,CNV,DME,DRUSEN}`` grey JPEGs."""
    rng = np.random.default_rng(seed)
    for split, cls, count in [
        ("train", "NORMAL", n_train),
        ("train", "CNV", 2),
        ("test", "NORMAL", 3),
        ("test", "CNV", 2),
        ("test", "DME", 2),
        ("test", "DRUSEN", 2),
    ]:
        folder = root / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            _oct_image(rng, cls != "NORMAL").save(folder / f"{cls}-{i:03d}-1.jpeg", quality=95)
    return root


def write_dicom_series(folder: Path, slices: int = 4, size: int = 64) -> str:
    """A small single-frame MR series (16-bit, axial, 2 mm apart); returns its SeriesInstanceUID."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    yy, _ = np.mgrid[:size, :size]
    for k in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
            "MR",
            "Phantom^Test",
            "PHANTOM",
            "19700101",
            "O",
        )
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = (
            "20240101",
            "120000",
            "1",
            "1",
            "",
        )
        ds.SeriesNumber, ds.Manufacturer, ds.PositionReferenceIndicator, ds.InstanceNumber = 1, "test", "", k + 1
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, 2.0 * k], [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness, ds.SamplesPerPixel, ds.PhotometricInterpretation = (
            [1.0, 1.0],
            2.0,
            1,
            "MONOCHROME2",
        )
        ds.ImageType, ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = (
            ["ORIGINAL", "PRIMARY", "M"],
            "GR",
            "NONE",
            "",
            "2D",
        )
        pixels = (
            (1000 * np.exp(-((yy - size / 2) ** 2) / 200.0) + rng.normal(0, 20, (size, size)))
            .clip(0, 4000)
            .astype(np.uint16)
        )
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (
            size,
            size,
            16,
            16,
            15,
            0,
        )
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"slice_{k:03d}.dcm", enforce_file_format=True)
    return series


def make_btad(root: Path, product: str = "01") -> Path:
    """BTAD's layout (``<product>/train/ok``, ``test/{ok,ko}``, ``ground_truth/ko``) from demo images, as BMP."""
    from ura_monai.data import make_demo_dataset

    demo = make_demo_dataset(
        root / "_demo", category="demo", n_train=6, n_test_good=2, n_test_defect=3, image_size=SIZE
    )
    base = root / product
    for source, target in [
        (demo / "train" / "good", base / "train" / "ok"),
        (demo / "test" / "good", base / "test" / "ok"),
    ]:
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(source.glob("*.png")):
            Image.open(path).save(target / f"{path.stem}.bmp")
    (base / "test" / "ko").mkdir(parents=True)
    (base / "ground_truth" / "ko").mkdir(parents=True)
    index = 0
    for defect in sorted(p for p in (demo / "test").iterdir() if p.name != "good"):
        for path in sorted(defect.glob("*.png")):
            Image.open(path).save(base / "test" / "ko" / f"{index:03d}.bmp")
            Image.open(demo / "ground_truth" / defect.name / f"{path.stem}_mask.png").save(
                base / "ground_truth" / "ko" / f"{index:03d}.png"
            )
            index += 1
    return root


def _checkpoint_keys(path: Path) -> list[str]:
    from ura_monai.networks.checkpoint import read_checkpoint

    return list(read_checkpoint(path)["state_dict"])


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def oct_data(tmp_path_factory) -> Path:
    return make_oct2017(tmp_path_factory.mktemp("oct2017"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, oct_data) -> dict:
    """The README's training command (run id ``training``) with ``--tracking mlflow``, two epochs at 64x64."""
    root = tmp_path_factory.mktemp("bundle_root")
    proc = bundle(
        "run",
        "training",
        "--bundle_root",
        str(root),
        "--config_file",
        TRAIN,
        "--dataset_dir",
        str(oct_data),
        *TINY,
        "--epochs",
        "2",
        "--preset#val_abnormal_per_class",
        "2",
        "--tracking",
        "mlflow",
    )
    return {"root": root, "log": proc.stdout + proc.stderr}


# --------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_training_writes_project_checkpoints_with_thresholds(trained, oct_data):
    from ura_monai.inference.predictor import URANetPredictor
    from ura_monai.networks.checkpoint import load_checkpoint, read_checkpoint

    models = trained["root"] / "models"
    assert sorted(p.name for p in models.iterdir()) == ["model.pt", "model_best.pt"]
    model, checkpoint = load_checkpoint(models / "model.pt")
    post = checkpoint["postprocessing"]
    assert {"image_threshold", "pixel_threshold", "image_min", "pixel_max"} <= set(post)
    assert all(math.isfinite(post[k]) for k in post)
    extra = checkpoint["extra"]
    assert extra["epoch"] == 2 and extra["image_size"] == SIZE and extra["preset"] == "oct2017"
    assert extra["train_images"] == 7 and extra["val_images"] == 1 + 2  # 1 held-out normal + 2 CNV from train/CNV
    assert model.config["image_size"] == SIZE
    best = read_checkpoint(models / "model_best.pt")
    assert best["extra"]["key_metric"] == "val_score" and "image_threshold" in best["postprocessing"]
    predictor = URANetPredictor(models / "model.pt", num_samples=0)
    assert predictor.image_threshold == pytest.approx(post["image_threshold"])
    # validation ran every epoch with the key metric (image AUROC: abnormal validation images exist)
    assert re.search(r"val_score: \S+ val_score_image_auroc: \S+ val_score_normal_residual", trained["log"])


@pytest.mark.slow
def test_training_logs_tensorboard_scalars_and_anomaly_maps(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained["root"] / "eval"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train_loss", "train_restoration", "val_score", "val_score_image_auroc"} <= scalars
    assert len(events.Scalars("val_score")) == 2
    assert any(tag.startswith("output") for tag in events.Tags()["images"])  # the anomaly map of a validation image


@pytest.mark.slow
def test_tracking_mlflow_records_the_run(trained):
    import mlflow

    database = trained["root"] / "eval" / "mlruns.db"
    assert database.is_file()
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{database}")
    experiments = [e for e in client.search_experiments() if e.name == "monai_experiment"]
    runs = client.search_runs([e.experiment_id for e in experiments])
    assert len(runs) == 1
    assert {"train_loss", "val_score"} <= set(runs[0].data.metrics)
    assert runs[0].info.status == "FINISHED"


# --------------------------------------------------------------------------------------------- evaluation, inference


@pytest.mark.slow
def test_evaluate_writes_image_metrics(trained, oct_data):
    root = trained["root"]
    bundle(
        "run",
        "evaluating",
        "--bundle_root",
        str(root),
        "--config_file",
        _config_list(TRAIN, EVALUATE),
        "--dataset_dir",
        str(oct_data),
        *TINY,
    )
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and 0.0 <= metrics["f1_max"] <= 1.0
    assert metrics["undefined"] == ["pixel_auroc", "aupro"]  # OCT-2017 has no masks
    assert metrics["images"] == 9 and metrics["abnormal_images"] == 6
    rows = _read_csv(root / "eval" / "per_image.csv")
    assert len(rows) == 9 and {r["defect_type"] for r in rows} == {"good", "CNV", "DME", "DRUSEN"}
    assert (root / "eval" / "roc_curve.png").is_file()


@pytest.mark.slow
def test_inference_on_images_writes_maps_overlays_and_scores(trained, oct_data, tmp_path):
    out = tmp_path / "predictions"
    bundle(
        "run",
        "--bundle_root",
        str(trained["root"]),
        "--config_file",
        INFERENCE,
        "--input_dir",
        str(oct_data / "test"),
        "--output_dir",
        str(out),
    )
    rows = _read_csv(out / "scores.csv")
    assert len(rows) == 9 and all(r["error"] == "" and r["decision"] in ("normal", "anomalous") for r in rows)
    stem = "CNV_CNV-000-1"
    anomaly = np.load(out / f"{stem}_anomaly_map.npy")
    uncertainty = np.load(out / f"{stem}_uncertainty.npy")
    assert anomaly.shape == uncertainty.shape == (80, 96)  # the file's own size
    assert uncertainty.max() > 0  # the checkpoint's uncertainty passes ran
    assert (out / f"{stem}_overlay.png").is_file() and (out / f"{stem}_uncertainty.png").is_file()


@pytest.mark.slow
def test_inference_on_a_dicom_folder(trained, tmp_path):
    uid = write_dicom_series(tmp_path / "dicom" / "series")
    out = tmp_path / "dicom_results"
    # the ``inferring`` id: an alias of the entry point ``run`` (one inference expression in inference.json)
    bundle(
        "run",
        "inferring",
        "--bundle_root",
        str(trained["root"]),
        "--config_file",
        INFERENCE,
        "--input_dir",
        str(tmp_path / "dicom"),
        "--input_type",
        "dicom",
        "--output_dir",
        str(out),
    )
    rows = _read_csv(out / "results.csv")
    assert [r["status"] for r in rows] == ["ok"] and rows[0]["series_uid"] == uid
    assert {"anomaly_map.nii.gz", "uncertainty_map.nii.gz", "report.json"} <= {p.name for p in (out / uid).iterdir()}
    report = json.loads((out / uid / "report.json").read_text())
    assert len(report["slice_scores"]) == 4 and report["decision"] in ("normal", "anomalous")


# --------------------------------------------------------------------------------------------- export and checks


# the zoo commands (verify_metadata, verify_net_in_out, ckpt_export, onnx_export) are in test_bundle_zoo.py


# --------------------------------------------------------------------------------------------- multi-process


@pytest.mark.slow
def test_torchrun_two_ranks_with_gloo(oct_data, tmp_path):
    root = tmp_path / "ddp_root"
    proc = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "--tee",
            "3",
            "-m",
            "monai.bundle",
            "run",
            "training",
            "--bundle_root",
            str(root),
            "--config_file",
            "['train.json','multi_gpu_train.json']",
            "--dataset_dir",
            str(oct_data),
            "--image_size",
            str(SIZE),
            "--batch_size",
            "2",
            "--epochs",
            "1",
        ],
        cwd=CONFIGS,
    )
    log = proc.stdout + proc.stderr
    for rank in (0, 1):  # both ranks cached features and trained the epoch
        assert re.search(rf"\[default{rank}\]:.*cached features of 7 images", log)
        assert re.search(rf"\[default{rank}\]:.*URANet\w*Trainer: Engine run finished", log)
    written = re.findall(r"\[default(\d)\]:.*wrote (\S+model\.pt)", log)
    assert written == [("0", str(root / "models" / "model.pt"))]  # rank 0 only, once
    keys = _checkpoint_keys(root / "models" / "model.pt")
    assert keys and not any(k.startswith("module.") for k in keys)
    from ura_monai.networks.checkpoint import load_checkpoint

    load_checkpoint(root / "models" / "model.pt")


# --------------------------------------------------------------------------------------------- presets


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["mvtec_ad", "btad", "folder"])
def test_presets_train_on_their_layout(preset, tmp_path):
    from ura_monai.data import make_demo_dataset

    data = tmp_path / "data"
    if preset == "mvtec_ad":
        make_demo_dataset(data, category="bottle", n_train=6, n_test_good=2, n_test_defect=3, image_size=SIZE)
        where = ["--dataset_dir", str(data), "--category", "bottle"]
    elif preset == "btad":
        make_btad(data, product="01")
        where = [
            "--dataset_dir",
            str(data),
            "--category",
            "01",
            "--early_stop_patience",
            "2",
        ]  # wired in, not triggered
    else:  # any folder of normal images
        demo = make_demo_dataset(
            tmp_path / "demo", category="parts", n_train=6, n_test_good=0, n_test_defect=0, image_size=SIZE
        )
        data.mkdir()
        for path in (demo / "train" / "good").glob("*.png"):
            (data / path.name).write_bytes(path.read_bytes())
        where = ["--dataset_dir", str(data)]
    root = tmp_path / "root"
    configs = [TRAIN, str(PRESETS / f"{preset}.json")]
    run = ["run", "--bundle_root", str(root), "--config_file", _config_list(*configs), *where, *TINY, "--epochs", "1"]
    bundle(*run, "--false_alarm_rate", "0.2")  # the operating point reaches the checkpoint saver
    from ura_monai.networks.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(root / "models" / "model.pt")
    assert checkpoint["extra"]["preset"] == preset and checkpoint["extra"]["train_images"] == 5
    assert "pixel_threshold" in checkpoint["postprocessing"]
    assert checkpoint["postprocessing"]["image_false_alarm_rate"] == 0.2
    if preset == "mvtec_ad":  # masks exist: evaluation reports pixel AUROC and AUPRO too
        bundle(
            "run",
            "evaluating",
            "--bundle_root",
            str(root),
            "--config_file",
            _config_list(*configs, EVALUATE),
            *where,
            *TINY,
        )
        metrics = json.loads((root / "eval" / "metrics.json").read_text())
        assert metrics["undefined"] == []
        assert all(0.0 <= metrics[k] <= 1.0 for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max"))


# --------------------------------------------------------------------------------------------- bad input


def _initialize(config_file, **override):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=config_file, meta_file=METADATA, logging_file=False, workflow_type=None, **override
    )
    with pytest.raises(Exception) as info:
        workflow.initialize()
    error = info.value
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__
    return " | ".join(messages)


@pytest.mark.slow
def test_bad_input_fails_at_initialize_naming_the_key(oct_data, tmp_path):
    root = str(tmp_path / "root")
    bad_preset = tmp_path / "bad_preset.json"
    bad_preset.write_text(json.dumps({"preset": {"layout": "mvtec", "imgae_size": 128}}))
    assert "'imgae_size'" in _initialize([TRAIN, str(bad_preset)], bundle_root=root, dataset_dir=str(oct_data))
    assert "dataset_dir is not set" in _initialize(TRAIN, bundle_root=root)
    assert f"dataset_dir not found: {tmp_path / 'nowhere'}" in _initialize(
        TRAIN, bundle_root=root, dataset_dir=str(tmp_path / "nowhere")
    )
    mvtec = [TRAIN, str(PRESETS / "mvtec_ad.json")]
    assert "category is empty" in _initialize(mvtec, bundle_root=root, dataset_dir=str(oct_data), category="")
    assert "category folder not found" in _initialize(
        mvtec, bundle_root=root, dataset_dir=str(oct_data), category="bottle"
    )
    missing = tmp_path / "models" / "missing.pt"
    assert f"ckpt_path not found: {missing}" in _initialize(
        [TRAIN, EVALUATE], bundle_root=root, dataset_dir=str(oct_data), ckpt_path=str(missing)
    )
    assert f"ckpt_path not found: {missing}" in _initialize(
        INFERENCE, bundle_root=root, input_dir=str(oct_data), ckpt_path=str(missing)
    )
    assert "input_type must be one of" in _initialize(
        INFERENCE, bundle_root=root, input_dir=str(oct_data), input_type="video"
    )
    assert not (tmp_path / "root").exists()  # nothing was written: no work started
    # and from the command line: a one-line reason in the error output, non-zero exit
    proc = bundle("run", "training", "--bundle_root", root, "--config_file", TRAIN, expect_ok=False)
    assert (
        proc.returncode != 0
        and "ValueError: dataset_dir is not set: pass --dataset_dir <dataset folder>" in proc.stderr
    )
    # the cause alone, not MONAI's 60-80 line traceback through its config parser
    assert "Traceback" not in proc.stderr and len([line for line in proc.stderr.splitlines() if line.strip()]) < 15


# --------------------------------------------------------------------------------------------- glue units


def test_check_preset_fills_defaults_and_rejects_bad_values():
    from ura_monai.bundle import PRESET_DEFAULTS, check_preset

    assert check_preset({"layout": "mvtec"}) == {**PRESET_DEFAULTS, "layout": "mvtec"}
    for bad, key in [
        ({"layout": "coco"}, "preset#layout"),
        ({"augment": "rotate"}, "preset#augment"),
        ({"channels": 2}, "preset#channels"),
        ({"val_fraction": 1.0}, "preset#val_fraction"),
        ({"num_train_normal": 0}, "preset#num_train_normal"),
        ({"val_abnormal_per_class": -1}, "preset#val_abnormal_per_class"),
        ({"sizes": 1}, "preset#sizes"),
    ]:
        with pytest.raises(ValueError, match=key):
            check_preset(bad)


def test_training_splits_hold_out_normals_and_draw_oct_abnormals(oct_data):
    from ura_monai.bundle import list_input_files, training_splits

    splits = training_splits("oct2017", oct_data, val_fraction=0.1, seed=0, val_abnormal_per_class=1)
    assert len(splits["train"]) == 7 and len(splits["threshold"]) == 1
    assert [it["label"] for it in splits["val"]] == [0, 1] and splits["val"][1]["defect_type"] == "CNV"
    assert not {it["image"] for it in splits["train"]} & {it["image"] for it in splits["val"]}
    assert (
        training_splits("oct2017", oct_data, num_train_normal=4)["threshold"]
        == training_splits("oct2017", oct_data, num_train_normal=4)["train"]
    )
    assert len(list_input_files(oct_data / "test")) == 9


def test_validation_score_is_auroc_with_abnormal_images_else_minus_residual():
    from ignite.engine import Engine

    from ura_monai.metrics.validation import ValidationScore

    def run(labels):
        batches = [
            {
                "pred_score": torch.tensor([0.1, 0.9]),
                "label": torch.tensor(labels),
                "anomaly_map": torch.full((2, 1, 4, 4), 0.5),
            }
        ]
        engine = Engine(lambda e, b: b)
        ValidationScore().attach(engine, "val_score")
        return engine.run(batches).metrics

    both = run([0, 1])
    assert both["val_score"] == both["val_score_image_auroc"] == 1.0
    normal = run([0, 0])
    assert normal["val_score"] == pytest.approx(-0.5) and math.isnan(normal["val_score_image_auroc"])


def test_export_wrapper_is_deterministic_batch_invariant_and_matches_uranet():
    from ura_monai.networks.blocks.uiapm import perception_heads
    from ura_monai.networks.nets.export import URANetExport
    from ura_monai.networks.nets.ura_net import URANet

    torch.manual_seed(0)
    net = URANet(image_size=SIZE, num_prototypes=16, num_samples=3).eval()
    with torch.no_grad():  # as after fit: normal statistics, and a perception head moved from its zero start
        net.fit_normal_statistics(net.feature_extractor(torch.rand(8, 3, SIZE, SIZE)))
        for head in perception_heads(net.uiapm):
            torch.nn.init.normal_(head.classifier.weight_mu)
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        plain = net(images, num_samples=0)
        fixed0 = URANetExport(net, num_samples=0, as_tuple=True)(images)
        torch.testing.assert_close(fixed0[0], plain["anomaly_map"])
        torch.testing.assert_close(fixed0[2], plain["pred_score"])
        wrapper = URANetExport(net, seed=1, as_tuple=True)  # the network's 3 passes
        both, again, single = wrapper(images), wrapper(images), wrapper(images[1:])
        stacked = URANetExport(net, seed=1)(images)  # the default: the maps stacked
    for a, b, c in zip(both, again, single):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a[1:], c, atol=1e-5, rtol=1e-5)  # an image's maps do not depend on its batch
    assert both[1].max() > 0 and stacked.shape == (2, 2, SIZE, SIZE)


def test_export_wrapper_loads_project_checkpoints_and_names_mismatches(tmp_path):
    from ura_monai.networks.checkpoint import save_checkpoint
    from ura_monai.networks.nets.export import URANetExport
    from ura_monai.networks.nets.ura_net import URANet

    trained = URANet(image_size=SIZE, num_prototypes=16)
    torch.nn.init.normal_(trained.ram.prototypes)
    path = save_checkpoint(tmp_path / "model.pt", trained, {"image_threshold": 0.7, "pixel_threshold": 0.4})
    wrapper = URANetExport(URANet(image_size=SIZE, num_prototypes=16), num_samples=0)
    wrapper.load_state_dict(torch.load(path, weights_only=True))
    torch.testing.assert_close(wrapper.network.ram.prototypes, trained.ram.prototypes)
    assert float(wrapper.image_threshold) == pytest.approx(0.7) and float(wrapper.pixel_threshold) == pytest.approx(0.4)
    other = URANetExport(URANet(image_size=2 * SIZE, num_prototypes=16), num_samples=0)
    with pytest.raises(ValueError, match=r"image_size: checkpoint 64, config 128.*--image_size 64"):
        other.load_state_dict(torch.load(path, weights_only=True))
    # the wrapper's own state dict is a checkpoint (with the frozen backbone too): what the zoo's CI saves
    torch.save(wrapper.state_dict(), tmp_path / "full.pt")
    again = URANetExport(URANet(image_size=SIZE, num_prototypes=16), num_samples=0)
    again.load_state_dict(torch.load(tmp_path / "full.pt", weights_only=True))
    torch.testing.assert_close(again.network.ram.prototypes, trained.ram.prototypes)
    assert float(again.pixel_threshold) == pytest.approx(0.4)


def test_cosine_decay_and_early_stopping():
    from ignite.engine import Engine, Events

    from ura_monai.bundle import CosineDecay
    from ura_monai.handlers import ValidationEarlyStopping

    decay = CosineDecay(10)
    assert decay(0) == 1.0 and decay(5) == pytest.approx(0.5) and decay(10) == decay(50) == pytest.approx(0.0)
    scores = iter([0.5, 0.6, 0.6, 0.55, 0.9])
    validator = Engine(lambda e, b: None)
    validator.state.key_metric_name = "val_score"

    @validator.on(Events.EPOCH_COMPLETED)
    def _score(engine):
        engine.state.metrics["val_score"] = next(scores)

    trainer = Engine(lambda e, b: validator.run([0]))
    ValidationEarlyStopping(validator, patience=2).attach(trainer)
    trainer.run([0], max_epochs=5)
    assert trainer.state.epoch == 4  # 0.6 at epoch 2, no gain at 3 and 4
