"""PatchSearch (Tejankar et al.): the Grad-CAM baseline, on the pipeline PoisonCAM shares.

    from fastbd.patchsearch import PatchSearch, detect
    result = detect(encoder, images)
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastbd.data.bank import ImageBank
from fastbd.detection import Config, DetectionResult, Detector
from fastbd.models.encoders import Encoder
from fastbd.patchsearch.method import PatchSearchMethod
from fastbd.patchsearch.published import (
    PublishedPatchSearch,
    PublishedPatchSearchMethod,
    published_config,
)


class PatchSearch(Detector):
    """PatchSearch (Grad-CAM candidates, the pulled-into flip score, max cluster scores, the
    same poison classifier) with ``config``; ``fit`` as ``Detector.fit``."""

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(PatchSearchMethod(), config)


def detect(encoder: Encoder, images: torch.Tensor | ImageBank, config: Config | None = None,
           *, device: torch.device | str | None = None,
           ground_truth: torch.Tensor | None = None, true_boxes: torch.Tensor | None = None,
           checkpoint_dir: str | Path | None = None, resume: bool = False,
           verbose: bool = True) -> DetectionResult:
    """Run PatchSearch; arguments as ``fastbd.poisoncam.detect``."""
    return PatchSearch(config).fit(encoder, images, device=device, ground_truth=ground_truth,
                                   true_boxes=true_boxes, checkpoint_dir=checkpoint_dir,
                                   resume=resume, verbose=verbose).result_


__all__ = ["PatchSearch", "PatchSearchMethod", "PublishedPatchSearch",
           "PublishedPatchSearchMethod", "detect", "published_config"]
