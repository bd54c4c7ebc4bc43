"""URA-Net in MONAI Label, in process: the sample app object, ``app.infer(request)`` and ``app.train(request)``.

The app starts without a checkpoint (only its trainer is listed), one epoch of training on the generated
datastore publishes one, and inference then answers on a 2D picture (PNG, JPEG, not square) and on a small
NIfTI volume with a mask of the image's size (and geometry) and a score; training again publishes a new
checkpoint that the next inference uses.
"""

import copy
import os

import nibabel as nib
import numpy as np
import pytest
from conftest import IMAGE_SIZE, VOLUME_AFFINE, VOLUME_SHAPE, make_app_dir
from monailabel.interfaces.exception import MONAILabelException
from monailabel.interfaces.utils.app import app_instance, clear_cache
from PIL import Image

from ura_monai.networks.checkpoint import read_checkpoint

TRAIN_REQUEST = {"model": "ura_net", "max_epochs": 1, "image_size": IMAGE_SIZE, "train_batch_size": 4, "device": "cpu"}


def _new_app(tmp_path_factory, studies_folder, **conf):
    clear_cache()  # app_instance caches apps by folder; every test app gets its own folder anyway
    app_dir = make_app_dir(tmp_path_factory)
    return app_instance(str(app_dir), str(studies_folder), {"models": "ura_net", **conf}), app_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory, studies):
    """The sample app over the datastore, trained for one epoch: ``(app, app_dir, train stats)``."""
    folder, _ = studies
    app, app_dir = _new_app(tmp_path_factory, folder)
    stats = app.train(copy.deepcopy(TRAIN_REQUEST))
    return app, app_dir, stats


def _infer(app, image_id, **params):
    result = app.infer({"model": "ura_net", "image": image_id, "device": "cpu", **params})
    assert result["file"] and os.path.isfile(result["file"]), result
    return result


def _check_params(params, dimension):
    assert isinstance(params["anomaly_score"], float) and np.isfinite(params["anomaly_score"])
    assert params["decision"] in ("anomalous", "normal")
    assert params["is_anomalous"] is (params["decision"] == "anomalous")
    assert isinstance(params["threshold"], float) and params["threshold"] == params["image_threshold"]
    assert isinstance(params["pixel_threshold"], float)
    assert 0.0 <= params["anomaly_score_normalized"] <= 1.0
    assert 0.0 <= params["anomalous_fraction"] <= 1.0
    assert params["dimension"] == dimension
    assert params["label_names"] == {"anomaly": 1}


def test_untrained_app_offers_only_training(tmp_path_factory, studies):
    folder, info = studies
    app, app_dir = _new_app(tmp_path_factory, folder)
    described = app.info()
    assert "ura_net" in described["trainers"]
    assert "ura_net" not in described["models"]  # MONAI Label lists a model once it has weights
    # .jpeg studies are in the datastore (MONAI Label's default extensions lack *.jpeg)
    images = set(app.datastore().list_images())
    assert set(info["jpeg"]) <= images and set(info["png"]) <= images and info["volume"] in images
    with pytest.raises(MONAILabelException, match="no URA-Net checkpoint"):
        app.infer({"model": "ura_net", "image": info["png"][0], "device": "cpu"})


def test_train_one_epoch_publishes_checkpoint(trained):
    app, app_dir, stats = trained
    published = app_dir / "model" / "ura_net.pt"
    assert published.is_file()
    assert stats["checkpoint"] == str(published)
    # every study is used, labels or not: 6 pictures + the volume's 5 slices
    assert stats["datastore_images"] == 7 and stats["train_images"] == 6 + VOLUME_SHAPE[2] and not stats["skipped"]
    assert stats["image_size"] == IMAGE_SIZE and stats["total_epochs"] == 1
    assert set(stats["thresholds"]) >= {"image_threshold", "pixel_threshold"}
    described = app.info()
    assert "ura_net" in described["models"]
    assert described["train_stats"]["ura_net"]["run_id"] == stats["run_id"]
    assert not list((app_dir / "model" / "ura_net_train").glob("slices_*")), "the run's slice PNGs are removed"


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_infer_2d_returns_mask_and_score(trained, studies, kind):
    app, _, stats = trained
    _, info = studies
    for image_id in info[kind]:
        result = _infer(app, image_id)
        assert result["file"].endswith(".png")  # a mask is never written as JPEG
        mask = np.asarray(Image.open(result["file"]))
        width, height = info["sizes"][image_id]
        assert mask.shape == (height, width)
        assert set(np.unique(mask)) <= {0, 1}
        params = result["params"]
        _check_params(params, dimension=2)
        assert params["checkpoint"] == "ura_net.pt"
        assert params["image_threshold"] == pytest.approx(stats["thresholds"]["image_threshold"])
        assert params["anomalous_fraction"] == pytest.approx(mask.mean())


def test_infer_takes_another_operating_point_from_the_stored_normal_scores(trained, studies):
    app, app_dir, stats = trained
    _, info = studies
    image_id = info["png"][0]
    normal = read_checkpoint(app_dir / "model" / "ura_net.pt")["extra"]["normal_image_scores"]
    params = _infer(app, image_id, false_alarm_rate=0.5)["params"]
    assert params["image_threshold"] == pytest.approx(float(np.quantile(normal, 0.5)), abs=1e-9)
    assert params["image_threshold"] < stats["thresholds"]["image_threshold"]
    assert params["is_anomalous"] is (params["anomaly_score"] >= params["image_threshold"])
    # an explicit image threshold wins over the rate
    both = _infer(app, image_id, false_alarm_rate=0.5, image_threshold=123.0)["params"]
    assert both["image_threshold"] == 123.0
    with pytest.raises(MONAILabelException, match="false_alarm_rate"):
        _infer(app, image_id, false_alarm_rate=1.5)


