"""Networks: :class:`URANet` and :class:`URANetExport`, its tensor-in, tensor-out form (the bundle's
``network_def``); the EfficientNet-Lite0 backbone builder."""

from .efficientnet_lite import efficientnet_lite0
from .export import URANetExport
from .ura_net import URANet

__all__ = ["URANet", "URANetExport", "efficientnet_lite0"]
