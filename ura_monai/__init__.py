"""ura_monai: URA-Net unsupervised anomaly detection, built on MONAI."""

__version__ = "0.1.0"
