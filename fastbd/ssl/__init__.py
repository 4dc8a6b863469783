"""Self-supervised training (SimCLR or BYOL) of threat-model encoders."""

from fastbd.ssl.augment import AugmentConfig, augment
from fastbd.ssl.trainer import SSLConfig, SSLHistory, byol_loss, nt_xent, train_ssl

__all__ = ["AugmentConfig", "SSLConfig", "SSLHistory", "augment", "byol_loss", "nt_xent",
           "train_ssl"]
