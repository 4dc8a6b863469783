"""SSL linear probe: a linear classifier on frozen features, scored on clean and patched data."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from fastbd.attacks.triggers import Attack
from fastbd.eval.metrics import accuracy, attack_success_rate
from fastbd.models.encoders import Encoder, embed_images
from fastbd.models.linear import fit_linear
from fastbd.validation import at_least, check_fields, fraction

PAPER_LABELLED_FRACTION = 0.01
"""The share of labelled training images the papers' linear probes learn from (PatchSearch's
``train_ssl_0.01_filelist.txt``)."""


@dataclass
class ProbeConfig:
    """``labelled_fraction`` of the training images (stratified, at least one per class) train
    the probe (full-batch L-BFGS on L2-normalised features, ``weight_decay``). The papers'
    probes learn from 1 % (``PAPER_LABELLED_FRACTION``, what ``fastbd eval ssl`` uses on your
    lists); this default, 10 %, is the synthetic world's (5,000 images: 1 % would be five a
    class)."""

    labelled_fraction: float = 0.1
    steps: int = 100
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, labelled_fraction=fraction(low_open=True), steps=at_least(1),
                     weight_decay=at_least(0), seed=at_least(0))


@dataclass
class ProbeResult:
    clean_accuracy: float
    patched_accuracy: float
    target_false_positives: int
    non_target_images: int
    asr: float
    target: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of ``fraction`` of each class (at least one per class)."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for cls in labels.unique().tolist():
        members = torch.nonzero(labels == cls).flatten()
        take = max(1, round(fraction * members.numel()))
        picks.append(members[torch.randperm(members.numel(), generator=g)[:take]])
    return torch.cat(picks).sort().values


def linear_probe(encoder: Encoder, train_images: torch.Tensor, train_labels: torch.Tensor,
                 eval_images: torch.Tensor, eval_labels: torch.Tensor, attack: Attack,
                 target: int, config: ProbeConfig | None = None,
                 device: torch.device | str = "cpu") -> ProbeResult:
    """Train the probe on a labelled subset of the (possibly poisoned) training images, then
    report clean accuracy, accuracy on eval images patched by ``attack`` (eval placement), the
    number of non-target patched images predicted as the target, and ASR."""
    config = config or ProbeConfig()
    subset = stratified_subset(train_labels, config.labelled_fraction, config.seed)
    n_classes = int(max(train_labels.max(), eval_labels.max())) + 1
    features = embed_images(encoder, train_images[subset], device=device)
    probe = fit_linear(features, train_labels[subset].to(device), n_classes, config.steps,
                       config.weight_decay)
    g = torch.Generator().manual_seed(config.seed + 1)
    patched, _ = attack.apply(eval_images, g, train=False)
    with torch.no_grad():
        clean_pred = probe(embed_images(encoder, eval_images, device=device)).argmax(1).cpu()
        patched_pred = probe(embed_images(encoder, patched, device=device)).argmax(1).cpu()
    non_target = eval_labels != target
    return ProbeResult(
        clean_accuracy=accuracy(clean_pred, eval_labels),
        patched_accuracy=accuracy(patched_pred, eval_labels),
        target_false_positives=int((patched_pred[non_target] == target).sum()),
        non_target_images=int(non_target.sum()),
        asr=attack_success_rate(patched_pred, eval_labels, target), target=target)
