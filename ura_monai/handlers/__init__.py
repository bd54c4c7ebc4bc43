"""Ignite handlers for URA-Net workflows (bundle configs): project checkpoints with thresholds, early stopping on
validation, evaluation reports."""

from .checkpoint import URANetCheckpointLoader, URANetCheckpointSaver, compute_thresholds
from .metrics_writer import AnomalyMetricsWriter
from .perception import URANetPerceptionStage
from .validation import ValidationEarlyStopping

__all__ = [
    "AnomalyMetricsWriter",
    "URANetCheckpointLoader",
    "URANetCheckpointSaver",
    "URANetPerceptionStage",
    "ValidationEarlyStopping",
    "compute_thresholds",
]
