"""Networks (:mod:`.nets`), their blocks (:mod:`.blocks`) and URA-Net checkpoints (:mod:`.checkpoint`)."""

# nets first: the export wrapper in nets imports checkpoint, which imports nets.ura_net
from .nets import URANet, URANetExport

# isort: split
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint

__all__ = ["URANet", "URANetExport", "load_checkpoint", "read_checkpoint", "save_checkpoint"]
