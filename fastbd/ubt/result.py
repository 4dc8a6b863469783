"""Result types shared by UBT and the CLIP baselines (CleanCLIP, ABL)."""

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
            out["suspicious_poisoned"] = int(_as_truth(truth)[self.suspicious].sum())
        return out

    def save(self, directory: str | Path, truth: torch.Tensor | None = None, *,
             weights: bool = True, **extras) -> Path:
        """Write ``model.pt`` (the defended state dict; skipped with ``weights=False``),
        ``result.json``, ``similarity.png`` when reference similarities exist (backdoor vs clean
        with ``truth``), what ``add_files`` adds (``extras`` are its keyword arguments), and
        ``manifest.json`` last (``ResultFiles``: each file atomically; the files of a result
        saved there before are removed first). Then the run's ``checkpoint_files`` (training
        state an interrupted run would continue from) are deleted: the result supersedes them.
        """
        from fastbd.report.plots import save_score_histogram

        files = ResultFiles(directory)
        if weights:
            files.torch("model.pt", self.model.state_dict())
        files.json("result.json", self.summary(truth))
        if self.reference_similarity is not None:
            save_score_histogram(self.reference_similarity, files.path("similarity.png"),
                                 None if truth is None else _as_truth(truth),
                                 title="pair similarity under the reference model",
                                 xlabel="cosine")
        self.add_files(files, **extras)
        files.close()
        remove_files(self.checkpoint_files)
        self.checkpoint_files = []
        return files.directory

    def add_files(self, files: ResultFiles, **extras) -> None:
        """A subclass's own report files (none here)."""


@dataclass
class UBTResult(DefenseResult):
    """UBT's result: ``poisoned`` and ``check_statistic`` (step 4), ``topk`` (int64 ``k``
    indices into the pairs), ``overfit_similarity`` (float32 ``|D_susp|``, aligned with
    ``suspicious``), ``relevance`` (float32 ``k×L`` token relevance) and ``token_keep`` (bool
    ``k×L``), the last two None when the check declined."""

    method: str = "ubt"
    poisoned: bool = False
    check_statistic: float = float("nan")
    topk: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    overfit_similarity: torch.Tensor | None = None
    relevance: torch.Tensor | None = None
    token_keep: torch.Tensor | None = None

    def summary(self, truth: torch.Tensor | None = None) -> dict[str, object]:
        out = super().summary(truth)
        out.update(poisoned=self.poisoned, check_statistic=self.check_statistic,
                   topk=self.topk.tolist())
        if truth is not None:
            out["topk_poisoned"] = int(_as_truth(truth)[self.topk].sum())
        return out

    def add_files(self, files: ResultFiles, *, tokens: torch.Tensor | None = None,
                  tokenizer=None, **_) -> None:
        """``token_relevance.png`` for the top pairs when relevance was computed and ``tokens``
        (``N×L``) / ``tokenizer`` are given (``save(..., tokens=, tokenizer=)``)."""
        from fastbd.report.plots import save_token_heatmap

        if self.relevance is not None and tokens is not None and tokenizer is not None:
            save_token_heatmap(self.relevance, tokens[self.topk].cpu(), tokenizer,
                               files.path("token_relevance.png"))


def _as_truth(truth: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(truth).bool().cpu()
