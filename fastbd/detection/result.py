"""``DetectionResult``: what a detector found, with ``save(dir)`` writing the report files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastbd.eval.metrics import DetectionMetrics
from fastbd.storage import ResultFiles, remove_files

PATCH_FOLDER = "all_top_poison_patches"
"""The sub-folder of a saved result holding one PNG per exported patch (PatchSearch's layout,
which its official classifier reads)."""


@dataclass
class DetectionResult:
    """Per-image ``scores`` (float64 ``N``, 0 = unscored), ``removed`` (bool ``N``, predicted
    poisonous), ``ranking`` (indices by decreasing score), the top-k poisons ``topk`` with their
    candidate ``windows`` (``k×2``, top-left) and attention ``maps`` (``k×S×S``), their images
    ``top_images`` (uint8 ``k×3×S×S``), the trigger
    ``triggers`` (uint8 ``k×3×w×w``), ``cluster_labels`` (``N``), per-stage ``timings`` (seconds)
    and ``throughput`` (images encoded per second), the ``config``, the search ``rounds``, and
    with ground truth the detection ``metrics``, ``topk_accuracy`` and ``trigger`` box scores;
    ``test_index`` (int64: the flip test's images), ``top_patches`` (uint8 ``m×3×w×w``: the
    candidate windows of the ``m`` best-scored images), ``margins`` (float32 ``N``: the poison
    classifier's ensemble margin, poison logit − clean logit); ``plan``: the search's cluster
    count, why, and its estimated size and time (``plan_search``); ``warnings``: what makes
    the result implausible (``implausibility``), also logged; ``check``: the backdoor check
    (``backdoor_check``: statistic, threshold, ``backdoor``; empty when it was off) — when it
    finds no backdoor nothing is removed; ``checkpoint_files``: the run's
    training-state files, deleted by ``save``."""

    method: str
    scores: torch.Tensor
    removed: torch.Tensor
    ranking: torch.Tensor
    topk: torch.Tensor
    windows: torch.Tensor
    maps: torch.Tensor
    triggers: torch.Tensor
    cluster_labels: torch.Tensor
    timings: dict[str, float]
    throughput: dict[str, float]
    config: dict
    rounds: list[dict] = field(default_factory=list)
    forwards: dict[str, int] = field(default_factory=dict)
    """Images each stage put through a network (the encoder's forwards for ``features``,
    ``candidates``, ``flip_test`` and ``check``; the poison classifier's for ``classifier``)."""
    test_index: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    top_patches: torch.Tensor = field(
        default_factory=lambda: torch.empty(0, 3, 1, 1, dtype=torch.uint8))
    margins: torch.Tensor | None = None
    top_images: torch.Tensor | None = None
    poison_probability: torch.Tensor | None = None
    classifier: dict = field(default_factory=dict)
    metrics: DetectionMetrics | None = None
    topk_accuracy: float | None = None
    trigger_scores: dict[str, float] = field(default_factory=dict)
    scored_ranking: torch.Tensor = field(
        default_factory=lambda: torch.empty(0, dtype=torch.long))
    """int64 ``m``: the images the search scored, in ranking order (for the retrieval
    curve)."""
    ranked_windows: torch.Tensor = field(
        default_factory=lambda: torch.empty(0, 2, dtype=torch.long))
    """int64 ``m×2``: their windows (top-left)."""
    retrieval_curve: list[dict] = field(default_factory=list)
    per_target: dict[int, dict[str, float]] = field(default_factory=dict)
    """A multi-target attack's recall and top-k share per target (``per_target_detection``)."""
    warnings: list[str] = field(default_factory=list)
    plan: dict = field(default_factory=dict)
    check: dict = field(default_factory=dict)
    checkpoint_files: list[Path] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {
            "method": self.method, "n_images": int(self.scores.numel()),
            "removed": int(self.removed.sum()), "scored": int((self.scores != 0).sum()),
            "topk": self.topk.tolist(), "windows": self.windows.tolist(),
            "timings_s": self.timings, "forwards": self.forwards,
            "throughput_img_per_s": self.throughput,
            "rounds": self.rounds, "classifier": self.classifier, "config": self.config,
            "plan": self.plan, "warnings": self.warnings, "backdoor": self.backdoor,
            "check": self.check}
        if self.metrics is not None:
            out["metrics"] = self.metrics.to_dict()
        if self.topk_accuracy is not None:
            out["topk_accuracy"] = self.topk_accuracy
        out.update(self.trigger_scores)
        if self.retrieval_curve:
            out["retrieval_curve"] = self.retrieval_curve
        if self.per_target:
            out["per_target"] = {str(t): v for t, v in self.per_target.items()}
        return out

    @property
    def backdoor(self) -> bool | None:
        """The backdoor check's verdict (None when it did not run)."""
        return bool(self.check["backdoor"]) if self.check else None

    def decision(self) -> str:
        """One line: whether the check found a backdoor, how many images were removed (and the
        precision/recall when ground truth was known)."""
        if self.backdoor is False:
            return (f"{self.method}: no backdoor found (check {self.check['statistic']:.2f} < "
                    f"{self.check['threshold']:.2f}: no candidate trigger captures most "
                    f"images); removed 0 of {self.removed.numel()} images, scores and margins "
                    "saved")
        line = (f"{self.method}: removed {int(self.removed.sum())} of {self.removed.numel()} "
                "images")
        if self.metrics is not None:
            line += (f" (precision {self.metrics.precision:.1%}, recall "
                     f"{self.metrics.recall:.1%})")
        if self.warnings:
            line += f" — implausible: {'; '.join(self.warnings)}"
        return line

    def save(self, directory: str | Path, file_list_lines: list[str] | None = None,
             truth: torch.Tensor | None = None) -> Path:
        """Write ``result.json``; ``scores.npy`` (float64 ``N`` in file order, 0 = unscored:
        what PatchSearch's official classifier takes as ``--poison_scores``), ``removed.npy``
        (bool ``N``), ``margins.npy`` (float32 ``N``), ``cluster_labels.npy`` and
        ``test_images.npy`` (int64); ``filtered.txt`` (the kept lines of the input file list,
        when given); ``all_top_poison_patches/00000.png …`` (one PNG per exported patch, best
        first: the official layout); PNGs of the top triggers, their attention maps and the
        poison-score distribution (poisoned vs clean with ``truth``); ``report.md`` (the decision,
        the summary and those pictures on one page); and ``manifest.json`` last
        (``ResultFiles``: each file atomically; the files of a result saved there before are
        removed first). Then the run's ``checkpoint_files`` (training state an interrupted run
        would continue from) are deleted: the result supersedes them."""
        from fastbd.data.readers import save_png
        from fastbd.report.markdown import markdown_report
        from fastbd.report.plots import (
            save_attention_grid,
            save_image_grid,
            save_retrieval_curve,
            save_score_histogram,
        )

        if file_list_lines is not None and len(file_list_lines) != self.removed.numel():
            raise ValueError(f"{len(file_list_lines)} file-list lines for "
                             f"{self.removed.numel()} images")
        files = ResultFiles(directory)
        files.json("result.json", self.summary())
        files.array("scores.npy", self.scores.cpu().double().numpy())
        files.array("removed.npy", self.removed.cpu().numpy())
        if self.margins is not None:
            files.array("margins.npy", self.margins.cpu().float().numpy())
        files.array("cluster_labels.npy", self.cluster_labels.cpu().long().numpy())
        files.array("test_images.npy", self.test_index.cpu().long().numpy())
        if file_list_lines is not None:
            kept = [line for line, gone in zip(file_list_lines, self.removed.tolist(),
                                               strict=True) if not gone]
            files.text("filtered.txt", "".join(f"{line}\n" for line in kept))
        for i, patch in enumerate(self.top_patches):
            save_png(patch, files.path(f"{PATCH_FOLDER}/{i:05d}.png"))
        images = []
        if self.triggers.numel():
            save_image_grid(self.triggers, files.path("top_triggers.png"))
            images.append(("Top trigger candidates", "top_triggers.png"))
        if self.triggers.numel() and self.top_images is not None:
            flags = None if truth is None else torch.as_tensor(truth).bool()[self.topk].tolist()
            save_attention_grid(self.top_images, self.maps, self.windows,
                                self.triggers.shape[-1], files.path("attention_maps.png"),
                                self.topk.tolist(), flags)
            images.append(("Their images, attention maps and windows", "attention_maps.png"))
        save_score_histogram(self.scores, files.path("score_distribution.png"), truth)
        images.append(("Poison scores", "score_distribution.png"))
        if self.retrieval_curve:
            save_retrieval_curve(self.retrieval_curve, files.path("retrieval_curve.png"))
            images.append(("Acc / IoU / CR of the top-k windows", "retrieval_curve.png"))
        files.text("report.md", markdown_report(f"{self.method} report", self.decision(),
                                                {"Result": self.summary()}, images))
        files.close()
        remove_files(self.checkpoint_files)
        self.checkpoint_files = []
        return files.directory
