"""URA-Net as a MONAI Label train task: train on the normal studies of the datastore, publish the checkpoint.

URA-Net learns from normal images only and needs no labels, while MONAI Label's trainers learn from labelled
images. :class:`URANetTrainTask` therefore builds its datalist from **every image of the datastore**
(:meth:`URANetTrainTask.datalist`; labels, if any, are ignored): the datastore is the set of normal studies.
2D pictures are used as they are; volumes are cut into slices (as inference does, :mod:`ura_monai.label.volumes`)
written as 16-bit PNGs into the run's folder. Training is :func:`ura_monai.engines.workflow.fit` (frozen
backbone, cached features, thresholds from held-out normal images), and its ``model.pt`` is published
atomically to ``publish_path``, the last checkpoint path of the infer task, which reloads it on its next call.

Request keys (shown to the clients by :meth:`config`): ``max_epochs``, ``image_size``, ``train_batch_size``,
``learning_rate``, ``augment``, ``val_split``, ``seed``, ``slice_axis``, ``max_slices_per_volume``, ``device``
and ``name`` (the run folder under ``model_dir``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.generic import device_list, name_to_device

from ura_monai.label.volumes import intensity_window, is_volume, load_volume, normalize_volume, slice_to_image
from ura_monai.utils.enums import AugmentView

__all__ = ["URANetTrainTask"]

logger = logging.getLogger(__name__)

_AUGMENTS = AugmentView.choices()


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) and value else value


def _atomic_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.copyfile(source, temporary)
    os.replace(temporary, target)


def _atomic_write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(temporary, path)


class URANetTrainTask(TrainTask):
    """Train URA-Net on every image of a MONAI Label datastore.

    Args:
        model_dir: folder of the app's models; runs go to ``<model_dir>/<name>/``.
        publish_path: where the trained checkpoint is published (the infer task's last ``path``).
        description: shown by the clients.
        config: defaults of the request keys (see the module docstring).
        stats_path: the train statistics file (``<model_dir>/train_stats.json`` by default; MONAI Label shows
            it in ``/info/``).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        publish_path: str | os.PathLike,
        description: str = "Train URA-Net on the (normal) images of the datastore; no labels needed",
        config: dict[str, Any] | None = None,
        stats_path: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(description)
        self.model_dir = str(model_dir)
        self.publish_path = str(publish_path)
        self.stats_path = str(stats_path) if stats_path else os.path.join(self.model_dir, "train_stats.json")
        self._config: dict[str, Any] = {
            "name": "ura_net_train",
            "max_epochs": 20,
            "image_size": 256,
            "train_batch_size": 8,
            "learning_rate": 1e-3,
            "augment": list(_AUGMENTS),
            "val_split": 0.1,
            "seed": 0,
            "slice_axis": 2,
            "max_slices_per_volume": 64,
            "device": device_list(),
        }
        self._config.update(config or {})

    def config(self) -> dict[str, Any]:
        return self._config

    def stats(self) -> dict[str, Any]:
        if os.path.exists(self.stats_path):
            with open(self.stats_path) as f:
                return json.load(f)
        return {}

    # ------------------------------------------------------------------ datalist
    def datalist(self, datastore: Datastore) -> list[dict[str, Any]]:
        """Every image of the datastore, labelled or not, as ``{"image": path, "image_id": id}``.

        MONAI Label's own trainers use ``datastore.datalist()``, which lists only labelled images; URA-Net is
        trained on normal images without labels, so all images count.
        """
        items = []
        for image_id in sorted(datastore.list_images()):
            uri = datastore.get_image_uri(image_id)
            if uri:
                items.append({"image": uri, "image_id": image_id})
        return items

    def pre_process(self, request: dict[str, Any], datastore: Datastore) -> list[dict[str, Any]]:
        """The training datalist (MONAI Label's hook name, as in ``BasicTrainTask``): :meth:`datalist`."""
        return self.datalist(datastore)

    def training_items(
        self, datalist: list[dict[str, Any]], slice_dir: str | os.PathLike, request: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        """ura_monai datalist items (``label`` 0) for ``datalist``: pictures as they are, volumes as slice PNGs.

        Volume slices are written to ``slice_dir`` as 16-bit grey PNGs. Training batches need one channel count:
        when the datastore mixes colour pictures with grey pictures or volumes, the grey ones are written to
        ``slice_dir`` as 8-bit RGB copies (the network sees grey as three equal channels anyway).

        Returns:
            ``(items, skipped)``: the items, and ``{"image", "reason"}`` for each file that could not be used.
        """
        from ura_monai.data import read_image_array

        axis = int(_first(request.get("slice_axis", 2)))
        max_slices = int(_first(request.get("max_slices_per_volume", 64)))
        slice_dir = Path(slice_dir)
        sources: list[tuple[str, str, int]] = []  # (kind, path, channels): "file" of the datastore or "slice" we wrote
        skipped: list[dict[str, str]] = []
        for entry in datalist:
            path = entry["image"]
            try:
                if not is_volume(path):
                    channels = read_image_array(path).shape[0]  # decodes the whole file: a corrupt one is skipped
                    if channels not in (1, 3):
                        raise ValueError(f"expected a grey or RGB image, got {channels} channels")
                    sources.append(("file", path, channels))
                    continue
                volume, _ = load_volume(path)
                normalized = normalize_volume(volume, intensity_window(volume))
                count = volume.shape[axis]
                chosen = (
                    np.arange(count)
                    if max_slices <= 0
                    else np.unique(np.linspace(0, count - 1, min(count, max_slices)).round().astype(int))
                )
                name = str(entry.get("image_id") or Path(path).name).replace(os.sep, "_")
                slice_dir.mkdir(parents=True, exist_ok=True)
                for index in chosen:  # written now, so that memory does not grow with the datastore
                    target = slice_dir / f"{len(sources):06d}_{name}_slice{int(index):04d}.png"
                    self._write_png(slice_to_image(normalized, axis, int(index)), target, rgb=False)
                    sources.append(("slice", str(target), 1))
            except Exception as err:  # noqa: BLE001 - one unreadable study must not stop training on the others
                logger.warning("skipping %s: %s", path, err)
                skipped.append({"image": str(path), "reason": f"{type(err).__name__}: {err}"})

        rgb = any(c == 3 for _, _, c in sources) and any(c == 1 for _, _, c in sources)
        items: list[dict[str, Any]] = []
        for number, (kind, path, channels) in enumerate(sources):
            if channels == 3 or not rgb:
                items.append(self._item(path))
                continue
            slice_dir.mkdir(parents=True, exist_ok=True)
            target = slice_dir / f"{number:06d}_{Path(path).stem}_rgb.png"
            self._write_png(read_image_array(path)[0], target, rgb=True)
            if kind == "slice":
                os.unlink(path)
            items.append(self._item(target))
        return items, skipped

    @staticmethod
    def _write_png(image: np.ndarray, target: Path, rgb: bool) -> None:
        """A (H, W) image in [0, 1] as a 16-bit grey PNG, or as an 8-bit RGB one when ``rgb``."""
        from PIL import Image

        if rgb:
            grey = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
            Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(target)
        else:
            Image.fromarray(np.rint(np.clip(image, 0.0, 1.0) * 65535.0).astype(np.uint16)).save(target)

    @staticmethod
    def _item(path: str | os.PathLike) -> dict[str, Any]:
        return {
            "image": str(path),
            "label": 0,
            "mask": None,
            "has_mask": False,
            "defect_type": "good",
            "category": "monailabel",
        }

    # ------------------------------------------------------------------ training
    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        from ura_monai.engines.workflow import fit

        start = time.time()
        req = dict(self._config)
        req.update(request or {})
        run_id = datetime.now().strftime("%Y%m%d_%H%M%S")
        device = name_to_device(req.get("device"))
        augment = str(_first(req.get("augment", "none")))
        if augment not in _AUGMENTS:
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT, f"augment must be one of {_AUGMENTS}, got {augment!r}"
            )
        epochs = int(_first(req["max_epochs"]))
        image_size = int(_first(req["image_size"]))
        output_dir = Path(self.model_dir) / str(_first(req.get("name", "ura_net_train")))
        slice_dir = output_dir / f"slices_{run_id}"

        datalist = self.pre_process(req, datastore)
        logger.info("URA-Net training on %d datastore images (labels are not needed)", len(datalist))
        try:
            items, skipped = self.training_items(datalist, slice_dir, req)
            if not items:
                raise MONAILabelException(
                    MONAILabelError.INVALID_INPUT,
                    f"no usable image in the datastore ({len(datalist)} listed, {len(skipped)} unreadable)",
                )
            result = fit(
                items,
                output_dir,
                image_size=image_size,
                epochs=epochs,
                batch_size=int(_first(req.get("train_batch_size", 8))),
                learning_rate=float(_first(req.get("learning_rate", 1e-3))),
                augment=augment,
                val_fraction=float(_first(req.get("val_split", 0.1))),
                seed=int(_first(req.get("seed", 0))),
                device=device,
                progress=False,
            )
        finally:
            shutil.rmtree(slice_dir, ignore_errors=True)
        _atomic_copy(result["checkpoint"], self.publish_path)
        logger.info("published %s to %s", result["checkpoint"], self.publish_path)
        stats = {
            "run_id": run_id,
            "start_ts": int(start),
            "total_time": str(timedelta(seconds=int(time.time() - start))),
            "epoch": epochs,
            "total_epochs": epochs,
            "device": str(device),
            "image_size": image_size,
            "datastore_images": len(datalist),
            "train_images": len(items),
            "skipped": skipped,
            "losses": {k: float(v) for k, v in result.get("losses", {}).items()},
            "thresholds": {k: float(v) for k, v in result.get("postprocessing", {}).items()},
            "checkpoint": self.publish_path,
            "run_checkpoint": str(result["checkpoint"]),
        }
        _atomic_write_json(self.stats_path, stats)
        return stats
