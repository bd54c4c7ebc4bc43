"""Glue that the MONAI bundle ``bundles/ura_net_oct`` (and the presets in ``configs/``) call from their configs.

- :mod:`.checks`: validation run in ``initialize`` (preset keys, ``dataset_dir``, ``category``, checkpoints,
  inference inputs), so that bad input fails before any work starts, naming the key or path;
- :mod:`.data`: training / validation / threshold splits, the test split, inference inputs;
- :mod:`.errors`: uncaught input errors of ``python -m monai.bundle`` as one line;
- :mod:`.training`: the cached-feature dataset (and prototype initialisation), the trainer, the LR schedule.

Rank helpers (``is_rank0``) and ``unwrap`` live in :mod:`ura_monai.utils.distributed`.

Handlers live in :mod:`ura_monai.handlers`, metrics in :mod:`ura_monai.metrics.validation`, the export wrapper in
:mod:`ura_monai.networks.nets.export`.
"""

from .checks import (
    INPUT_TYPES,
    LAYOUTS,
    PRESET_DEFAULTS,
    check_category,
    check_checkpoint,
    check_dataset_dir,
    check_evaluation_config,
    check_inference_config,
    check_preset,
    check_training_config,
)
from .data import list_input_files, oct_abnormal_validation, test_datalist, training_splits
from .errors import install_excepthook
from .training import CosineDecay, FeatureCacheDataset, URANetBundleTrainer

__all__ = [
    "INPUT_TYPES",
    "LAYOUTS",
    "PRESET_DEFAULTS",
    "CosineDecay",
    "FeatureCacheDataset",
    "URANetBundleTrainer",
    "check_category",
    "check_checkpoint",
    "check_dataset_dir",
    "check_evaluation_config",
    "check_inference_config",
    "check_preset",
    "check_training_config",
    "list_input_files",
    "oct_abnormal_validation",
    "test_datalist",
    "training_splits",
]

# the bundle's command line: an input error is one line, not a traceback through MONAI's config parser
install_excepthook()