def test_infer_2d_anomaly_map_on_request(trained, studies):
    app, _, _ = trained
    _, info = studies
    image_id = "normal_wide"
    result = _infer(app, image_id, anomaly_output="anomaly_map")
    anomaly_map = np.asarray(Image.open(result["file"]))
    width, height = info["sizes"][image_id]
    assert anomaly_map.shape == (height, width) and anomaly_map.dtype == np.float32
    params = result["params"]
    assert params["anomaly_output"] == "anomaly_map"
    assert float(anomaly_map.max()) == pytest.approx(params["anomaly_map_max"], rel=1e-5)
    mask = np.asarray(Image.open(_infer(app, image_id)["file"]))
    np.testing.assert_array_equal(mask, (anomaly_map >= params["pixel_threshold"]).astype(np.uint8))


def test_infer_3d_volume_slice_wise(trained, studies):
    app, _, _ = trained
    _, info = studies
    result = _infer(app, info["volume"])
    assert result["file"].endswith(".nii.gz")
    written = nib.load(result["file"])
    mask = np.asarray(written.dataobj)
    assert mask.shape == VOLUME_SHAPE
    assert set(np.unique(mask)) <= {0, 1}
    np.testing.assert_allclose(written.affine, VOLUME_AFFINE, atol=1e-4)  # overlays the study in the viewer
    params = result["params"]
    _check_params(params, dimension=3)
    assert len(params["slice_scores"]) == VOLUME_SHAPE[2]
    assert params["anomaly_score"] == pytest.approx(max(params["slice_scores"]))  # "max" aggregation
    assert params["anomalous_fraction"] == pytest.approx(mask.mean())

    mean = _infer(app, info["volume"], volume_aggregation="mean")["params"]
    assert mean["anomaly_score"] == pytest.approx(np.mean(mean["slice_scores"]))
    along_x = _infer(app, info["volume"], slice_axis=0)
    assert np.asarray(nib.load(along_x["file"]).dataobj).shape == VOLUME_SHAPE
    assert len(along_x["params"]["slice_scores"]) == VOLUME_SHAPE[0]


def test_retraining_is_used_by_the_next_inference(trained, studies):
    app, app_dir, first = trained
    _, info = studies
    image_id = info["png"][0]
    before = _infer(app, image_id)["params"]
    assert before["image_threshold"] == pytest.approx(first["thresholds"]["image_threshold"])
    second = app.train({**TRAIN_REQUEST, "seed": 7, "learning_rate": 3e-3})
    assert second["run_id"] and second["thresholds"] != first["thresholds"]
    after = _infer(app, image_id)["params"]
    assert after["checkpoint"] == "ura_net.pt"
    assert after["image_threshold"] == pytest.approx(second["thresholds"]["image_threshold"])
    assert after["pixel_threshold"] == pytest.approx(second["thresholds"]["pixel_threshold"])
    assert after["anomaly_score"] != before["anomaly_score"]


def test_pretrained_checkpoint_from_conf(tmp_path_factory, studies, pretrained_checkpoint):
    folder, info = studies
    app, _ = _new_app(tmp_path_factory, folder, checkpoint=str(pretrained_checkpoint))
    assert "ura_net" in app.info()["models"]
    params = _infer(app, info["jpeg"][0])["params"]
    _check_params(params, dimension=2)
    assert params["checkpoint"] == "initial.pt"


def test_training_items_skip_unreadable_files_and_share_one_channel_count(tmp_path, studies):
    from ura_monai.data import read_image_array
    from ura_monai.label import URANetTrainTask

    folder, info = studies
    corrupt = tmp_path / "truncated.png"
    corrupt.write_bytes((folder / f"{info['png'][0]}.png").read_bytes()[:200])
    task = URANetTrainTask(tmp_path / "model", tmp_path / "model" / "ura_net.pt")
    datalist = [
        {"image": str(folder / f"{info['png'][0]}.png"), "image_id": info["png"][0]},
        {"image": str(folder / f"{info['volume']}.nii.gz"), "image_id": info["volume"]},
        {"image": str(corrupt), "image_id": "truncated"},
    ]
    items, skipped = task.training_items(datalist, tmp_path / "slices", {"slice_axis": 2, "max_slices_per_volume": 3})
    assert [entry["image"] for entry in skipped] == [str(corrupt)]
    assert len(items) == 1 + 3  # the picture and 3 evenly spaced slices of the volume
    # colour pictures beside a grey volume: the slices become RGB, so that training batches stack
    assert {read_image_array(item["image"]).shape[0] for item in items} == {3}
    assert all(item["label"] == 0 and item["mask"] is None for item in items)


def test_slices_round_trip():
    from ura_monai.label.volumes import iter_slice_batches, place_slice_maps

    volume = np.random.default_rng(0).random(VOLUME_SHAPE).astype(np.float32)
    for axis in (0, 1, 2):
        rebuilt = np.zeros_like(volume)
        for indices, images in iter_slice_batches(volume, axis, batch_size=2):
            assert images.shape[1] == 1
            place_slice_maps(images[:, 0], volume.shape, axis, rebuilt, indices)
        np.testing.assert_array_equal(rebuilt, volume)
    # slices are shown as rows x columns: along z, a slice is the transposed (x, y) plane
    _, images = next(iter_slice_batches(volume, 2, batch_size=1))
    np.testing.assert_array_equal(images[0, 0], volume[:, :, 0].T)
