"""What a MONAI Label app needs to serve URA-Net, so that the app's ``main.py`` stays a few lines.

- :data:`MODELS`: the task configs ``--conf models`` chooses from (``ura_net``; ``all`` takes every one);
- :func:`task_configs`: the chosen configs, initialised for the app's model folder;
- :func:`init_local_datastore`: MONAI Label's local datastore with the extensions URA-Net reads (with ``*.jpeg``,
  missing from MONAI Label's default list, so OCT B-scans and photos saved as ``.jpeg`` are studies too).

Nothing here downloads anything: no model-zoo bundle, no SAM2 weights (the app adds no SAM2 task, whatever
``--conf sam2`` says), no pre-trained URA-Net (``--conf checkpoint`` names a local file).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.config import TaskConfig

from ura_monai.label.config import URANetConfig

__all__ = ["MODELS", "DATASTORE_EXTENSIONS", "task_configs", "init_local_datastore", "is_remote_studies"]

logger = logging.getLogger(__name__)

MODELS: dict[str, type[TaskConfig]] = {"ura_net": URANetConfig}
# the files URA-Net reads (ura_monai.label.volumes). MONAI Label's default list has *.jpg and *.png but not *.jpeg,
# which OCT exports and photos often use; its *.svs / *.xml (pathology) are left out: URA-Net reads neither
DATASTORE_EXTENSIONS: list[str] = [
    "*.nii.gz",
    "*.nii",
    "*.nrrd",
    "*.nhdr",
    "*.mha",
    "*.mhd",
    "*.png",
    "*.jpg",
    "*.jpeg",
    "*.bmp",
    "*.tif",
    "*.tiff",
]


def task_configs(conf: dict[str, Any], model_dir: str, planner: Any = None) -> dict[str, TaskConfig]:
    """The task configs named by ``conf["models"]`` (comma separated; ``all`` for every one), initialised.

    Raises:
        ValueError: no ``models`` given, or an unknown name (the message lists the known ones).
    """
    names = [n.strip() for n in str(conf.get("models") or "").split(",") if n.strip()]
    if not names:
        raise ValueError(f"provide --conf models <name>; available: all, {', '.join(MODELS)}")
    unknown = [n for n in names if n != "all" and n not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; available: all, {', '.join(MODELS)}")
    chosen = list(MODELS) if "all" in names else list(dict.fromkeys(names))
    configs: dict[str, TaskConfig] = {}
    os.makedirs(model_dir, exist_ok=True)
    for name in chosen:
        config = MODELS[name]()
        config.init(name, model_dir, conf, planner)
        logger.info("+++ Adding model: %s => %s", name, type(config).__name__)
        configs[name] = config
    return configs


def is_remote_studies(studies: str) -> bool:
    return studies.startswith(("http://", "https://"))


def init_local_datastore(studies: str, extensions: list[str] | None = None) -> LocalDatastore:
    """MONAI Label's local datastore over ``studies`` with :data:`DATASTORE_EXTENSIONS`."""
    return LocalDatastore(
        studies,
        extensions=list(extensions or DATASTORE_EXTENSIONS),
        auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
        read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
    )
