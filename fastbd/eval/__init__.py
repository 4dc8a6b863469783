"""Evaluation: detection metrics, CA/ASR, linear probe, zero-shot, retrieval."""

from fastbd.eval.metrics import (
    DetectionMetrics,
    accuracy,
    attack_success_rate,
    auroc,
    box_iou,
    catch_rate,
    detection_metrics,
)
from fastbd.eval.probe import ProbeConfig, ProbeResult, linear_probe

__all__ = ["DetectionMetrics", "ProbeConfig", "ProbeResult", "accuracy", "attack_success_rate",
           "auroc", "box_iou", "catch_rate", "detection_metrics", "linear_probe"]
