"""MONAI engines for URA-Net (trainer, evaluator), the feature cache, and the ``fit`` / ``test`` workflows."""

from .evaluation import compute_thresholds, run_inference, test
from .evaluator import URANetEvaluator
from .features import augmented_views, extract_feature_bank
from .trainer import URANetTrainer
from .workflow import fit, split_normal_validation

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
