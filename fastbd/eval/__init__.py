"""Evaluation: detection metrics, CA/ASR, linear probe, zero-shot, retrieval."""

from fastbd.eval.metrics import (
    DetectionMetrics,
    accuracy,
    attack_success_rate,
    auroc,
    box_iou,
    catch_rate,
    detection_metrics,
    trigger_coverage,
    window_accuracy,
)
from fastbd.eval.probe import ProbeConfig, ProbeResult, linear_probe
from fastbd.eval.zeroshot import (
    GENERIC_TEMPLATES,
    TriggeredSet,
    ZeroShotResult,
    evaluate_zero_shot,
    retrieval_attack_rate,
    retrieval_recall,
    zero_shot_kl,
    zero_shot_predict,
    zero_shot_probabilities,
    zero_shot_weights,
)

__all__ = ["GENERIC_TEMPLATES", "DetectionMetrics", "ProbeConfig", "ProbeResult",
           "TriggeredSet", "ZeroShotResult", "accuracy", "attack_success_rate", "auroc",
           "box_iou", "catch_rate", "detection_metrics", "evaluate_zero_shot", "linear_probe",
           "retrieval_attack_rate", "retrieval_recall", "trigger_coverage", "window_accuracy",
           "zero_shot_kl", "zero_shot_predict", "zero_shot_probabilities", "zero_shot_weights"]
