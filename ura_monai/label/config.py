"""The MONAI Label task config of URA-Net: what ``--conf models ura_net`` adds to an app.

:class:`URANetConfig` builds the infer task (:class:`ura_monai.label.infer.URANetInferTask`) and the train task
(:class:`ura_monai.label.train.URANetTrainTask`) that share one published checkpoint,
``<model_dir>/<name>.pt``. Nothing is downloaded: a pre-trained checkpoint can be given with
``--conf checkpoint /path/to/model.pt`` (a ``model.pt`` written by ``ura-monai fit``); until one exists (given or
trained), the model is not listed under ``models`` in ``/info/`` (MONAI Label's rule for models without weights)
but its trainer is.

App options (``--conf KEY VALUE``):

========================  ===================================================================  =========
key                       meaning                                                              default
========================  ===================================================================  =========
``checkpoint``            a pre-trained URA-Net checkpoint used until training publishes one   none
``dimension``             dimension told to clients (2D pictures work either way)               3
``image_size``            training image size (a multiple of 32)                               256
``max_epochs``            training epochs                                                      20
``augment``               training views: ``none``, ``hflip`` (OCT) or ``dihedral``            none
``slice_axis``            axis (of x, y, z) along which volumes are cut                        2
``volume_aggregation``    slice scores to volume score: ``max``, ``mean``, ``topk_mean``       max
``infer_batch_size``      slices per forward pass                                              8
``preload``               load the model at start-up                                           false
========================  ===================================================================  =========
"""

from __future__ import annotations

import logging
import os
from typing import Any

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from ura_monai.label.infer import ANOMALY_LABELS, URANetInferTask
from ura_monai.label.train import URANetTrainTask

__all__ = ["URANetConfig"]

logger = logging.getLogger(__name__)


def _true(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


class URANetConfig(TaskConfig):
    """``--conf models ura_net``: URA-Net infer + train tasks (see the module docstring for the options)."""

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs: Any) -> None:
        super().init(name, model_dir, conf, planner, **kwargs)
        conf = conf or {}
        self.labels = dict(ANOMALY_LABELS)
        self.network = None
        self.published_path = os.path.join(model_dir, f"{name}.pt")
        pretrained = conf.get("checkpoint")
        if pretrained:
            pretrained = os.path.realpath(os.path.expanduser(pretrained))
            if not os.path.isfile(pretrained):
                logger.warning(
                    "URA-Net checkpoint %s not found; the model is listed once training publishes one", pretrained
                )
        # MONAI Label's convention: the last existing path wins, so a trained model replaces the pre-trained one
        self.path = [p for p in (pretrained, self.published_path) if p]
        self.dimension = int(conf.get("dimension", 3))
        self.train_defaults: dict[str, Any] = {}
        for key, cast in (("image_size", int), ("max_epochs", int), ("slice_axis", int)):
            if conf.get(key) is not None:
                self.train_defaults[key] = cast(conf[key])
        if conf.get("augment"):
            choices = ["none", "hflip", "dihedral"]
            self.train_defaults["augment"] = [conf["augment"]] + [c for c in choices if c != conf["augment"]]

    def infer(self) -> InferTask:
        conf = self.conf or {}
        return URANetInferTask(
            path=self.path,
            dimension=self.dimension,
            batch_size=int(conf.get("infer_batch_size", 8)),
            slice_axis=int(conf.get("slice_axis", 2)),
            volume_aggregation=conf.get("volume_aggregation", "max"),
            preload=_true(conf.get("preload", "false")),
        )

    def trainer(self) -> TrainTask:
        return URANetTrainTask(model_dir=self.model_dir, publish_path=self.published_path, config=self.train_defaults)
