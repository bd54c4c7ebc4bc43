"""The learning-rate schedule of URA-Net training (``workflow.fit`` and the bundle's ``train.json``)."""

from __future__ import annotations

import math

__all__ = ["CosineDecay"]


class CosineDecay:
    """LR multiplier for ``torch.optim.lr_scheduler.LambdaLR``: cosine decay from 1 to 0 over ``total_steps``
    iterations, then 0.

    A closed form of the step (not a chained update), so that a resumed run whose total grew decays over the new
    total once ``total_steps`` is set to it. ``LambdaLR`` saves and restores ``total_steps`` with its state.

    Args:
        total_steps: number of optimizer steps (epochs x iterations per epoch).
    """

    def __init__(self, total_steps: int) -> None:
        self.total_steps = max(1, int(total_steps))

    def __call__(self, step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))
