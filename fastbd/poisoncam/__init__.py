"""PoisonCAM: find poisoned images in an SSL training set by cluster activation masking.

    from fastbd.poisoncam import PoisonCAM, detect
    result = detect(encoder, images)                      # images: uint8 N×3×S×S
    result = PoisonCAM(Config(...)).fit(encoder, images, checkpoint_dir="out").result_
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastbd.data.bank import ImageBank
from fastbd.detection import (
    PRESETS,
    ClassifierConfig,
    Config,
    DetectionResult,
    Detector,
    preset,
)
from fastbd.models.encoders import Encoder
from fastbd.poisoncam.method import PoisonCAMMethod


class PoisonCAM(Detector):
    """PoisonCAM (cluster activation masking + the flip test + the poison classifier) with
    ``config`` (default ``Config()``: the paper's ImageNet-100 settings, scaled to the data).
    ``fit(encoder, images, ...)`` runs it (``Detector.fit``); the result is ``result_``."""

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(PoisonCAMMethod(), config)


def detect(encoder: Encoder, images: torch.Tensor | ImageBank, config: Config | None = None,
           *, device: torch.device | str | None = None,
           ground_truth: torch.Tensor | None = None, true_boxes: torch.Tensor | None = None,
           true_targets: torch.Tensor | None = None,
           checkpoint_dir: str | Path | None = None, resume: bool = False,
           verbose: bool = True) -> DetectionResult:
    """Run PoisonCAM on uint8 ``images`` (``N×3×S×S`` or an ``ImageBank``) with ``encoder``, on
    ``device`` (default: the encoder's). ``ground_truth`` (bool ``N``) and ``true_boxes``
    (int64 ``N×4``) — and for a multi-target attack ``true_targets`` (int64 ``N``) — only feed
    the metrics; ``checkpoint_dir`` / ``resume`` keep and continue the run's state
    (``Detector.fit``)."""
    return PoisonCAM(config).fit(encoder, images, device=device, ground_truth=ground_truth,
                                 true_boxes=true_boxes, true_targets=true_targets,
                                 checkpoint_dir=checkpoint_dir,
                                 resume=resume, verbose=verbose).result_


__all__ = ["PRESETS", "ClassifierConfig", "Config", "DetectionResult", "PoisonCAM",
           "PoisonCAMMethod", "detect", "preset"]
