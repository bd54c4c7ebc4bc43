"""MONAI Label app serving URA-Net (unsupervised anomaly detection) to 3D Slicer and OHIF.

    monailabel start_server --app apps/ura_net_label --studies /path/to/studies --conf models ura_net

Options (``--conf KEY VALUE``): see ``ura_monai/label/config.py`` (``checkpoint``, ``image_size``,
``max_epochs``, ``augment``, ``slice_axis``, ``volume_aggregation``, ...). Start-up downloads nothing: the app
adds no model-zoo bundle and no SAM2 task, and a pre-trained URA-Net is a local file (``--conf checkpoint``).
The logic lives in :mod:`ura_monai.label`; this file only wires it into MONAI Label.
"""

import logging
import os

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

import ura_monai
from ura_monai.label import ANOMALY_LABELS
from ura_monai.label.app import init_local_datastore, is_remote_studies, task_configs

logger = logging.getLogger(__name__)


class URANetApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.model_dir = os.path.join(app_dir, "model")
        self.models = task_configs(conf, self.model_dir)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"URA-Net anomaly detection (ura_monai {ura_monai.__version__})",
            description="Unsupervised anomaly detection: anomaly mask, map and score; trained on normal studies",
            version=ura_monai.__version__,
            labels=dict(ANOMALY_LABELS),
        )

    def init_datastore(self) -> Datastore:
        if is_remote_studies(self.studies):  # DICOMweb, DSA, XNAT: MONAI Label's own
            return super().init_datastore()
        return init_local_datastore(self.studies)

    def init_infers(self) -> dict[str, InferTask]:
        return {name: config.infer() for name, config in self.models.items()}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {name: config.trainer() for name, config in self.models.items()}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}
