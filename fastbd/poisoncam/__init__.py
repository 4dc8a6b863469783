"""PoisonCAM: find poisoned images in an SSL training set by cluster activation masking."""

from fastbd.poisoncam.config import PRESETS, ClassifierConfig, Config, preset
from fastbd.poisoncam.detect import Detector, PoisonCAM, detect
from fastbd.poisoncam.result import DetectionResult

__all__ = ["PRESETS", "ClassifierConfig", "Config", "DetectionResult", "Detector", "PoisonCAM",
           "detect", "preset"]
