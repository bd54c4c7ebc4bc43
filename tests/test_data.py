"""Tests of ura_monai.data: datalists of the supported layouts, loading transforms and the demo dataset."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from PIL import Image

from ura_monai.data import (
    DEMO_DEFECT_TYPES,
    LoadAnomalyImage,
    LoadAnomalyImaged,
    SkippedFileWarning,
    anomaly_transforms,
    btad_datalist,
    build_datalist,
    folder_datalist,
    load_image_tensor,
    make_demo_dataset,
    mvtec_datalist,
    oct2017_datalist,
)

ITEM_KEYS = {"image", "label", "mask", "has_mask", "defect_type", "category"}


def _write_png(path: Path, size: tuple[int, int] = (24, 32), value: int | None = None, rgb: bool = True, seed: int = 0):
    """Small random (or constant) 8-bit image of size (H, W) at ``path``; returns the pixel array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (*size, 3) if rgb else size
    rng = np.random.default_rng(seed)
    array = np.full(shape, value, np.uint8) if value is not None else rng.integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(array).save(path)
    return array


def _write_mask(path: Path, size: tuple[int, int] = (24, 32)) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(size, np.uint8)
    mask[size[0] // 4 : size[0] // 2, size[1] // 4 : size[1] // 2] = 255
    Image.fromarray(mask).save(path)
    return mask


# --------------------------------------------------------------------------- real sample data


def test_hazelnut_mvtec_layout(shared_data):
    root = shared_data / "hazelnut_toy" / "hazelnut"
    train = mvtec_datalist(root, None, "train")
    test = build_datalist("mvtec", root.parent, category="hazelnut", split="test")

    assert len(train) == 28 and len(test) == 23
    assert all(set(item) == ITEM_KEYS for item in train + test)
    assert all(item["label"] == 0 and item["defect_type"] == "good" and item["mask"] is None for item in train)
    assert {item["category"] for item in train + test} == {"hazelnut"}

    colour = [item for item in test if item["defect_type"] == "colour"]
    good = [item for item in test if item["defect_type"] == "good"]
    assert len(colour) == 17 and len(good) == 6
    assert sum(item["has_mask"] for item in test) == 17
    # masks use the image's own stem (no _mask suffix) and are found for every colour image
    for item in colour:
        assert item["label"] == 1 and item["has_mask"]
        assert Path(item["mask"]).stem == Path(item["image"]).stem
    assert all(item["label"] == 0 and not item["has_mask"] for item in good)


def test_hazelnut_batches_through_monai_dataloader(shared_data):
    root = shared_data / "hazelnut_toy" / "hazelnut"
    test = mvtec_datalist(root, None, "test")
    loader = DataLoader(Dataset(test[:4], anomaly_transforms(image_size=(96, 128))), batch_size=4)
    batch = next(iter(loader))

    assert batch["image"].shape == (4, 3, 96, 128) and batch["image"].dtype == torch.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["mask"].shape == (4, 1, 96, 128) and batch["mask"].dtype == torch.float32
    assert set(batch["mask"].unique().tolist()) == {0.0, 1.0}  # resized masks stay binary
    assert batch["mask"].flatten(1).sum(1).min() > 0  # every colour defect is still visible at 96x128
    assert batch["label"].tolist() == [1, 1, 1, 1]
    assert batch["has_mask"].tolist() == [True] * 4
    assert batch["orig_size"].tolist() == [[512, 512]] * 4
    assert batch["image_path"] == [item["image"] for item in test[:4]]


def test_oct2017_flat_root(shared_data):
    root = shared_data / "oct2017_samples"
    train = oct2017_datalist(root, "train", num_train_normal=5)
    test = build_datalist("oct2017", root, split="test", num_train_normal=5)

    assert len(train) == 5 and len(test) == 33
    assert all(item["label"] == 0 and item["defect_type"] == "good" for item in train)
    assert not {item["image"] for item in train} & {item["image"] for item in test}
    assert sum(item["label"] == 0 for item in test) == 5
    assert {item["defect_type"] for item in test if item["label"] == 1} == {"CNV", "DME", "DRUSEN"}
    assert not any(item["has_mask"] for item in test)
    # deterministic: the first 5 sorted NORMAL files
    assert [Path(item["image"]).name for item in train] == sorted(p.name for p in (root / "NORMAL").iterdir())[:5]

    # grey scans of varying size load as one channel at the requested size
    transform = anomaly_transforms(256)
    sizes = set()
    for item in test:
        out = transform(item)
        assert out["image"].shape == (1, 256, 256)
        assert out["mask"].shape == (1, 256, 256) and out["mask"].sum() == 0
        sizes.add(tuple(out["orig_size"].tolist()))
    assert len(sizes) > 1


def test_oct2017_released_layout(tmp_path):
    for split, cls, n in [("train", "NORMAL", 3), ("train", "CNV", 2), ("test", "NORMAL", 2), ("test", "DME", 2)]:
        for i in range(n):
            _write_png(tmp_path / split / cls / f"{cls}-{i}.jpeg".replace(".jpeg", ".png"), rgb=False, seed=i)
    train = oct2017_datalist(tmp_path, "train")
    test = oct2017_datalist(tmp_path, "test")
    assert len(train) == 3 and all(item["label"] == 0 for item in train)
    assert [item["label"] for item in test] == [1, 1, 0, 0]
    assert len(oct2017_datalist(tmp_path, "train", num_train_normal=2)) == 2


# --------------------------------------------------------------------------- generated layouts


def test_btad_layout(tmp_path):
    product = tmp_path / "01"
    for i in range(3):
        _write_png(product / "train" / "ok" / f"{i:04d}.png", seed=i)
    _write_png(product / "test" / "ok" / "0000.png", seed=10)
    _write_png(product / "test" / "ko" / "0000.png", seed=11)
    _write_png(product / "test" / "ko" / "0001.png", seed=12)
    _write_png(product / "test" / "ko" / "0002.png", seed=13)
    _write_mask(product / "ground_truth" / "ko" / "0000.png")
    Image.fromarray(_write_mask(tmp_path / "tmp.png")).save(product / "ground_truth" / "ko" / "0001.bmp")

    train = btad_datalist(tmp_path, "01", "train")
    test = build_datalist("btad", product, split="test")
    assert len(train) == 3 and all(item["category"] == "01" and item["label"] == 0 for item in train)
    assert [(item["label"], item["defect_type"], item["has_mask"]) for item in test] == [
        (0, "good", False),
        (1, "ko", True),
        (1, "ko", True),
        (1, "ko", False),
    ]
    assert test[2]["mask"].endswith("0001.bmp")
    out = anomaly_transforms(16)(test[2])
    assert out["mask"].sum() > 0 and out["has_mask"]


def test_folder_layout_with_explicit_dirs(tmp_path):
    for i in range(2):
        _write_png(tmp_path / "normal" / f"n{i}.png", seed=i)
    _write_png(tmp_path / "test_ok" / "t0.png", seed=5)
    _write_png(tmp_path / "bad" / "b0.png", seed=6)
    _write_png(tmp_path / "bad" / "scratch" / "b1.png", seed=7)
    _write_mask(tmp_path / "masks" / "b0_mask.png")
    _write_mask(tmp_path / "masks" / "scratch" / "b1.png")

    train = build_datalist("folder", tmp_path / "normal", split="train")
    test = folder_datalist(
        tmp_path / "normal", tmp_path / "test_ok", tmp_path / "bad", tmp_path / "masks", split="test"
    )
    assert len(train) == 2 and all(item["label"] == 0 for item in train)
    assert [(Path(it["image"]).name, it["label"], it["defect_type"], it["has_mask"]) for it in test] == [
        ("t0.png", 0, "good", False),
        ("b0.png", 1, "bad", True),
        ("b1.png", 1, "scratch", True),
    ]
    with pytest.raises(ValueError, match="test_normal_dir"):
        folder_datalist(tmp_path / "normal", split="test")


def test_folder_layout_dataset_root(tmp_path):
    _write_png(tmp_path / "train" / "a.png")
    _write_png(tmp_path / "test" / "normal" / "b.png")
    _write_png(tmp_path / "test" / "crack" / "c.png")
    _write_mask(tmp_path / "ground_truth" / "crack" / "c_mask.png")

    train = build_datalist("folder", tmp_path, split="train")
    test = build_datalist("folder", tmp_path, split="test")
    assert len(train) == 1
    assert [(it["label"], it["defect_type"], it["has_mask"]) for it in test] == [(0, "good", False), (1, "crack", True)]
    with pytest.raises(ValueError, match="unknown dataset layout"):
        build_datalist("nope", tmp_path)


# --------------------------------------------------------------------------- bad input


def test_corrupt_and_non_image_files_are_skipped_with_warning(tmp_path):
    good_dir = tmp_path / "cat" / "train" / "good"
    for i in range(3):
        _write_png(good_dir / f"{i:03d}.png", seed=i)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "x.jpg")
    full = (tmp_path / "x.jpg").read_bytes()
    (good_dir / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (good_dir / "notes.txt").write_text("not an image")
    (good_dir / ".DS_Store").write_bytes(b"\0\0")  # hidden clutter: ignored silently

    skipped: list = []
    with pytest.warns(SkippedFileWarning) as record:
        items = mvtec_datalist(tmp_path, "cat", "train", skipped=skipped)
    messages = [str(w.message) for w in record]
    assert len(items) == 3
    assert any(str(good_dir / "truncated.jpg") in m and "truncated" in m for m in messages)
    assert any(str(good_dir / "notes.txt") in m and "not an image" in m for m in messages)
    assert sorted(Path(p).name for p, _ in skipped) == ["notes.txt", "truncated.jpg"]
    # the remaining items load
    assert all(anomaly_transforms(16)(item)["image"].shape == (3, 16, 16) for item in items)


def test_missing_and_empty_folders_raise_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        mvtec_datalist(tmp_path, "nothing", "train")
    (tmp_path / "cat").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "cat" / "train" / "good")):
        mvtec_datalist(tmp_path, "cat", "train")
    empty = tmp_path / "cat" / "train" / "good"
    empty.mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here")
    with pytest.warns(SkippedFileWarning), pytest.raises(ValueError, match=str(empty)):
        mvtec_datalist(tmp_path, "cat", "train")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "cat" / "test")):
        mvtec_datalist(tmp_path, "cat", "test")
    with pytest.raises(ValueError, match="num_train_normal"):
        (tmp_path / "oct" / "NORMAL").mkdir(parents=True)
        _write_png(tmp_path / "oct" / "NORMAL" / "n.png")
        oct2017_datalist(tmp_path / "oct", "train", num_train_normal=5)


