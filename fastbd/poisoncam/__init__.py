"""PoisonCAM: find poisoned images in an SSL training set by cluster activation masking."""

from fastbd.poisoncam.config import ClassifierConfig, Config
from fastbd.poisoncam.detect import Detector, PoisonCAM, detect
from fastbd.poisoncam.result import DetectionResult

__all__ = ["ClassifierConfig", "Config", "DetectionResult", "Detector", "PoisonCAM", "detect"]
