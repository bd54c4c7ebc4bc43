"""Handlers around validation during training: early stopping on the validator's key metric."""

from __future__ import annotations

import logging
import math

from ignite.engine import Engine, Events

__all__ = ["ValidationEarlyStopping"]

logger = logging.getLogger("ura_monai")


class ValidationEarlyStopping:
    """Stop training when the validator's key metric has not improved for ``patience`` validations.

    Attach it to the trainer (it listens to the validator, so it needs no reference to the trainer in the
    config, which would be circular); ``patience`` 0 disables it. In distributed training every rank validates
    on the whole validation set, so all ranks see the same metric and stop together.

    Args:
        validator: the validation evaluator (its ``key_val_metric`` is watched, higher is better).
        patience: validations without improvement before stopping; 0 never stops.
        min_delta: an improvement must exceed the best score by more than this.
        metric_name: metric to watch (default: the validator's key metric).
    """

    def __init__(
        self, validator: Engine, patience: int = 0, min_delta: float = 0.0, metric_name: str | None = None
    ) -> None:
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}")
        self.validator = validator
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.metric_name = metric_name
        self.best: float | None = None
        self.counter = 0
        self.trainer: Engine | None = None

    def attach(self, engine: Engine) -> None:
        self.trainer = engine
        if self.patience > 0:
            self.validator.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, validator: Engine) -> None:
        name = self.metric_name or validator.state.key_metric_name
        score = float(validator.state.metrics[name])
        if math.isfinite(score) and (self.best is None or score > self.best + self.min_delta):
            self.best, self.counter = score, 0
            return
        self.counter += 1
        logger.info("early stopping: %s did not improve for %d/%d validations", name, self.counter, self.patience)
        if self.counter >= self.patience and self.trainer is not None:
            logger.info("early stopping: terminating training at epoch %d", self.trainer.state.epoch)
            self.trainer.terminate()
