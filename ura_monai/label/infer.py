"""URA-Net as a MONAI Label infer task: anomaly mask (or map) for the image on screen, with the image score.

:class:`URANetInferTask` is a MONAI Label ``BasicInferTask``. For the image of a request (a 2D picture or a 3D
volume of the datastore, or a file the client uploads) it

- reads the image (:mod:`ura_monai.label.volumes`: 2D pictures as training reads them; volumes with MONAI's
  ``ITKReader``, normalized with a robust percentile window and cut into 2D slices);
- runs :class:`ura_monai.inference.predictor.URANetPredictor` on the picture or on every slice;
- returns as the label the **anomaly mask** (``anomaly_map >= pixel threshold``, uint8 0/1, label name
  ``anomaly``) at the image's size and geometry, or with ``"anomaly_output": "anomaly_map"`` the float32
  **anomaly map** itself;
- puts in the result's params: ``anomaly_score`` (for a volume, the slice scores aggregated with
  ``volume_aggregation``, as for DICOM series), ``anomaly_score_normalized`` (the image threshold at 0.5),
  ``decision`` (``anomalous`` / ``normal``), ``is_anomalous``, ``threshold`` (the image threshold),
  ``pixel_threshold``, ``anomalous_fraction`` (of the mask), ``slice_scores`` for volumes, and which
  checkpoint answered (``checkpoint``, ``checkpoint_modified``).

The checkpoint is the last existing file of ``path`` (MONAI Label's convention: a pre-trained file first, the
file the train task publishes last), reloaded whenever that file changes, so inference uses a new training
run's model as soon as it is published.

Request keys (besides MONAI Label's ``image``, ``device``, ``result_extension``, ...): ``anomaly_output``
(``mask`` | ``anomaly_map``), ``slice_axis`` (0, 1 or 2 of the volume's x, y, z; 2 by default),
``volume_aggregation`` (``max`` | ``mean`` | ``topk_mean``), ``top_k``, ``pixel_threshold`` and
``image_threshold`` (overrides of the checkpoint's thresholds), ``false_alarm_rate`` (another operating point for the
image threshold, from the normal scores the checkpoint keeps; ``image_threshold`` wins when both are given).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from ura_monai.inference.aggregation import VOLUME_AGGREGATIONS, aggregate_slice_scores, check_volume_aggregation
from ura_monai.label.volumes import (
    intensity_window,
    is_volume,
    iter_slice_batches,
    load_volume,
    normalize_volume,
    place_slice_maps,
)

__all__ = ["URANetInferTask", "LoadURANetInputd", "ANOMALY_LABELS", "ANOMALY_OUTPUTS"]

logger = logging.getLogger(__name__)

ANOMALY_LABELS = {"anomaly": 1}
ANOMALY_OUTPUTS = ("mask", "anomaly_map")


def _first(value: Any) -> Any:
    """A config option offered as a list (MONAI Label shows it as a choice) means its first entry."""
    return value[0] if isinstance(value, (list, tuple)) and value else value


def _optional_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    value = float(value)
    return value if np.isfinite(value) else None


class LoadURANetInputd:
    """Pre-transform: read ``data[key]`` (a path) as a 2D picture or a normalized volume.

    Sets ``data[key]``: float32 ``(C, H, W)`` in [0, 1] for a picture; float32 ``(x, y, z)`` in [0, 1] for a volume,
    with ``<key>_affine`` (RAS, 4x4) and ``<key>_window`` (the intensity window). ``ura_kind`` is ``"image"`` or
    ``"volume"``.
    """

    def __init__(self, key: str = "image") -> None:
        self.key = key

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        from ura_monai.data import read_image_array

        d = dict(data)
        source = d[self.key]
        if not isinstance(source, (str, os.PathLike)):
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT, f"URA-Net needs an image path, got {type(source).__name__}"
            )
        source = os.fspath(source)
        try:
            volume = is_volume(source)
        except ValueError as err:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, str(err)) from err
        if volume:
            array, affine = load_volume(source)
            window = intensity_window(array)
            d[self.key] = normalize_volume(array, window)
            d[f"{self.key}_affine"] = affine
            d[f"{self.key}_window"] = [float(window[0]), float(window[1])]
            d["ura_kind"] = "volume"
        else:
            image = read_image_array(source)
            if image.shape[0] not in (1, 3):
                raise MONAILabelException(
                    MONAILabelError.INVALID_INPUT,
                    f"{source}: expected a grey or RGB image, got {image.shape[0]} channels",
                )
            d[self.key] = image
            d["ura_kind"] = "image"
        return d


class URANetInferTask(BasicInferTask):
    """URA-Net anomaly detection for MONAI Label (2D pictures, 3D volumes slice by slice).

    Args:
        path: checkpoint file(s) written by :func:`ura_monai.engines.workflow.fit`; the last one that exists is
            used (typically ``[pre-trained, published-by-training]``).
        dimension: the dimension MONAI Label clients are told (3: Slicer and OHIF show 2D pictures as one-slice
            volumes); both 2D and 3D images are accepted whatever it is.
        description: shown by the clients.
        batch_size: slices per forward pass for volumes.
        slice_axis: default axis (of x, y, z) along which volumes are cut.
        volume_aggregation: default aggregation of slice scores into a volume score.
        top_k: slices averaged by ``topk_mean``.
        config: extra options shown to the clients.
        kwargs: passed to ``BasicInferTask``; ``preload=True`` loads the checkpoint at start-up when there is one.
    """

    def __init__(
        self,
        path: str | Sequence[str] | None,
        dimension: int = 3,
        description: str = "URA-Net unsupervised anomaly detection: anomaly mask and image score",
        batch_size: int = 8,
        slice_axis: int = 2,
        volume_aggregation: str = "max",
        top_k: int = 5,
        config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        check_volume_aggregation(volume_aggregation)
        options: dict[str, Any] = {
            "anomaly_output": list(ANOMALY_OUTPUTS),
            "slice_axis": int(slice_axis),
            "volume_aggregation": [volume_aggregation] + [a for a in VOLUME_AGGREGATIONS if a != volume_aggregation],
            "top_k": int(top_k),
        }
        options.update(config or {})
        preload = bool(kwargs.pop("preload", False))
        self.batch_size = int(batch_size)
        super().__init__(
            path=path,
            network=None,
            type=InferType.SEGMENTATION,
            labels=dict(ANOMALY_LABELS),
            dimension=dimension,
            description=description,
            input_key="image",
            output_label_key="pred",
            output_json_key="result",
            config=options,
            load_strict=False,
            **kwargs,
        )
        if preload and self.get_path():  # BasicInferTask's preload would fail without a checkpoint yet
            from monailabel.utils.others.generic import device_map

            for device in device_map().values():
                self._get_network(device, None)

    # ------------------------------------------------------------------ MONAI Label hooks
    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return [LoadURANetInputd(self.input_key)]

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return []  # run_inferer already returns the label at the image's size and geometry

    def inferer(self, data=None):  # not used: run_inferer runs the predictor itself
        return None

    def _get_network(self, device, data):
        """The :class:`URANetPredictor` of the current checkpoint, cached per device until the file changes."""
        from ura_monai.inference.predictor import URANetPredictor

        path = self.get_path()
        if not path:
            raise MONAILabelException(
                MONAILabelError.INFERENCE_ERROR,
                f"no URA-Net checkpoint yet (looked for {self.path}): train the model first, "
                "or start the app with --conf checkpoint <model.pt>",
            )
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_ino, stat.st_size)
        cached = self._networks.get(device)
        if cached is not None and cached[1] == key:
            return cached[0]
        if cached is not None:
            logger.info("URA-Net checkpoint %s changed: reloading", path)
        predictor = URANetPredictor(path, device=device, num_samples=0, batch_size=self.batch_size)
        predictor.loaded_mtime_ns = stat.st_mtime_ns  # reported with each result
        self._networks[device] = (predictor, key)
        return predictor

    @staticmethod
    def _image_threshold(predictor: Any, data: dict[str, Any]) -> tuple[float | None, float | None, float | None]:
        """``(image threshold, normal minimum, normalization maximum)`` of a request: its ``image_threshold``, else its
        ``false_alarm_rate`` on the checkpoint's normal scores, else the checkpoint's stored ones."""
        image_threshold = _optional_float(data.get("image_threshold"))
        rate = _optional_float(data.get("false_alarm_rate"))
        if image_threshold is None and rate is not None:
            try:
                stats = predictor.threshold_at(rate)
            except ValueError as err:
                raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"false_alarm_rate: {err}") from None
            return stats["image_threshold"], stats["image_min"], stats["image_max"]
        if image_threshold is None:
            return predictor.image_threshold, predictor.image_min, predictor.image_max
        return image_threshold, predictor.image_min, predictor.image_max

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> dict[str, Any]:
        predictor = self._get_network(device, data)
        output = str(_first(data.get("anomaly_output", "mask")))
        if output not in ANOMALY_OUTPUTS:
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT, f"anomaly_output must be one of {ANOMALY_OUTPUTS}, got {output!r}"
            )
        image_threshold, image_min, image_max = self._image_threshold(predictor, data)
        pixel_threshold = _optional_float(data.get("pixel_threshold"))
        pixel_threshold = predictor.pixel_threshold if pixel_threshold is None else pixel_threshold
        if pixel_threshold is None:  # the SlicePredictor convention: fall back to the image threshold
            pixel_threshold = image_threshold

        result: dict[str, Any] = {}
        if data.get("ura_kind") == "volume":
            anomaly_map, score = self._infer_volume(predictor, data, result)
            # MONAI Label's writer reads the label's affine from <label>_meta_dict
            data[f"{self.output_label_key}_meta_dict"] = {"affine": data[f"{self.input_key}_affine"]}
            result["intensity_window"] = data.get(f"{self.input_key}_window")
            if not data.get("result_extension") and os.path.isdir(str(data.get("image_path", ""))):
                data["result_extension"] = ".nii.gz"  # a DICOM series folder has no extension to copy
        else:
            image = torch.as_tensor(data[self.input_key])[None]
            out = predictor(image)
            score = float(out["pred_score"][0])
            # (H, W) -> MONAI's (x, y) order, which MONAI Label's writer transposes back when it writes
            anomaly_map = out["anomaly_map"][0].numpy().T
            if not data.get("result_extension"):
                # a mask is never written as JPEG (lossy); a float map needs a float format
                data["result_extension"] = ".png" if output == "mask" else ".tif"

        mask = (
            (anomaly_map >= pixel_threshold).astype(np.uint8)
            if pixel_threshold is not None
            else np.zeros(anomaly_map.shape, np.uint8)
        )
        if output == "mask":
            data[self.output_label_key] = mask
            data.setdefault("result_dtype", "uint8")
        else:
            data[self.output_label_key] = np.ascontiguousarray(anomaly_map, dtype=np.float32)
            data["result_dtype"] = "float32"

        normalized = None
        if image_threshold is not None:
            low = image_min if image_min is not None else image_threshold
            high = image_max if image_max is not None else image_threshold
            from ura_monai.transforms.thresholds import normalize_score

            normalized = float(normalize_score(torch.tensor(score, dtype=torch.float64), image_threshold, low, high))
        is_anomalous = None if image_threshold is None else bool(score >= image_threshold)
        result.update(
            {
                "anomaly_score": score,
                "anomaly_score_normalized": normalized,
                "is_anomalous": is_anomalous,
                "decision": None if is_anomalous is None else ("anomalous" if is_anomalous else "normal"),
                "threshold": image_threshold,
                "image_threshold": image_threshold,
                "pixel_threshold": pixel_threshold,
                "anomalous_fraction": float(mask.mean()) if mask.size else 0.0,
                "anomaly_map_max": float(anomaly_map.max()) if anomaly_map.size else 0.0,
                "anomaly_output": output,
                "dimension": 3 if data.get("ura_kind") == "volume" else 2,
                "checkpoint": os.path.basename(str(predictor.checkpoint_path)),
                "checkpoint_modified": time.strftime(
                    "%Y-%m-%dT%H:%M:%S", time.localtime(predictor.loaded_mtime_ns / 1e9)
                ),
            }
        )
        data[self.output_json_key] = result
        return data

    def _infer_volume(self, predictor, data: dict[str, Any], result: dict[str, Any]) -> tuple[np.ndarray, float]:
        volume = data[self.input_key]
        axis = int(_first(data.get("slice_axis", 2)))
        aggregation = str(_first(data.get("volume_aggregation", "max")))
        top_k = int(_first(data.get("top_k", 5)))
        if axis not in (0, 1, 2):
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"slice_axis must be 0, 1 or 2, got {axis}")
        try:
            check_volume_aggregation(aggregation)
        except ValueError as error:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, str(error)) from error
        anomaly_map = np.zeros(volume.shape, dtype=np.float32)
        slice_scores = np.zeros(volume.shape[axis], dtype=np.float64)
        for indices, images in iter_slice_batches(volume, axis, self.batch_size):
            out = predictor(torch.from_numpy(images))
            place_slice_maps(out["anomaly_map"].numpy(), volume.shape, axis, anomaly_map, indices)
            slice_scores[indices] = out["pred_score"].double().numpy()
        result.update(
            {
                "slice_axis": axis,
                "volume_aggregation": aggregation,
                "slice_scores": [float(s) for s in slice_scores],
                "most_anomalous_slice": int(np.argmax(slice_scores)),
            }
        )
        return anomaly_map, aggregate_slice_scores(slice_scores, aggregation, top_k)
