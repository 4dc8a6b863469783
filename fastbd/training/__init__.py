"""Training the threat models: self-supervised image encoders (SimCLR, BYOL) and CLIP models,
each resumable from its saved state."""

from fastbd.training.clip import CLIPHistory, CLIPTrainConfig, train_clip
from fastbd.training.ssl import SSLConfig, SSLHistory, byol_loss, nt_xent, train_ssl

__all__ = ["CLIPHistory", "CLIPTrainConfig", "SSLConfig", "SSLHistory", "byol_loss",
           "nt_xent", "train_clip", "train_ssl"]
