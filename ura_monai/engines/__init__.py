"""MONAI engines for URA-Net (trainer, evaluator), the feature cache, and the ``fit`` / ``test`` workflows."""

from .evaluator import URANetEvaluator
from .features import augmented_views, extract_feature_bank
from .trainer import URANetTrainer
from .workflow import compute_thresholds, fit, run_inference, split_normal_validation, test

__all__ = [
    "URANetEvaluator",
    "URANetTrainer",
    "augmented_views",
    "compute_thresholds",
    "extract_feature_bank",
    "fit",
    "run_inference",
    "split_normal_validation",
    "test",
]
