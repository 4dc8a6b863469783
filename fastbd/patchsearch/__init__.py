"""PatchSearch (Tejankar et al.): the Grad-CAM baseline, sharing PoisonCAM's pipeline."""

from __future__ import annotations

import torch

from fastbd.data.bank import ImageBank
from fastbd.models.encoders import Encoder
from fastbd.poisoncam.config import Config
from fastbd.poisoncam.detect import Detector
from fastbd.poisoncam.result import DetectionResult


class PatchSearch(Detector):
    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config, "patchsearch")


def detect(encoder: Encoder, images: torch.Tensor | ImageBank, config: Config | None = None,
           **kwargs) -> DetectionResult:
    """Run PatchSearch; keyword arguments as ``fastbd.poisoncam.Detector.fit``."""
    return PatchSearch(config).fit(encoder, images, **kwargs).result_


__all__ = ["PatchSearch", "detect"]
