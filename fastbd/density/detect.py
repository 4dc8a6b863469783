"""Poisoned CLIP pairs found by local density in embedding space (Huang et al., ICLR 2025),
built on ``fastbd.ops.cosine_topk``: the embeddings of every pair under the model being
checked, each pair's k nearest neighbours among them, a density outlier score per pair, and
the pairs whose score stands out of the score distribution flagged.

The reference set is the pairs' image embeddings, or (``reference="pairs"``) image and caption
embeddings together, as the paper's vision-modality detectors use; a pair's score is that of
its image embedding.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastbd.density.scores import SCORES, density_scores, nearest_neighbours
from fastbd.eval.metrics import detection_metrics, ranking_areas
from fastbd.models.clip import encode_images, encode_texts
from fastbd.models.encoders import working_copy
from fastbd.storage import ResultFiles
from fastbd.validation import above, at_least, check_fields, one_of

log = logging.getLogger(__name__)


@dataclass
class DensityConfig:
    """``score``: one of ``SCORES`` (DAO, the paper's best); ``k`` neighbours (32, the
    reference code's default); ``reference``: ``images`` or ``pairs`` (images and captions);
    pairs scoring more than ``threshold`` robust standard deviations (1.4826 × the median
    absolute deviation) above the median score are flagged; ``chunk`` query rows per
    ``cosine_topk`` call."""

    score: str = "dao"
    k: int = 32
    reference: str = "pairs"
    threshold: float = 3.0
    chunk: int = 4096

    def __post_init__(self) -> None:
        check_fields(self, score=one_of(*SCORES), k=at_least(1),
                     reference=one_of("images", "pairs"), threshold=above(0),
                     chunk=at_least(1))


@dataclass
class DensityResult:
    """Every pair's ``scores`` (float64 ``N``, higher = more likely poisoned), the
    ``flagged`` pairs (bool ``N``), the ``cutoff`` score above which a pair is flagged, the
    config and stage timings."""

    scores: torch.Tensor
    flagged: torch.Tensor
    cutoff: float
    config: dict
    timings: dict[str, float] = field(default_factory=dict)

    def metrics(self, truth: torch.Tensor) -> dict[str, object]:
        """Threshold-free (AUROC, AUPRC) and thresholded (precision, recall, F1 of the flagged
        set) quality against ``truth`` (bool ``N``, True = poisoned)."""
        truth = torch.as_tensor(truth).bool()
        return {**detection_metrics(self.flagged, truth).to_dict(),
                **ranking_areas(self.scores, truth)}

    def decision(self, truth: torch.Tensor | None = None) -> str:
        """One line: how many pairs were flagged (and how many of them are poisoned)."""
        line = (f"density: flagged {int(self.flagged.sum())} of {self.flagged.numel()} pairs "
                f"({self.config['score']} above {self.cutoff:.3g})")
        if truth is not None:
            line += f", {int(torch.as_tensor(truth).bool()[self.flagged].sum())} of them poisoned"
        return line

    def summary(self, truth: torch.Tensor | None = None) -> dict[str, object]:
        out: dict[str, object] = {"method": "density", "flagged": int(self.flagged.sum()),
                                  "pairs": int(self.flagged.numel()), "cutoff": self.cutoff,
                                  "timings_s": self.timings, "config": self.config}
        if truth is not None:
            out["metrics"] = self.metrics(truth)
        return out

    def save(self, directory: str | Path, truth: torch.Tensor | None = None, *,
             filtered: dict[str, str] | None = None, extra: dict | None = None) -> Path:
        """Write ``scores.npy``, ``flagged.npy``, ``result.json`` (with ``extra``),
        ``score_distribution.png``, ``report.md``, the ``filtered`` files (name → text: e.g. the
        unflagged pairs as a CSV) and ``manifest.json`` last."""
        from fastbd.report.markdown import markdown_report
        from fastbd.report.plots import save_score_histogram

        files = ResultFiles(directory)
        files.array("scores.npy", self.scores.numpy())
        files.array("flagged.npy", self.flagged.numpy())
        files.json("result.json", {**self.summary(truth), **(extra or {})})
        save_score_histogram(self.scores, files.path("score_distribution.png"), truth,
                             title=f"{self.config['score']} density score",
                             xlabel=f"{self.config['score']} (higher: sparser neighbourhood)",
                             ylabel="pairs")
        files.text("report.md", markdown_report(
            "density report", self.decision(truth), {"Result": {**self.summary(truth),
                                                                **(extra or {})}},
            [("Density scores", "score_distribution.png")]))
        for name, text in (filtered or {}).items():
            files.text(name, text)
        files.close()
        return files.directory


def robust_cutoff(scores: torch.Tensor, threshold: float) -> float:
    """``median + threshold · 1.4826 · MAD`` of the finite ``scores`` (the MAD scaled to a
    normal distribution's standard deviation)."""
    finite = scores[torch.isfinite(scores)].double()
    median = finite.median()
    spread = 1.4826 * (finite - median).abs().median()
    return float(median + threshold * spread)


@torch.no_grad()
def density_detect(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, *,
                   config: DensityConfig | None = None, device: torch.device | str = "cpu",
                   backend: str | None = None) -> DensityResult:
    """Score every pair (uint8 images ``N×3×S×S``, token ids ``N×L``) of a possibly poisoned
    set with the CLIP ``model`` being checked; ``model`` is left as it is."""
    config = config or DensityConfig()
    n = images.shape[0]
    if tokens.shape[0] != n:
        raise ValueError(f"{n} images but {tokens.shape[0]} captions")
    if config.k >= n:
        raise ValueError(f"k = {config.k} needs more than {config.k} pairs, got {n}")
    timings = {}
    start = time.perf_counter()
    model = working_copy(model, device)
    points = encode_images(model, images, device=device)
    if config.reference == "pairs":
        points = torch.cat([points, encode_texts(model, tokens, device=device)])
    timings["embed"] = time.perf_counter() - start
    start = time.perf_counter()
    neighbours = nearest_neighbours(points, config.k, chunk=config.chunk, backend=backend)
    timings["neighbours"] = time.perf_counter() - start
    scores = density_scores(neighbours, config.score)[:n]
    cutoff = robust_cutoff(scores, config.threshold)
    flagged = scores > cutoff
    log.info("density (%s, k=%d): %d of %d pairs flagged", config.score, config.k,
             int(flagged.sum()), n)
    return DensityResult(scores=scores, flagged=flagged, cutoff=cutoff, config=asdict(config),
                         timings=timings)
