"""The ``ura-monai`` command line and the file predictor, end to end on the synthetic demo dataset.

One small demo run (64x64 images, one epoch) is shared by the module; everything else reuses its data and
checkpoint, so the module stays well under a minute and a half on two CPU cores.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ura_monai.cli import main
from ura_monai.inference.dicom_inference import SlicePredictor
from ura_monai.inference.image_inference import predict_files
from ura_monai.inference.predictor import URANetPredictor
from ura_monai.metrics import ANOMALY_METRIC_NAMES
from ura_monai.networks.checkpoint import read_checkpoint
from ura_monai.transforms.thresholds import DEFAULT_FALSE_ALARM_RATE

SIZE = 64
QUIET = ["--no-progress", "-q"]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """``ura-monai demo`` at 64x64 for one epoch; returns its output folder."""
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--output", str(out), "--epochs", "1", "--image-size", str(SIZE), *QUIET]) == 0
    return out


@pytest.fixture(scope="module")
def checkpoint(demo) -> Path:
    return demo / "model" / "model.pt"


def _test_images(demo: Path) -> list[Path]:
    return sorted((demo / "data" / "demo" / "test").rglob("*.png"))


def test_demo_writes_metrics_overlays_and_scores(demo, capsys):
    metrics = json.loads((demo / "test" / "metrics.json").read_text())
    assert isinstance(metrics["image_auroc"], float) and 0.0 <= metrics["image_auroc"] <= 1.0
    assert (demo / "test" / "per_image.csv").is_file() and (demo / "test" / "roc_curve.png").is_file()
    # every metric is reported; the decision rates use the checkpoint's stored image threshold and the
    # predictor's rule (score >= threshold) on the per-image scores
    assert set(ANOMALY_METRIC_NAMES) <= set(metrics)
    stored = read_checkpoint(demo / "model" / "model.pt")["postprocessing"]
    assert metrics["image_threshold"] == pytest.approx(stored["image_threshold"], abs=0)
    per_image = _read_csv(demo / "test" / "per_image.csv")
    for label, key in (("0", "normal_fpr"), ("1", "anomalous_tpr")):
        flagged = [float(row["pred_score"]) >= metrics["image_threshold"] for row in per_image if row["label"] == label]
        assert metrics[key] == pytest.approx(sum(flagged) / len(flagged), abs=1e-12)
    # and at other operating points: thresholds from the normal scores the checkpoint keeps, rates recounted here
    normal = read_checkpoint(demo / "model" / "model.pt")["extra"]["normal_image_scores"]
    assert set(metrics["operating_points"]) == {"0.01", "0.02", "0.05", "0.1"}
    for rate, point in metrics["operating_points"].items():
        assert point["image_threshold"] == pytest.approx(np.quantile(normal, 1 - float(rate)), abs=1e-6)
        for label, key in (("0", "normal_fpr"), ("1", "anomalous_tpr")):
            flagged = [
                float(row["pred_score"]) >= point["image_threshold"] for row in per_image if row["label"] == label
            ]
            assert point[key] == pytest.approx(sum(flagged) / len(flagged), abs=1e-4)
    # the checkpoint's uncertainty passes run, so the uncertainty is not constant and the error AUROC exists
    for key in ("pixel_ap", "pixel_f1_max", "uncertainty_error_auroc"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    figures = sorted((demo / "test" / "maps").glob("*.png"))
    assert 1 <= len(figures) <= 8
    assert any("_anomalous_" in f.name for f in figures) and any("_normal_" in f.name for f in figures)

    rows = _read_csv(demo / "predictions" / "scores.csv")
    assert len(rows) == len(_test_images(demo)) == 20
    assert list(rows[0])[:6] == ["path", "score", "normalized_score", "decision", "threshold", "error"]
    for row in rows:
        assert row["error"] == "" and row["decision"] in ("anomalous", "normal")
        assert 0.0 <= float(row["normalized_score"]) <= 1.0
        assert (row["decision"] == "anomalous") == (float(row["score"]) >= float(row["threshold"]))
        assert (demo / "predictions" / row["overlay"]).is_file()
    # test/good/000.png and test/blob/000.png share a stem: outputs are named by the path under test/
    assert (demo / "predictions" / "good_000_overlay.png").is_file() and (
        demo / "predictions" / "blob_000_overlay.png"
    ).is_file()
    assert len(list((demo / "predictions").glob("*_overlay.png"))) == 20
    assert len(list((demo / "predictions").glob("*_anomaly_map.npy"))) == 20
    assert len(list((demo / "predictions").glob("*_uncertainty.npy"))) == 20
    assert len(list((demo / "predictions").glob("*_uncertainty.png"))) == 20


def test_predict_folder_keeps_going_past_bad_files(checkpoint, demo, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    (inputs / "sub").mkdir(parents=True)
    sources = _test_images(demo)
    good = [inputs / "a.png", inputs / "b.png", inputs / "sub" / "c.png"]
    for src, dst in zip(sources[::7], good):
        dst.write_bytes(src.read_bytes())
    (inputs / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    (inputs / "notes.txt").write_text("not an image")
    (inputs / ".DS_Store").write_bytes(b"\x00")  # hidden clutter: ignored, not an error row
    before = {p: _digest(p) for p in inputs.rglob("*") if p.is_file()}

    out = tmp_path / "out"
    code = main(
        [
            "predict",
            "--checkpoint",
            str(checkpoint),
            "--input",
            str(inputs),
            "--output",
            str(out),
            "--batch-size",
            "2",
            "--uncertainty-samples",
            "2",
            *QUIET,
        ]
    )
    assert code == 0
    assert "3 image(s) predicted" in capsys.readouterr().out

    rows = {Path(r["path"]).name: r for r in _read_csv(out / "scores.csv")}
    assert set(rows) == {"a.png", "b.png", "c.png", "corrupt.png", "notes.txt"}
    assert rows["corrupt.png"]["error"] and rows["corrupt.png"]["score"] == ""
    assert "not an image" in rows["notes.txt"]["error"]
    for name, stem in (("a.png", "a"), ("b.png", "b"), ("c.png", "sub_c")):  # named by their path in the input folder
        assert rows[name]["error"] == "" and rows[name]["decision"] in ("anomalous", "normal")
        assert rows[name]["overlay"] == f"{stem}_overlay.png" and (out / f"{stem}_overlay.png").is_file()
    assert {p: _digest(p) for p in inputs.rglob("*") if p.is_file()} == before  # inputs untouched


def test_another_operating_point_comes_from_the_stored_normal_scores(checkpoint, demo, tmp_path, capsys):
    stored = read_checkpoint(checkpoint)
    normal = np.asarray(stored["extra"]["normal_image_scores"])
    assert normal.size > 8 and np.all(np.diff(normal) >= 0)  # cross-fitted training images + held-out ones, sorted
    # the stored threshold is the default operating point of those very scores
    assert stored["postprocessing"]["image_threshold"] == pytest.approx(np.quantile(normal, 0.99), abs=1e-5)
    predictor = URANetPredictor(checkpoint, false_alarm_rate=0.5)
    assert predictor.image_threshold == pytest.approx(np.quantile(normal, 0.5), abs=1e-9)
    assert predictor.false_alarm_rate == 0.5 and URANetPredictor(checkpoint).false_alarm_rate == 0.01
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for source in _test_images(demo):
        (inputs / source.name).write_bytes(source.read_bytes())
    flagged = {}
    for rate in ("0.5", None):
        out = tmp_path / f"out_{rate}"
        args = ["predict", "--checkpoint", str(checkpoint), "--input", str(inputs), "--output", str(out), *QUIET]
        assert main(args + (["--false-alarm-rate", rate] if rate else [])) == 0
        rows = _read_csv(out / "scores.csv")
        expected = predictor.image_threshold if rate else stored["postprocessing"]["image_threshold"]
        assert all(float(r["threshold"]) == pytest.approx(expected, rel=1e-6) for r in rows)
        flagged[rate] = sum(r["decision"] == "anomalous" for r in rows)
    assert flagged["0.5"] >= flagged[None]  # a lower threshold flags at least as many
    # a checkpoint without the scores (written before they were kept) says what to do
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    del state["_extra_state"]["extra"]["normal_image_scores"]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    with pytest.raises(ValueError, match="keeps no normal image scores.*refit"):
        URANetPredictor(old, false_alarm_rate=0.05)
    bad = ["test", "--checkpoint", str(old), "--layout", "mvtec", "--root", str(demo / "data"), "--category", "demo"]
    assert main([*bad, "--false-alarm-rate", "0.05", "--output", str(tmp_path / "t"), *QUIET]) == 2
    assert "--false-alarm-rate:" in capsys.readouterr().err


def test_outputs_never_overwrite_inputs(checkpoint, demo, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    src = _test_images(demo)[0]
    (inputs / "x.png").write_bytes(src.read_bytes())

    # an output folder inside the input folder is refused before anything is written
    code = main(
        [
            "predict",
            "--checkpoint",
            str(checkpoint),
            "--input",
            str(inputs),
            "--output",
            str(inputs / "results"),
            *QUIET,
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "inside the input folder" in err and "Traceback" not in err
    assert not (inputs / "results").exists()

    # an input whose name is another input's output name is never replaced: the inputs' own folder is refused
    (inputs / "x_overlay.png").write_bytes(src.read_bytes())
    digest = _digest(inputs / "x_overlay.png")
    predictor = URANetPredictor(checkpoint, num_samples=0)
    with pytest.raises(ValueError, match="folder of the input file"):
        predict_files([inputs / "x.png", inputs / "x_overlay.png"], inputs, predictor, progress=False)
    assert _digest(inputs / "x_overlay.png") == digest and not (inputs / "scores.csv").exists()
    with pytest.raises(ValueError, match="inside the input folder"):
        predict_files([inputs / "x.png"], inputs / "out", predictor, input_root=inputs, progress=False)


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "model.pt"
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    assert (
        main(["predict", "--checkpoint", str(missing), "--input", str(image), "--output", str(tmp_path / "o"), *QUIET])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("ura-monai: error:") and str(missing) in err and "\n" not in err and "Traceback" not in err

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    assert (
        main(["predict", "--checkpoint", str(garbage), "--input", str(image), "--output", str(tmp_path / "o"), *QUIET])
        == 2
    )
    assert str(garbage) in capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        main(["predict", "--checkpoint", str(garbage), "--input", str(empty), "--output", str(tmp_path / "o"), *QUIET])
        == 2
    )
    assert "no files" in capsys.readouterr().err

    assert (
        main(
            [
                "fit",
                "--layout",
                "mvtec",
                "--root",
                str(tmp_path / "missing_root"),
                "--output",
                str(tmp_path / "f"),
                *QUIET,
            ]
        )
        == 2
    )
    assert "missing_root" in capsys.readouterr().err

    with pytest.raises(FileNotFoundError):  # --debug shows the real exception
        main(
            [
                "predict",
                "--checkpoint",
                str(missing),
                "--input",
                str(image),
                "--output",
                str(tmp_path / "o"),
                "--debug",
                *QUIET,
            ]
        )


def test_predictor_outputs_are_at_the_original_size(checkpoint, tmp_path):
    predictor = URANetPredictor(checkpoint, num_samples=2, batch_size=3)
    assert isinstance(predictor, SlicePredictor)
    assert (
        predictor.image_size == SIZE and predictor.image_threshold is not None and predictor.pixel_threshold is not None
    )

    out = predictor(torch.rand(4, 1, 40, 90))  # grey, non-square, batch larger than batch_size
    assert out["anomaly_map"].shape == (4, 40, 90) and out["uncertainty_map"].shape == (4, 40, 90)
    assert out["pred_score"].shape == (4,) and out["pred_label"].dtype == torch.bool
    assert torch.equal(out["pred_label"], out["pred_score"] >= predictor.image_threshold)
    assert ((out["pred_score_normalized"] >= 0) & (out["pred_score_normalized"] <= 1)).all()

    rng = np.random.default_rng(0)
    files = {"grey.png": (50, 77), "colour.jpg": (100, 60)}
    Image.fromarray(rng.integers(0, 255, (50, 77), dtype=np.uint8)).save(tmp_path / "grey.png")
    Image.fromarray(rng.integers(0, 255, (100, 60, 3), dtype=np.uint8)).save(tmp_path / "colour.jpg")
    out_dir = tmp_path / "pred"
    rows = predict_files([tmp_path / name for name in files], out_dir, predictor, progress=False)
    assert all(r["error"] == "" for r in rows)
    for name, size in files.items():
        stem = Path(name).stem
        assert np.load(out_dir / f"{stem}_anomaly_map.npy").shape == size
        uncertainty = np.load(out_dir / f"{stem}_uncertainty.npy")
        assert uncertainty.shape == size and uncertainty.dtype == np.float32
        with Image.open(out_dir / f"{stem}_overlay.png") as overlay:
            assert overlay.size == (size[1], size[0]) and overlay.mode == "RGB"


def test_fit_is_deterministic(demo, checkpoint, tmp_path, capsys):
    # the same settings as the demo's own fit: a second fit with the same seed must give the same model
    out = tmp_path / "fit"
    code = main(
        [
            "fit",
            "--layout",
            "mvtec",
            "--root",
            str(demo / "data"),
            "--category",
            "demo",
            "--image-size",
            str(SIZE),
            "--epochs",
            "1",
            "--seed",
            "0",
            "--output",
            str(out),
            *QUIET,
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert Path(summary["checkpoint"]) == out / "model.pt"
    assert math.isfinite(summary["postprocessing"]["image_threshold"])

    images = torch.stack(
        [
            torch.from_numpy(np.asarray(Image.open(p), np.float32) / 255.0).permute(2, 0, 1)
            for p in _test_images(demo)[:4]
        ]
    )
    first = URANetPredictor(checkpoint, num_samples=2)(images)
    second = URANetPredictor(out / "model.pt", num_samples=2)(images)
    for key in ("anomaly_map", "uncertainty_map", "pred_score"):
        assert torch.allclose(first[key], second[key], atol=1e-6, rtol=0), key
    assert summary["postprocessing"] == pytest.approx(read_checkpoint(checkpoint)["postprocessing"], abs=1e-6)


def test_fit_map_source_is_stored_and_used(demo, checkpoint, tmp_path, capsys):
    out = tmp_path / "fit"
    code = main(
        [
            "fit",
            "--layout",
            "mvtec",
            "--root",
            str(demo / "data"),
            "--category",
            "demo",
            "--image-size",
            str(SIZE),
            "--epochs",
            "1",
            "--map-source",
            "restoration",
            "--perception-members",
            "2",
            "--guided-radius",
            "0",
            "--false-alarm-rate",
            "0.2",
            "--output",
            str(out),
            *QUIET,
        ]
    )
    assert code == 0
    stored = read_checkpoint(out / "model.pt")
    assert stored["config"]["anomaly_map_source"] == "restoration" and stored["config"]["perception_members"] == 2
    assert stored["postprocessing"]["image_false_alarm_rate"] == 0.2
    assert read_checkpoint(checkpoint)["postprocessing"]["image_false_alarm_rate"] == DEFAULT_FALSE_ALARM_RATE
    assert any(k.startswith("uiapm.members.1.") for k in stored["state_dict"])
    assert stored["config"]["guided_radius"] == 0 and stored["config"]["sigma"] == 4.0  # the Gaussian map instead
    bad = ["fit", "--layout", "mvtec", "--root", str(demo / "data"), "--category", "demo", "--perception-members", "0"]
    with pytest.raises(SystemExit) as exit_info:
        main([*bad, "--output", str(tmp_path / "bad"), *QUIET])
    assert exit_info.value.code == 2 and "--perception-members: must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*bad[:-2], "--false-alarm-rate", "1", "--output", str(tmp_path / "bad"), *QUIET])
    assert exit_info.value.code == 2 and "--false-alarm-rate: must be between 0 and 1" in capsys.readouterr().err
    images = torch.stack(
        [
            torch.from_numpy(np.asarray(Image.open(p), np.float32) / 255.0).permute(2, 0, 1)
            for p in _test_images(demo)[:2]
        ]
    )
    restoration = URANetPredictor(out / "model.pt", num_samples=0)(images)["anomaly_map"]
    prototype = URANetPredictor(checkpoint, num_samples=0)(images)["anomaly_map"]
    assert not torch.allclose(restoration, prototype)  # another map, not the default under another name


def test_fit_ram_network_transformer_is_stored_and_trained(demo, tmp_path):
    """--ram-network transformer: the checkpoint holds the restoration transformer, its residual calibration and the
    3-signal perception, and predicts."""
    out = tmp_path / "fit"
    args = ["fit", "--layout", "mvtec", "--root", str(demo / "data"), "--category", "demo", "--image-size", str(SIZE)]
    assert main([*args, "--epochs", "1", "--ram-network", "transformer", "--output", str(out), *QUIET]) == 0
    checkpoint = read_checkpoint(out / "model.pt")
    assert checkpoint["config"]["ram_network"] == "transformer"
    assert any(k.startswith("ram.blocks.") for k in checkpoint["state_dict"])
    assert checkpoint["state_dict"]["residual_calibration"][1] != 1.0  # calibrated on the training features
    image = torch.from_numpy(np.asarray(Image.open(_test_images(demo)[0]), np.float32) / 255.0).permute(2, 0, 1)
    out_maps = URANetPredictor(out / "model.pt", num_samples=2)(image[None])
    assert torch.isfinite(out_maps["anomaly_map"]).all() and out_maps["uncertainty_map"].max() > 0


def test_python_dash_m_entry_point(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["ura-monai", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("ura_monai", run_name="__main__")
    assert exit_info.value.code == 0
    assert "predict" in capsys.readouterr().out


def test_fit_help_states_the_default_operating_point(capsys):
    # the torch-free parser cannot import the constant: its help repeats it, and must stay in step
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert f"(default {DEFAULT_FALSE_ALARM_RATE};" in " ".join(capsys.readouterr().out.split())


def test_help_does_not_import_torch():
    # the CLI's choices come from the torch-free ura_monai.utils.enums, so `--help` stays fast
    code = "import sys; from ura_monai.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_predict_dicom_on_the_shared_mr_series(checkpoint, shared_data, tmp_path, capsys):
    """``ura-monai predict-dicom``: one series found, NIfTI maps with its 192 slices, a results row; outputs
    inside the input folder are refused."""
    import nibabel as nib

    series_dir = shared_data / "dicom" / "mr_brain_sagittal"
    out = tmp_path / "dicom_out"
    args = ["predict-dicom", "--checkpoint", str(checkpoint), "--input", str(series_dir), "--output", str(out), *QUIET]
    assert main(args) == 0
    rows = _read_csv(out / "results.csv")
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 1
    nifti = next(out.rglob("anomaly_map.nii.gz"))
    assert 192 in nib.load(nifti).shape
    assert (
        main(
            [
                "predict-dicom",
                "--checkpoint",
                str(checkpoint),
                "--input",
                str(series_dir),
                "--output",
                str(series_dir / "out"),
                *QUIET,
            ]
        )
        == 2
    )
    assert not (series_dir / "out").exists()
