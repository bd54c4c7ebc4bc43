"""URA-Net's training loss: restoration, perception (focal + Dice) and KL terms."""

from .ura_loss import RestorationLoss, URANetLoss, gaussian_kl

__all__ = ["RestorationLoss", "URANetLoss", "gaussian_kl"]
