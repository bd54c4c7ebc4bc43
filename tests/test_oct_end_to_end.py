"""OCT-2017 samples end to end through the CLI: grayscale JPEG B-scans of varying sizes (skips without the data)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
from PIL import Image

from ura_monai.cli import main

QUIET = ["--no-progress", "-q"]


def test_oct2017_fit_test_predict(shared_data, tmp_path):
    root = shared_data / "oct2017_samples"
    sizes = {Image.open(p).size for p in root.rglob("*.jpeg")}
    assert len(sizes) > 1  # the point of the test: B-scans of several sizes
    model_dir, test_dir, pred_dir = tmp_path / "model", tmp_path / "test", tmp_path / "pred"

    common = ["--layout", "oct2017", "--root", str(root), "--num-train-normal", "6"]
    assert (
        main(
            [
                "fit",
                *common,
                "--image-size",
                "64",
                "--epochs",
                "1",
                "--augment",
                "hflip",
                "--output",
                str(model_dir),
                *QUIET,
            ]
        )
        == 0
    )
    assert main(["test", "--checkpoint", str(model_dir / "model.pt"), *common, "--output", str(test_dir), *QUIET]) == 0
    metrics = json.loads((test_dir / "metrics.json").read_text())
    assert metrics["test_images"] == 4 + 8 + 10 + 10  # 4 NORMAL left after 6 for training, all abnormal classes
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    assert metrics["pixel_auroc"] is None or math.isnan(metrics["pixel_auroc"])  # image labels only

    scans = sorted((root / "DME").glob("*.jpeg"))[:3]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for scan in scans:
        (inputs / scan.name).write_bytes(scan.read_bytes())
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(model_dir / "model.pt"),
                "--input",
                str(inputs),
                "--output",
                str(pred_dir),
                *QUIET,
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(open(pred_dir / "scores.csv", newline="")))
    assert len(rows) == 3 and all(not r["error"] for r in rows)
    for scan in scans:
        width, height = Image.open(scan).size
        amap = np.load(next(pred_dir.glob(f"{scan.stem}*_anomaly_map.npy")))
        assert amap.shape == (height, width) and np.isfinite(amap).all()
