"""URA-Net in MONAI Label (3D Slicer, OHIF): infer and train tasks, a task config and app helpers.

Needs MONAI Label, which lives in its own environment (MONAI Label 0.8.5 requires pydicom 2.x, the core of
ura_monai pydicom 3): ``make label-env`` or ``requirements-label.txt``. The core package never imports this one.

- :class:`URANetInferTask` (``infer.py``): the anomaly mask (or the float anomaly map) of the image on screen as
  the label, with the anomaly score, decision and thresholds in the result's params; 2D pictures and 3D volumes
  (slice by slice);
- :class:`URANetTrainTask` (``train.py``): trains on every image of the datastore (normal studies, no labels)
  and publishes the checkpoint the infer task then uses;
- :class:`URANetConfig` (``config.py``): the two tasks for ``--conf models ura_net``;
- ``app.py``: helpers for an app's ``main.py`` (see ``apps/ura_net_label``).
"""

try:
    import monailabel  # noqa: F401
except ImportError as error:  # pragma: no cover - only without MONAI Label
    raise ImportError(
        "ura_monai.label needs MONAI Label (monailabel), installed in its own environment: "
        "`make label-env`, or see requirements-label.txt"
    ) from error

from .config import URANetConfig
from .infer import ANOMALY_LABELS, URANetInferTask
from .train import URANetTrainTask

__all__ = ["ANOMALY_LABELS", "URANetConfig", "URANetInferTask", "URANetTrainTask"]
