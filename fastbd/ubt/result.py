"""UBT's result: the CLIP-defense result plus the check, the top pairs and their tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastbd.clipdefense.result import DefenseResult, as_truth
from fastbd.storage import ResultFiles


@dataclass
class UBTResult(DefenseResult):
    """UBT's result: ``poisoned`` and ``check_statistic`` (step 4), ``topk`` (int64 ``k``
    indices into the pairs), ``overfit_similarity`` (float32 ``|D_susp|``, aligned with
    ``suspicious``), ``relevance`` (float32 ``k×L`` token relevance) and ``token_keep`` (bool
    ``k×L``), the last two None when the check declined; ``image_relevance`` (float32
    ``k×cells×cells``) and ``image_keep`` (bool, same shape) with ``masked_images``."""

    method: str = "ubt"
    poisoned: bool = False
    check_statistic: float = float("nan")
    topk: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    overfit_similarity: torch.Tensor | None = None
    relevance: torch.Tensor | None = None
    token_keep: torch.Tensor | None = None
    image_relevance: torch.Tensor | None = None
    image_keep: torch.Tensor | None = None

    def summary(self, truth: torch.Tensor | None = None) -> dict[str, object]:
        out = super().summary(truth)
        out.update(poisoned=self.poisoned, check_statistic=self.check_statistic,
                   topk=self.topk.tolist())
        if truth is not None:
            out["topk_poisoned"] = int(as_truth(truth)[self.topk].sum())
        return out

    def decision(self, truth: torch.Tensor | None = None) -> str:
        if not self.poisoned:
            return (f"ubt: declined — check statistic {self.check_statistic:.2f} says the model "
                    "carries no backdoor; it is returned unchanged")
        caught = (f" ({int(as_truth(truth)[self.topk].sum())} poisoned)"
                  if truth is not None else "")
        return (f"ubt: defended — check statistic {self.check_statistic:.2f}; "
                f"{self.topk.numel()} top pairs{caught} unlearned token by token")

    def add_files(self, files: ResultFiles, *, tokens: torch.Tensor | None = None,
                  tokenizer=None, truth: torch.Tensor | None = None,
                  **_) -> list[tuple[str, str]]:
        """``overfit_similarity.png``: the suspicious pairs' similarity under the overfit model
        (the UBT paper's Figs. 3–4; backdoor vs clean with ``truth``), and
        ``token_relevance.png`` for the top pairs (their pair ids, poisoned or clean with
        ``truth``) when relevance was computed and ``tokens`` (``N×L``) / ``tokenizer`` are
        given (``save(..., tokens=, tokenizer=)``)."""
        from fastbd.report.plots import save_score_histogram, save_token_heatmap

        pictures = []
        if self.overfit_similarity is not None and self.overfit_similarity.numel():
            save_score_histogram(
                self.overfit_similarity, files.path("overfit_similarity.png"),
                None if truth is None else as_truth(truth)[self.suspicious],
                title="suspicious pairs' similarity under the overfit model",
                xlabel="cosine of image and caption", ylabel="pairs")
            pictures.append(("Suspicious pairs under the overfit model",
                             "overfit_similarity.png"))
        if self.relevance is None or tokens is None or tokenizer is None:
            return pictures
        poisoned = None if truth is None else as_truth(truth)[self.topk].tolist()
        save_token_heatmap(self.relevance, tokens[self.topk].cpu(), tokenizer,
                           files.path("token_relevance.png"), pair_ids=self.topk.tolist(),
                           poisoned=poisoned)
        return [*pictures, ("Token relevance of the top pairs", "token_relevance.png")]
