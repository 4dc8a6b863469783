"""Self-supervised training (SimCLR) of threat-model encoders."""

from fastbd.ssl.augment import AugmentConfig, augment
from fastbd.ssl.simclr import SSLConfig, SSLHistory, nt_xent, train_simclr

__all__ = ["AugmentConfig", "SSLConfig", "SSLHistory", "augment", "nt_xent", "train_simclr"]
