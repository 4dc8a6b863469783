"""UBT (DESIGN.md §6): purify a backdoored CLIP by token-level unlearning of a few pairs.

1. Suspicious split: the ``susp_fraction`` lowest-similarity pairs under a clean reference model.
2. Overfit a copy of the model: ``(S − 1)²`` on suspicious batches + InfoNCE on normal batches.
3. Rank the suspicious pairs by similarity under the overfit model; keep the top
   ``ceil(sqrt(|D|·susp_fraction))``.
4. Poisoned-model check: the top pairs' mean overfit similarity, standardised by the suspicious
   pairs' similarity distribution (``z``); a clean model gives no concentrated high-similarity
   group, so below ``check_threshold`` the model is returned unchanged (``poisoned=False``).
5. Token relevance (Chefer) of the top captions under the poisoned model; masked captions keep
   the tokens with relevance ≥ ``token_threshold``.
6. Unlearn: minimise the mean cosine over every (image i, caption j) and (image i, masked
   caption j) for i, j in the top pairs, on the poisoned model.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fastbd.models.clip import clip_loss, clip_normalise, encode_images, encode_texts
from fastbd.ops import pair_cosine
from fastbd.ubt.relevance import masked_tokens, token_relevance

log = logging.getLogger(__name__)


@dataclass
class Config:
    """UBT hyperparameters with the paper's defaults. ``topk=None``:
    ``ceil(sqrt(|D|·susp_fraction))``. ``check_threshold``: z-score above which the model is
    called poisoned (calibrated with ``scripts/calibrate_ubt.py``; see the README)."""

    susp_fraction: float = 0.01
    topk: int | None = None
    overfit_epochs: int = 5
    overfit_lr: float = 1e-6
    unlearn_epochs: int = 5
    unlearn_lr: float = 1e-5
    batch_size: int = 64
    token_threshold: float = 0.1
    start_layer: int = -1
    check_threshold: float = 2.0
    skip_check: bool = False
    seed: int = 0


@dataclass
class UBTResult:
    model: nn.Module
    poisoned: bool
    check_statistic: float
    suspicious: torch.Tensor
    topk: torch.Tensor
    reference_similarity: torch.Tensor
    overfit_similarity: torch.Tensor
    relevance: torch.Tensor | None
    token_keep: torch.Tensor | None
    timings: dict[str, float] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        return {"poisoned": self.poisoned, "check_statistic": self.check_statistic,
                "suspicious": int(self.suspicious.numel()), "topk": self.topk.tolist(),
                "timings_s": self.timings, "config": self.config}

    def save(self, directory: str | Path, truth: torch.Tensor | None = None,
             tokens: torch.Tensor | None = None, tokenizer=None) -> Path:
        """Write ``model.pt`` (purified state dict), ``result.json``, ``similarity.png`` (the
        reference similarity of all pairs; backdoor vs clean with ``truth``) and, when token
        relevance was computed and ``tokens``/``tokenizer`` are given, ``token_relevance.png``
        for the top pairs."""
        from fastbd.report.plots import save_score_histogram, save_token_heatmap

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), directory / "model.pt")
        summary = self.summary()
        if truth is not None:
            truth = torch.as_tensor(truth).bool().cpu()
            summary["suspicious_poisoned"] = int(truth[self.suspicious].sum())
            summary["topk_poisoned"] = int(truth[self.topk].sum())
        (directory / "result.json").write_text(json.dumps(summary, indent=2))
        save_score_histogram(self.reference_similarity, directory / "similarity.png", truth,
                             title="pair similarity under the reference model",
                             xlabel="cosine")
        if self.relevance is not None and tokens is not None and tokenizer is not None:
            save_token_heatmap(self.relevance, tokens[self.topk].cpu(), tokenizer,
                               directory / "token_relevance.png")
        return directory


def _check_pairs(images: torch.Tensor, tokens: torch.Tensor, model: nn.Module) -> None:
    if images.ndim != 4 or images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 N×3×S×S, got {images.dtype} "
                         f"{tuple(images.shape)}")
    if tokens.ndim != 2 or tokens.shape[0] != images.shape[0]:
        raise ValueError(f"tokens must be N×L with N={images.shape[0]}, got "
                         f"{tuple(tokens.shape)}")
    if images.shape[0] == 0:
        raise ValueError("the pair set is empty")
    context = model.positional_embedding.shape[0]
    if tokens.shape[1] != context:
        raise ValueError(f"tokens have length {tokens.shape[1]} but the model's context is "
                         f"{context}; tokenize with context_length={context}")


def similarities(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor,
                 device: torch.device | str) -> torch.Tensor:
    """Cosine of every pair, float32 ``N`` (``pair_cosine`` of the two towers' embeddings)."""
    return pair_cosine(encode_images(model, images, device=device),
                       encode_texts(model, tokens, device=device)).cpu()


def _batches(n: int, batch: int, g: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=g)
    return [order[s:s + batch] for s in range(0, n, batch)]


def overfit(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor,
            suspicious: torch.Tensor, normal: torch.Tensor, config: Config,
            device: torch.device, verbose: bool) -> nn.Module:
    """A copy of ``model`` trained to sharpen the backdoor (step 2)."""
    tuned = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=config.overfit_lr)
    g = torch.Generator().manual_seed(config.seed)
    for _ in tqdm(range(config.overfit_epochs), desc="UBT overfit", disable=not verbose):
        normal_batches = _batches(normal.numel(), config.batch_size, g)
        for step, rows in enumerate(_batches(suspicious.numel(), config.batch_size, g)):
            susp = suspicious[rows]
            img = F.normalize(tuned.encode_image(clip_normalise(images[susp].to(device))), dim=1)
            txt = F.normalize(tuned.encode_text(tokens[susp].to(device)), dim=1)
            loss = ((img * txt).sum(1) - 1).pow(2).mean()
            if normal_batches:
                other = normal[normal_batches[step % len(normal_batches)]]
                if other.numel() > 1:
                    loss = loss + clip_loss(
                        tuned.encode_image(clip_normalise(images[other].to(device))),
                        tuned.encode_text(tokens[other].to(device)), tuned.logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return tuned.eval()


def unlearn(model: nn.Module, images: torch.Tensor, captions: torch.Tensor, config: Config,
            device: torch.device, verbose: bool) -> None:
    """Minimise the mean cosine of every image with every caption (step 6), in place.
    ``images`` uint8 ``k×3×S×S``; ``captions`` ``c×L`` (originals and masked)."""
    k, c = images.shape[0], captions.shape[0]
    pairs = torch.cartesian_prod(torch.arange(k), torch.arange(c))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.unlearn_lr)
    g = torch.Generator().manual_seed(config.seed + 1)
    model.train()
    for _ in tqdm(range(config.unlearn_epochs), desc="UBT unlearn", disable=not verbose):
        for rows in _batches(pairs.shape[0], config.batch_size, g):
            i, j = pairs[rows, 0], pairs[rows, 1]
            img = F.normalize(model.encode_image(clip_normalise(images[i].to(device))), dim=1)
            txt = F.normalize(model.encode_text(captions[j].to(device)), dim=1)
            loss = (img * txt).sum(1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()


def defend(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, *,
           reference: nn.Module, config: Config | None = None,
           device: torch.device | str = "cpu", verbose: bool = True) -> UBTResult:
    """Run UBT on pairs (uint8 images ``N×3×S×S``, token ids ``N×L``). ``model`` is left as it
    is; the purified copy is ``result.model``."""
    config = config or Config()
    _check_pairs(images, tokens, model)
    _check_pairs(images, tokens, reference)
    device = torch.device(device)
    n = images.shape[0]
    timings: dict[str, float] = {}
    start = time.perf_counter()
    reference_sim = similarities(reference.to(device), images, tokens, device)
    n_susp = max(1, round(config.susp_fraction * n))
    suspicious = torch.topk(reference_sim, n_susp, largest=False).indices
    normal_mask = torch.ones(n, dtype=torch.bool)
    normal_mask[suspicious] = False
    normal = torch.nonzero(normal_mask).flatten()
    timings["suspicious_split"] = time.perf_counter() - start

    start = time.perf_counter()
    tuned = overfit(model, images, tokens, suspicious, normal, config, device, verbose)
    timings["overfit"] = time.perf_counter() - start
    start = time.perf_counter()
    overfit_sim = similarities(tuned, images[suspicious], tokens[suspicious], device)
    k = config.topk or math.ceil(math.sqrt(n * config.susp_fraction))
    k = min(k, n_susp)
    order = torch.argsort(overfit_sim, descending=True)
    topk = suspicious[order[:k]]
    rest = overfit_sim[order[k:]] if n_susp > k else overfit_sim
    spread = float(rest.std()) if rest.numel() > 1 else 0.0
    statistic = (float(overfit_sim[order[:k]].mean()) - float(rest.mean())) / max(spread, 1e-6)
    timings["rank"] = time.perf_counter() - start
    purified = copy.deepcopy(model).to(device).eval()
    poisoned = config.skip_check or statistic >= config.check_threshold
    result = UBTResult(model=purified, poisoned=poisoned, check_statistic=statistic,
                       suspicious=suspicious, topk=topk, reference_similarity=reference_sim,
                       overfit_similarity=overfit_sim, relevance=None, token_keep=None,
                       timings=timings, config=asdict(config))
    if not poisoned:
        log.info("UBT check: statistic %.2f below %.2f; model left unchanged", statistic,
                 config.check_threshold)
        return result
    start = time.perf_counter()
    top_images, top_tokens = images[topk], tokens[topk].to(device)
    relevance = token_relevance(purified, top_images.to(device), top_tokens,
                                start_layer=config.start_layer)
    masked, keep = masked_tokens(top_tokens, relevance, config.token_threshold)
    timings["attribution"] = time.perf_counter() - start
    start = time.perf_counter()
    unlearn(purified, top_images, torch.cat([top_tokens, masked]).cpu(), config, device,
            verbose)
    timings["unlearn"] = time.perf_counter() - start
    result.relevance, result.token_keep = relevance.cpu(), keep.cpu()
    return result
