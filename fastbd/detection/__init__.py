"""The detection pipeline PoisonCAM and PatchSearch share: clustering model, flip test,
iterative cluster search, poison classifier, result; ``Detector`` runs it with a
``DetectorMethod`` plugged in (``fastbd.poisoncam``, ``fastbd.patchsearch``)."""

from fastbd.detection.classifier import ClassifierReport
from fastbd.detection.config import PRECISIONS, PRESETS, ClassifierConfig, Config, preset
from fastbd.detection.method import DetectorMethod, SearchContext
from fastbd.detection.pipeline import Detector
from fastbd.detection.result import DetectionResult

__all__ = ["PRECISIONS", "PRESETS", "ClassifierConfig", "ClassifierReport", "Config",
           "DetectionResult", "Detector", "DetectorMethod", "SearchContext", "preset"]
