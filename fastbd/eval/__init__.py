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
from fastbd.eval.zeroshot import retrieval_recall, zero_shot_predict, zero_shot_weights

__all__ = ["DetectionMetrics", "ProbeConfig", "ProbeResult", "accuracy", "attack_success_rate",
           "auroc", "box_iou", "catch_rate", "detection_metrics", "linear_probe",
           "retrieval_recall", "zero_shot_predict", "zero_shot_weights"]
