"""Metrics: detection (TP/FP/TN/FN, precision, recall, F1, AUROC, AUPRC), CA, ASR, trigger
boxes."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


def _as_bool(name: str, value: torch.Tensor) -> torch.Tensor:
    value = torch.as_tensor(value)
    if value.dtype != torch.bool:
        if value.is_floating_point() or not bool(((value == 0) | (value == 1)).all()):
            raise ValueError(f"{name} must be boolean or 0/1")
        value = value.bool()
    return value.flatten().cpu()


@dataclass
class DetectionMetrics:
    tp: int
    fp: int
    tn: int
    fn: int
    precision: float
    recall: float
    f1: float
    auroc: float | None = None
    auprc: float | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def auroc(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """Area under the ROC curve (Mann–Whitney U with average ranks for ties)."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten().cpu()
    truth = _as_bool("truth", truth)
    if scores.numel() != truth.numel():
        raise ValueError(f"{scores.numel()} scores for {truth.numel()} labels")
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if positives == 0 or negatives == 0:
        raise ValueError("AUROC needs both positive and negative samples")
    order = scores.argsort()
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    unique, inverse, counts = torch.unique(sorted_scores, return_inverse=True,
                                           return_counts=True)
    if unique.numel() < scores.numel():  # average the ranks of tied scores
        first = torch.cumsum(counts, 0) - counts + 1
        average = first + (counts - 1) / 2.0
        ranks[order] = average[inverse].to(torch.float64)
    u = float(ranks[truth].sum()) - positives * (positives + 1) / 2
    return u / (positives * negatives)


