"""Post-processing transforms and result writers (fast, CPU only)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from ura_monai.data import writers
from ura_monai.data.writers import (
    output_path_for,
    save_array,
    save_map_figure,
    save_png,
    save_roc_curve_png,
    write_csv,
)
from ura_monai.transforms import (
    NormalizeAnomalyScore,
    NormalizeAnomalyScored,
    RenderHeatmapOverlay,
    RenderHeatmapOverlayd,
    SmoothAnomalyMap,
    SmoothAnomalyMapd,
    ThresholdAnomalyMap,
    ThresholdAnomalyMapd,
    normal_postprocessing_stats,
)

# --------------------------------------------------------------------------- smoothing


def _delta(size: int = 81) -> np.ndarray:
    x = np.zeros((1, size, size), dtype=np.float32)
    x[0, size // 2, size // 2] = 1.0
    return x


@pytest.mark.parametrize("sigma", [2.0, 4.0])
def test_smooth_delta_is_gaussian_with_sigma(sigma):
    out = SmoothAnomalyMap(sigma)(_delta())
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (1, 81, 81)
    assert out.sum() == pytest.approx(1.0, abs=1e-5)  # normalized kernel: mass preserved
    profile = out[0].sum(axis=0).astype(np.float64)  # marginal along x
    grid = np.arange(81) - 40
    assert (profile * grid).sum() == pytest.approx(0.0, abs=1e-6)  # centred
    std = math.sqrt((profile * grid**2).sum())
    # monai's "erf" kernel integrates the Gaussian over each pixel: variance sigma^2 + 1/12, truncated at 4 sigma
    assert std == pytest.approx(math.sqrt(sigma**2 + 1 / 12), rel=0.01)
    assert abs(std - sigma) < 0.05
    # separable and isotropic
    np.testing.assert_allclose(out[0], out[0].T, atol=1e-7)
    assert out[0, 40, 40] == out.max()


def test_smooth_reflect_borders_and_types():
    smoother = SmoothAnomalyMap(4.0)
    flat = np.full((1, 40, 40), 3.0, dtype=np.float32)
    np.testing.assert_allclose(smoother(flat), flat, rtol=1e-5)  # reflect: no darkening at the edges
    # an anomaly touching the border keeps its strength there (zero padding would halve it)
    edge = np.zeros((1, 40, 40), dtype=np.float32)
    edge[0, :, :20] = 1.0
    assert smoother(edge)[0, 20, 0] == pytest.approx(1.0, abs=1e-4)
    assert smoother(edge)[0, 20, 19] == pytest.approx(0.5, abs=0.06)

    batch = torch.rand(2, 1, 40, 40, dtype=torch.float64)
    out = smoother(batch)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64 and out.shape == batch.shape
    np.testing.assert_allclose(out[1].numpy(), smoother(batch[1].numpy()), atol=1e-10)
    meta = smoother(MetaTensor(torch.rand(1, 40, 40)))
    assert isinstance(meta, MetaTensor)
    np.testing.assert_array_equal(SmoothAnomalyMap(0.0)(flat), flat)
    with pytest.raises(ValueError):
        smoother(np.zeros((40, 40)))
    with pytest.raises(ValueError):
        smoother(np.zeros((1, 10, 10)))  # smaller than the kernel radius


def test_smooth_reuses_the_network_generator():
    from ura_monai.networks.blocks.anomaly_map import AnomalyMapGenerator

    x = torch.rand(1, 1, 48, 48)
    np.testing.assert_allclose(
        SmoothAnomalyMap(4.0)(x).numpy(), AnomalyMapGenerator(4.0)(x, (48, 48)).numpy(), atol=1e-7
    )


# --------------------------------------------------------------------------- normalization and threshold


def test_normalize_hand_checked():
    norm = NormalizeAnomalyScore(threshold=2.0, min_value=0.0, max_value=4.0)
    # (x - 2) / 4 + 0.5
    assert norm(2.0) == 0.5
    assert norm(3.0) == 0.75
    assert norm(0.0) == 0.0
    assert norm(1.0) == 0.25
    assert norm(10.0) == 1.0  # 2.5 clipped
    assert norm(-5.0) == 0.0  # -1.25 clipped
    # threshold off centre: the minimum falls below 0 and is clipped
    low = NormalizeAnomalyScore(threshold=3.0, min_value=1.0, max_value=3.0)
    assert low(1.0) == 0.0  # (1 - 3) / 2 + 0.5 = -0.5 -> 0
    assert low(3.0) == 0.5
    assert low(2.5) == 0.25

    scores = torch.tensor([0.0, 2.0, 3.0, 10.0])
    torch.testing.assert_close(norm(scores), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    out_np = norm(np.array([[0, 1], [2, 3]], dtype=np.int64))  # integers become float32
    assert out_np.dtype == np.float32
    np.testing.assert_allclose(out_np, [[0.0, 0.25], [0.5, 0.75]])
    amap = np.random.default_rng(0).uniform(0, 4, (1, 8, 8)).astype(np.float64)
    out_map = norm(amap)
    assert out_map.dtype == np.float64 and out_map.shape == amap.shape
    assert out_map.min() >= 0 and out_map.max() <= 1
    with pytest.raises(ValueError):
        NormalizeAnomalyScore(1.0, 2.0, 2.0)


def test_normal_stats_threshold_is_the_quantile_of_the_false_alarm_rate():
    scores = torch.arange(101, dtype=torch.float64)  # 0..100: the q quantile is 100 q
    default = normal_postprocessing_stats(scores)
    assert default["image_threshold"] == pytest.approx(99.0)
    assert (default["image_min"], default["image_max"], default["image_false_alarm_rate"]) == (0.0, 198.0, 0.01)
    assert normal_postprocessing_stats(scores, false_alarm_rate=0.1)["image_threshold"] == pytest.approx(90.0)
    for rate in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="false_alarm_rate"):
            normal_postprocessing_stats(scores, false_alarm_rate=rate)


def test_threshold_mask():
    amap = np.array([[[0.1, 0.5], [0.49, 0.9]]], dtype=np.float32)
    mask = ThresholdAnomalyMap(0.5)(amap)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, [[[0, 1], [0, 1]]])
    mask_t = ThresholdAnomalyMap(0.5)(torch.from_numpy(amap))
    assert mask_t.dtype == torch.uint8
    np.testing.assert_array_equal(mask_t.numpy(), mask)
    mask_f = ThresholdAnomalyMap(0.5, dtype=torch.float32)(torch.from_numpy(amap))
    assert mask_f.dtype == torch.float32 and mask_f.sum().item() == 2.0


def test_dict_wrappers_match_array_forms():
    rng = np.random.default_rng(1)
    amap = torch.from_numpy(rng.uniform(0, 2, (1, 40, 40)).astype(np.float32))
    data = {"anomaly_map": amap, "pred_score": torch.tensor(1.5), "image_path": "a.png"}

    smoothed = SmoothAnomalyMapd("anomaly_map", sigma=2.0)(data)
    torch.testing.assert_close(smoothed["anomaly_map"], SmoothAnomalyMap(2.0)(amap))
    assert smoothed["image_path"] == "a.png" and data["anomaly_map"] is amap  # input dict untouched

    normed = NormalizeAnomalyScored(["anomaly_map", "pred_score"], threshold=1.0, min_value=0.0, max_value=2.0)(data)
    array_norm = NormalizeAnomalyScore(1.0, 0.0, 2.0)
    torch.testing.assert_close(normed["anomaly_map"], array_norm(amap))
    torch.testing.assert_close(normed["pred_score"], torch.tensor(0.75))

    masked = ThresholdAnomalyMapd("anomaly_map", threshold=1.0, output_keys="pred_mask")(data)
    torch.testing.assert_close(masked["pred_mask"], ThresholdAnomalyMap(1.0)(amap))
    assert masked["anomaly_map"] is amap

    with pytest.raises(KeyError):
        SmoothAnomalyMapd("missing")(data)
    assert SmoothAnomalyMapd("missing", allow_missing_keys=True)(data)["anomaly_map"] is amap


# --------------------------------------------------------------------------- overlay


def _image_and_map(h: int = 32, w: int = 48):
    image = np.tile(np.linspace(0.2, 0.8, w, dtype=np.float32), (3, h, 1))
    amap = np.zeros((1, h, w), dtype=np.float32)
    amap[0, 8:16, 8:16] = 5.0  # a hot square
    return image, amap


def test_overlay_shape_alpha_and_colour():
    image, amap = _image_and_map()
    out = RenderHeatmapOverlay(alpha=0.5)(image, amap)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (32, 48, 3)

    untouched = RenderHeatmapOverlay(alpha=0.0)(torch.from_numpy(image), torch.from_numpy(amap))
    np.testing.assert_array_equal(untouched, np.rint(image.transpose(1, 2, 0) * 255).astype(np.uint8))

    heat = RenderHeatmapOverlay(alpha=1.0, colormap="jet")(image[:1], amap)  # grey image works too
    hot, cold = heat[10, 10].astype(int), heat[30, 40].astype(int)
    assert hot[0] > 100 and hot[0] > hot[2]  # jet high end: red
    assert cold[2] > 100 and cold[2] > cold[0]  # jet low end: blue

    # fixed vmin/vmax: a map far below vmax stays at the cold end
    faint = RenderHeatmapOverlay(alpha=1.0, vmin=0.0, vmax=100.0)(image, amap)
    assert faint[10, 10, 2] > faint[10, 10, 0]
    # a flat map does not divide by zero
    assert RenderHeatmapOverlay()(image, np.zeros_like(amap)).shape == (32, 48, 3)
    with pytest.raises(ValueError):
        RenderHeatmapOverlay()(image, amap[:, :16])


def test_overlay_mask_contour_and_dict():
    image, amap = _image_and_map()
    mask = ThresholdAnomalyMap(1.0)(amap)
    out = RenderHeatmapOverlay(alpha=0.5, contour_color=(0, 255, 0))(image, amap, mask)
    default = RenderHeatmapOverlay(alpha=0.5)(image, amap, mask)
    np.testing.assert_array_equal(default[8, 12], [255, 255, 255])  # white contour by default
    np.testing.assert_array_equal(out[8, 12], [0, 255, 0])  # on the square's edge
    np.testing.assert_array_equal(out[15, 15], [0, 255, 0])
    assert not np.array_equal(out[12, 12], [0, 255, 0])  # inside stays heatmap
    assert not np.array_equal(out[25, 30], [0, 255, 0])  # far away untouched

    data = {"image": torch.from_numpy(image), "anomaly_map": torch.from_numpy(amap), "pred_mask": mask}
    d = RenderHeatmapOverlayd(
        "image", "anomaly_map", "overlay", alpha=0.5, mask_key="pred_mask", contour_color=(0, 255, 0)
    )(data)
    np.testing.assert_array_equal(d["overlay"], out)
    d = RenderHeatmapOverlayd("image", "anomaly_map", "overlay", alpha=0.3, vmin=0.0, vmax=10.0)(data)
    np.testing.assert_array_equal(d["overlay"], RenderHeatmapOverlay(0.3, vmin=0.0, vmax=10.0)(image, amap))
    with pytest.raises(KeyError):
        RenderHeatmapOverlayd("image", "nope", "overlay")(data)
    assert "overlay" not in RenderHeatmapOverlayd("image", "nope", "overlay", allow_missing_keys=True)(data)


# --------------------------------------------------------------------------- writers


def _no_temporaries(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".tmp")] == []


def test_save_png_and_array_atomic(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (16, 20, 3), dtype=np.uint8)
    path = save_png(tmp_path / "overlay.png", rgb)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (20, 16)
        np.testing.assert_array_equal(np.asarray(img), rgb)
    with pytest.raises(ValueError):
        save_png(tmp_path / "bad.png", rgb.astype(np.float32))

    arr = save_array(tmp_path / "map.npy", torch.rand(1, 8, 8, dtype=torch.float64))
    loaded = np.load(arr)
    assert loaded.dtype == np.float32 and loaded.shape == (1, 8, 8)
    with pytest.raises(ValueError):
        save_array(tmp_path / "map.bin", loaded)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.npy", "overlay.png"]


def test_failure_mid_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "overlay.png"
    old = np.zeros((4, 4, 3), dtype=np.uint8)
    save_png(path, old)
    before = path.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as stream:  # half a file, then a crash
            stream.write(b"\x89PNG partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_png(path, np.full((4, 4, 3), 255, dtype=np.uint8))
    assert path.read_bytes() == before
    assert _no_temporaries(tmp_path)

    npy = tmp_path / "map.npy"
    save_array(npy, np.ones(3))

    def broken_np_save(stream, *args, **kwargs):
        stream.write(b"\x93NUMPY partial")
        raise OSError("interrupted")

    monkeypatch.setattr(writers.np, "save", broken_np_save)
    with pytest.raises(OSError, match="interrupted"):
        save_array(npy, np.zeros(3))
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(npy), np.ones(3))
    assert _no_temporaries(tmp_path)


def test_write_csv_stable_columns(tmp_path):
    rows = [
        {"image": "a.png", "score": np.float32(0.25), "label": 0},
        {"label": 1, "image": "b.png", "score": torch.tensor(0.5), "defect": "crack"},
        {"image": "c.png", "extra": None},
    ]
    path = write_csv(tmp_path / "scores.csv", rows)
    text = path.read_text()
    assert text.splitlines()[0] == "image,score,label,defect,extra"
    with open(path, newline="") as stream:
        table = list(csv.DictReader(stream))
    assert table[0] == {"image": "a.png", "score": "0.25", "label": "0", "defect": "", "extra": ""}
    assert table[1] == {"image": "b.png", "score": "0.5", "label": "1", "defect": "crack", "extra": ""}
    assert table[2]["image"] == "c.png" and table[2]["score"] == ""
    # rewriting replaces the whole file, atomically
    write_csv(path, rows[:1], fieldnames=["id"])
    assert path.read_text().splitlines() == ["id,image,score,label", ",a.png,0.25,0"]
    write_csv(tmp_path / "empty.csv", [])
    assert (tmp_path / "empty.csv").read_text() == ""
    assert _no_temporaries(tmp_path)


def test_roc_curve_png(tmp_path):
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.2])
    labels = np.array([0, 0, 1, 1, 1, 0])
    path = save_roc_curve_png(tmp_path / "roc" / "image_roc.png", scores, labels, title="image ROC")
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 100
    assert _no_temporaries(path.parent)
    with pytest.raises(ValueError):
        save_roc_curve_png(tmp_path / "bad.png", scores, np.zeros(6))


def test_map_figure_png(tmp_path):
    image, amap = _image_and_map()
    path = save_map_figure(
        tmp_path / "fig.png",
        torch.from_numpy(image),
        amap,
        np.full((1, 32, 48), 0.3),
        score=5.0,
        threshold=1.0,
        image_threshold=2.0,
    )
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > img.size[1]  # a wide 1x3 panel


def test_output_path_for(tmp_path):
    inputs = tmp_path / "data"
    (inputs / "good").mkdir(parents=True)
    (inputs / "crack").mkdir()
    a, b = inputs / "good" / "000.png", inputs / "crack" / "000.png"
    a.write_bytes(b"x")
    b.write_bytes(b"y")
    out_dir = tmp_path / "out"

    taken: set[str] = set()
    first = output_path_for(a, out_dir, "_overlay.png", input_root=inputs, taken=taken)
    second = output_path_for(b, out_dir, "_overlay.png", input_root=inputs, taken=taken)
    assert first == out_dir / "000_overlay.png"
    assert second.parent == out_dir and second.name.startswith("000-") and second.name.endswith("_overlay.png")
    assert second != first and len(taken) == 2
    # deterministic: the same input gets the same hash
    assert output_path_for(b, out_dir, "_overlay.png", taken={"000_overlay.png"}) == second

    assert output_path_for("scan 1 (copy).nii.gz", out_dir, ".npy").name == "scan_1_copy_.npy"
    assert output_path_for("../..hidden.png", out_dir, ".npy").name == "hidden.npy"

    with pytest.raises(ValueError, match="overwrite"):
        output_path_for(a, a.parent, ".png")  # would be the input file itself
    with pytest.raises(ValueError, match="input tree"):
        output_path_for(a, inputs / "results", "_overlay.png", input_root=inputs)
    with pytest.raises(ValueError, match="input tree"):
        output_path_for(a, inputs, "_overlay.png", input_root=inputs)
    with pytest.raises(ValueError):
        output_path_for(a, out_dir, "/../x.png")
    # next to the inputs but outside input_root is fine
    assert output_path_for(a, tmp_path / "data_out", "_m.png", input_root=inputs).parent == tmp_path / "data_out"
