"""Datasets for anomaly detection: datalists of common folder layouts, loading transforms, a demo dataset."""

from .datalists import (
    IMAGE_EXTENSIONS,
    MASK_EXTENSIONS,
    SkippedFileWarning,
    btad_datalist,
    build_datalist,
    folder_datalist,
    mvtec_datalist,
    oct2017_datalist,
    verify_image_file,
)
from .demo import DEMO_DEFECT_TYPES, make_demo_dataset
from .transforms import (
    LoadAnomalyImage,
    LoadAnomalyImaged,
    LoadAnomalyMask,
    ResizeAnomaly,
    ResizeAnomalyd,
    anomaly_transforms,
    load_image_tensor,
    read_image_array,
)

__all__ = [
    "DEMO_DEFECT_TYPES",
    "IMAGE_EXTENSIONS",
    "MASK_EXTENSIONS",
    "LoadAnomalyImage",
    "LoadAnomalyImaged",
    "LoadAnomalyMask",
    "ResizeAnomaly",
    "ResizeAnomalyd",
    "SkippedFileWarning",
    "anomaly_transforms",
    "btad_datalist",
    "build_datalist",
    "folder_datalist",
    "load_image_tensor",
    "make_demo_dataset",
    "mvtec_datalist",
    "oct2017_datalist",
    "read_image_array",
    "verify_image_file",
]
