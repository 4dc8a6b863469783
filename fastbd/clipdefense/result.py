"""The result type every CLIP defense returns (UBT extends it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastbd.storage import ResultFiles, remove_files


@dataclass
class DefenseResult:
    """A defended CLIP and what the defense saw. ``suspicious``: indices of D_susp (int64,
    empty when the defense has none); ``reference_similarity``: float32 ``N`` cosine of every
    pair under the clean reference (None when not computed); ``checkpoint_files``: the run's
    training-state files, deleted by ``save``."""

    model: nn.Module
    method: str
    suspicious: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    reference_similarity: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    checkpoint_files: list[Path] = field(default_factory=list)

    def summary(self, truth: torch.Tensor | None = None) -> dict[str, object]:
        """JSON-ready summary; with ``truth`` (bool ``N``, True = poisoned pair) the number of
        poisoned pairs among the suspicious ones."""
        out: dict[str, object] = {"method": self.method,
                                  "suspicious": int(self.suspicious.numel()),
                                  "timings_s": self.timings, "config": self.config}
        if truth is not None:
            out["suspicious_poisoned"] = int(as_truth(truth)[self.suspicious].sum())
        return out

    def decision(self, truth: torch.Tensor | None = None) -> str:
        """One line saying what the defense did (and, with ``truth``, how many of the pairs it
        suspected are poisoned)."""
        n = int(self.suspicious.numel())
        if n == 0:
            return f"{self.method}: defended (fine-tuned; no suspicious set)"
        caught = (f" ({int(as_truth(truth)[self.suspicious].sum())} poisoned)"
                  if truth is not None else "")
        return f"{self.method}: defended; {n} suspicious pairs{caught} unlearned"

    def save(self, directory: str | Path, truth: torch.Tensor | None = None, *,
             weights: bool = True, **extras) -> Path:
        """Write ``model.pt`` (the defended state dict; skipped with ``weights=False``),
        ``result.json``, ``similarity.png`` when reference similarities exist (backdoor vs clean
        with ``truth``), what ``add_files`` adds (``extras`` are its keyword arguments),
        ``report.md`` (the decision, the summary and the pictures on one page) and
        ``manifest.json`` last (``ResultFiles``: each file atomically; the files of a result
        saved there before are removed first). Then the run's ``checkpoint_files`` (training
        state an interrupted run would continue from) are deleted: the result supersedes them.
        """
        from fastbd.report.markdown import markdown_report
        from fastbd.report.plots import save_score_histogram

        files = ResultFiles(directory)
        if weights:
            files.torch("model.pt", self.model.state_dict())
        summary = self.summary(truth)
        files.json("result.json", summary)
        images = []
        if self.reference_similarity is not None:
            save_score_histogram(self.reference_similarity, files.path("similarity.png"),
                                 None if truth is None else as_truth(truth),
                                 title="pair similarity under the reference model",
                                 xlabel="cosine of image and caption", ylabel="pairs")
            images.append(("Pair similarity under the reference model", "similarity.png"))
        images += self.add_files(files, truth=truth, **extras)
        files.text("report.md", markdown_report(f"{self.method} report", self.decision(truth),
                                                {"Result": summary}, images))
        files.close()
        remove_files(self.checkpoint_files)
        self.checkpoint_files = []
        return files.directory

    def add_files(self, files: ResultFiles, **extras) -> list[tuple[str, str]]:
        """A subclass's own report files; returns the pictures among them as (caption, file
        name) for ``report.md`` (none here)."""
        return []


def as_truth(truth: torch.Tensor) -> torch.Tensor:
    """Ground truth as a bool CPU tensor."""
    return torch.as_tensor(truth).bool().cpu()