def test_mask_size_mismatch_names_both_files(tmp_path):
    image = tmp_path / "img.png"
    mask = tmp_path / "img_mask.png"
    _write_png(image, size=(24, 32))
    _write_mask(mask, size=(20, 20))
    item = {"image": str(image), "mask": str(mask), "label": 1, "has_mask": True}
    with pytest.raises(ValueError) as err:
        LoadAnomalyImaged()(item)
    assert str(image) in str(err.value) and str(mask) in str(err.value)


def test_non_finite_float_image_raises(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    array = np.zeros((8, 8), np.float32)
    array[2, 3] = np.nan
    path = tmp_path / "nan.tif"
    tifffile.imwrite(path, array)
    with pytest.raises(ValueError, match="nan.tif"):
        LoadAnomalyImage()(path)


# --------------------------------------------------------------------------- pixel values


def test_16bit_grey_png_scales_to_unit_range(tmp_path):
    values = np.array([[0, 1000, 32768], [40000, 65535, 12345]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    image = LoadAnomalyImage()(path)
    assert image.shape == (1, 2, 3) and image.dtype == torch.float32
    np.testing.assert_allclose(image[0].numpy(), values / 65535.0, rtol=0, atol=1e-6)


def test_16bit_and_float_tiff(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    rgb16 = np.stack([np.full((4, 5), v, np.uint16) for v in (0, 30000, 65535)], axis=-1)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16)
    image = LoadAnomalyImage()(tmp_path / "rgb16.tif")
    assert image.shape == (3, 4, 5)
    np.testing.assert_allclose(image[:, 0, 0].numpy(), [0.0, 30000 / 65535, 1.0], atol=1e-6)

    unit = np.linspace(0, 1, 20, dtype=np.float32).reshape(4, 5)
    tifffile.imwrite(tmp_path / "unit.tif", unit)
    np.testing.assert_allclose(LoadAnomalyImage()(tmp_path / "unit.tif")[0].numpy(), unit)
    tifffile.imwrite(tmp_path / "wide.tif", unit * 100 - 7)
    wide = LoadAnomalyImage()(tmp_path / "wide.tif")
    assert float(wide.min()) == 0.0 and float(wide.max()) == 1.0


def test_rgba_palette_and_channel_conversion(tmp_path):
    rgba = np.zeros((6, 7, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 128
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    image = LoadAnomalyImage()(tmp_path / "rgba.png")
    assert image.shape == (3, 6, 7) and float(image[0].min()) == 1.0 and float(image[1:].max()) == 0.0

    Image.fromarray(rgba[..., :3]).convert("P").save(tmp_path / "pal.png")
    assert LoadAnomalyImage()(tmp_path / "pal.png").shape == (3, 6, 7)
    assert LoadAnomalyImage(channels=1)(tmp_path / "rgba.png").shape == (1, 6, 7)
    _write_png(tmp_path / "grey.png", rgb=False)
    grey3 = load_image_tensor(tmp_path / "grey.png", 12, channels=3)
    assert grey3.shape == (3, 12, 12) and torch.equal(grey3[0], grey3[2])


def test_masks_stay_binary_after_resize_and_augmentation(tmp_path):
    image, mask = tmp_path / "i.png", tmp_path / "i_mask.png"
    _write_png(image, size=(37, 53))
    mask_array = np.zeros((37, 53), np.uint8)
    mask_array[5:17, 9:30] = 255
    mask_array[20, 40] = 128  # any non-zero value counts as defect
    Image.fromarray(mask_array).save(mask)
    item = {"image": str(image), "mask": str(mask), "label": 1, "has_mask": True}
    for size, augment in [(64, False), ((17, 29), False), (48, True)]:
        transform = anomaly_transforms(size, augment=augment)
        transform.set_random_state(seed=3)
        out = transform(item)
        values = set(out["mask"].unique().tolist())
        assert values == {0.0, 1.0}
        assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
    # a constant image stays constant up to the border (no zero-padded smoothing band)
    _write_png(tmp_path / "flat.png", size=(90, 70), value=200)
    flat = anomaly_transforms((32, 48))({"image": str(tmp_path / "flat.png"), "mask": None, "label": 0})
    np.testing.assert_allclose(flat["image"].numpy(), 200 / 255, atol=1e-5)
    assert flat["mask"].shape == (1, 32, 48) and flat["mask"].sum() == 0 and flat["mask_path"] == ""

    loaded = LoadAnomalyImaged()(item)
    assert loaded["mask"].sum() == 12 * 21 + 1
    assert tuple(loaded["orig_size"].tolist()) == (37, 53)


# --------------------------------------------------------------------------- demo dataset


def _digest(folder: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(folder.rglob("*.png")):
        sha.update(str(path.relative_to(folder)).encode())
        sha.update(path.read_bytes())
    return sha.hexdigest()


def test_demo_dataset_layout_masks_and_determinism(tmp_path):
    kwargs = dict(n_train=4, n_test_good=2, n_test_defect=6, image_size=64)
    category_dir = make_demo_dataset(tmp_path / "a", category="toy", seed=7, **kwargs)
    assert category_dir == tmp_path / "a" / "toy"

    train = mvtec_datalist(category_dir, None, "train")
    test = mvtec_datalist(tmp_path / "a", "toy", "test")
    assert len(train) == 4 and len(test) == 8
    assert {it["defect_type"] for it in test} == {"good", *DEMO_DEFECT_TYPES}
    assert sum(it["label"] == 0 for it in test) == 2

    for item in train + test:
        with Image.open(item["image"]) as img:
            assert img.mode == "RGB" and img.size == (64, 64)
        if item["label"] == 1:
            assert item["has_mask"] and item["mask"].endswith("_mask.png")
            mask = np.array(Image.open(item["mask"])) > 0
            image = np.asarray(Image.open(item["image"]), dtype=np.float32)
            assert 0 < mask.sum() < mask.size / 4
            # the defect sits where the mask says: masked pixels differ in colour from the rest
            inside, outside = image[mask].mean(0), image[~mask].mean(0)
            assert np.abs(inside - outside).max() > 20
        else:
            assert not item["has_mask"]

    same = make_demo_dataset(tmp_path / "b", category="toy", seed=7, **kwargs)
    other = make_demo_dataset(tmp_path / "c", category="toy", seed=8, **kwargs)
    assert _digest(category_dir) == _digest(same)
    assert _digest(category_dir) != _digest(other)
