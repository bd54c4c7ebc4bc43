"""Distributed helpers: the module inside a data-parallel wrapper, and this process's rank through
``ignite.distributed`` (0 when not distributed), as MONAI's handlers ask ignite for it."""

from __future__ import annotations

import ignite.distributed as idist
from torch import nn

__all__ = ["unwrap", "rank", "is_rank0"]


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (or the network itself)."""
    return network.module if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else network


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return int(idist.get_rank())


def is_rank0() -> bool:
    """Whether this process writes files (rank 0, or not distributed)."""
    return rank() == 0