def average_precision(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """Area under the precision–recall curve as average precision: the mean, over the
    positives, of the precision among everything scored at least as high as it (tied scores
    count together, as scikit-learn's ``average_precision_score`` does)."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten().cpu()
    truth = _as_bool("truth", truth)
    if scores.numel() != truth.numel():
        raise ValueError(f"{scores.numel()} scores for {truth.numel()} labels")
    positives = int(truth.sum())
    if positives == 0:
        raise ValueError("average precision needs positive samples")
    order = torch.argsort(scores, descending=True, stable=True)
    sorted_scores, hits = scores[order], truth[order].double()
    # The last position of each run of tied scores: precision and recall step there.
    last = torch.ones_like(sorted_scores, dtype=torch.bool)
    last[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    true_positives = hits.cumsum(0)[last]
    seen = torch.arange(1, scores.numel() + 1, dtype=torch.float64)[last]
    recall_steps = torch.diff(true_positives, prepend=torch.zeros(1, dtype=torch.float64))
    return float((recall_steps * true_positives / seen).sum() / positives)


def detection_metrics(predicted: torch.Tensor, truth: torch.Tensor,
                      scores: torch.Tensor | None = None) -> DetectionMetrics:
    """Detection quality of a predicted poison mask against the ground truth (both ``N``);
    with ``scores`` (float ``N``, higher = more poisonous) and both classes present, their
    AUROC and AUPRC (average precision) too."""
    predicted, truth = _as_bool("predicted", predicted), _as_bool("truth", truth)
    if predicted.numel() != truth.numel():
        raise ValueError(f"predicted has {predicted.numel()} entries, truth {truth.numel()}")
    tp = int((predicted & truth).sum())
    fp = int((predicted & ~truth).sum())
    fn = int((~predicted & truth).sum())
    tn = int((~predicted & ~truth).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    areas: dict[str, float] = {}
    if scores is not None and 0 < int(truth.sum()) < truth.numel():
        areas = {"auroc": auroc(scores, truth), "auprc": average_precision(scores, truth)}
    return DetectionMetrics(tp, fp, tn, fn, precision, recall, f1, **areas)


ONE_CLASS_NOTE = ("AUROC and AUPRC need both poisoned and clean samples; the ground truth has "
                  "only one class")


def ranking_areas(scores: torch.Tensor, truth: torch.Tensor) -> dict[str, object]:
    """``{"auroc", "auprc"}`` of ``scores`` (float ``N``, higher = more poisonous) against
    ``truth`` (bool ``N``); both None, with a ``note`` saying why, when the truth holds one
    class only (a clean set) — the rest of a result is still worth saving."""
    truth = _as_bool("truth", truth)
    if 0 < int(truth.sum()) < truth.numel():
        return {"auroc": auroc(scores, truth), "auprc": average_precision(scores, truth)}
    return {"auroc": None, "auprc": None, "note": ONE_CLASS_NOTE}


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (clean accuracy, CA)."""
    predicted, labels = torch.as_tensor(predicted).flatten(), torch.as_tensor(labels).flatten()
    if predicted.numel() != labels.numel():
        raise ValueError(f"{predicted.numel()} predictions for {labels.numel()} labels")
    if predicted.numel() == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float((predicted.cpu() == labels.cpu()).double().mean())


def attack_success_rate(predicted: torch.Tensor, labels: torch.Tensor, target: int) -> float:
    """ASR: among triggered images whose true class is not the target, the fraction predicted
    as the target (the true labels of target-class images are excluded, never scored)."""
    predicted, labels = torch.as_tensor(predicted).flatten(), torch.as_tensor(labels).flatten()
    if predicted.numel() != labels.numel():
        raise ValueError(f"{predicted.numel()} predictions for {labels.numel()} labels")
    keep = labels.cpu() != target
    if not bool(keep.any()):
        raise ValueError("ASR needs at least one image outside the target class")
    return float((predicted.cpu()[keep] == target).double().mean())


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of paired boxes ``N×4`` (y, x, h, w) → float ``N``."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(f"boxes must both be N×4, got {tuple(a.shape)} and {tuple(b.shape)}")
    top = torch.maximum(a[:, 0], b[:, 0])
    left = torch.maximum(a[:, 1], b[:, 1])
    bottom = torch.minimum(a[:, 0] + a[:, 2], b[:, 0] + b[:, 2])
    right = torch.minimum(a[:, 1] + a[:, 3], b[:, 1] + b[:, 3])
    inter = (bottom - top).clamp(min=0) * (right - left).clamp(min=0)
    union = a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter
    return torch.where(union > 0, inter / union, torch.zeros_like(union))


def trigger_coverage(predicted: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """The share of each true trigger box inside its predicted box, paired boxes ``N×4``
    (y, x, h, w) → float64 ``N`` (0 where the true box is empty: a clean image)."""
    predicted, truth = torch.as_tensor(predicted).double(), torch.as_tensor(truth).double()
    box_iou(predicted, truth)  # validates the shapes
    top = torch.maximum(predicted[:, 0], truth[:, 0])
    left = torch.maximum(predicted[:, 1], truth[:, 1])
    bottom = torch.minimum(predicted[:, 0] + predicted[:, 2], truth[:, 0] + truth[:, 2])
    right = torch.minimum(predicted[:, 1] + predicted[:, 3], truth[:, 1] + truth[:, 3])
    inter = (bottom - top).clamp(min=0) * (right - left).clamp(min=0)
    area = truth[:, 2] * truth[:, 3]
    return torch.where(area > 0, inter / area.clamp(min=1e-12), torch.zeros_like(area))


def catch_rate(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """The PoisonCAM paper's Catch Rate (CR): the mean share of the true trigger contained in
    the retrieved window (``trigger_coverage``), over paired boxes ``N×4``."""
    coverage = trigger_coverage(predicted, truth)
    if coverage.numel() == 0:
        raise ValueError("catch rate of no boxes is undefined")
    return float(coverage.mean())


def window_accuracy(predicted: torch.Tensor, truth: torch.Tensor, threshold: float = 0.0
                    ) -> float:
    """The PoisonCAM paper's window Acc: the fraction of retrieved windows whose IoU with the
    true trigger box exceeds ``threshold`` (0: any part of the trigger is in the window)."""
    iou = box_iou(predicted, truth)
    if iou.numel() == 0:
        raise ValueError("window accuracy of no boxes is undefined")
    return float((iou > threshold).double().mean())


def per_target_detection(removed: torch.Tensor, topk: torch.Tensor,
                         poison_target: torch.Tensor) -> dict[int, dict[str, float]]:
    """A multi-target attack's detection per target (``poison_target``: int64 ``N``, the target
    each poisoned image's trigger points to, −1 for clean images; ``removed`` bool ``N``;
    ``topk`` int64 ``k``: the search's top images): per target its poisoned images, the share
    of them removed (recall) and the share of the top-k that are its poisons (a search that
    finds every trigger spreads its top-k over the targets). Clean images removed belong to no
    target, so precision is the overall one (``detection_metrics``)."""
    removed = torch.as_tensor(removed).bool().cpu()
    poison_target = torch.as_tensor(poison_target).long().cpu()
    if removed.shape != poison_target.shape:
        raise ValueError(f"removed has {removed.numel()} entries, poison_target "
                         f"{poison_target.numel()}")
    top = poison_target[torch.as_tensor(topk).long().cpu()]
    out = {}
    for target in sorted(set(poison_target[poison_target >= 0].tolist())):
        mine = poison_target == target
        out[int(target)] = {"poisoned": int(mine.sum()),
                            "recall": float(removed[mine].double().mean()),
                            "topk_share": float((top == target).double().mean())
                            if top.numel() else 0.0}
    return out

